"""all_finite: the pre-step check that lets an optimizer reject NaN/Inf gradients
before it has written anything."""

import numpy as np


def all_finite(arrays) -> bool:
    """True when every element of every array is finite (no NaN, no ±Inf)."""
    return all(bool(np.isfinite(a).all()) for a in arrays)
