"""The "numpy" backend: the reference implementation itself, always available.

It exists so that the reference and the fused backends are reached through
one registry with one interface; its functions are fisheropt.refimpl's.
"""
import numpy as np

from fisheropt.refimpl import (  # noqa: F401  (re-exported as the backend interface)
    adam_step,
    adamw_step,
    all_finite,
    coupled_adam_step,
    fadam_step,
)
from fisheropt.refimpl.esimcse_momentum import ema_update  # noqa: F401  (ESimCSE momentum encoder)
from fisheropt.refimpl.fisher_ngd import (  # noqa: F401  (Fisher directions)
    fisher_gram,
    fisher_sample_space_direction,
)

NAME = "numpy"
array_module = np


def owns(array) -> bool:
    return isinstance(array, np.ndarray)
