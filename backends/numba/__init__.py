"""The "numba" backend: fused, multi-threaded CPU kernels (Numba, cache=True).

One module per update rule, beside its reference (backends/numba/fadam.py next to
refimpl/fadam.py), plus the shared machinery in ``_core`` (pointers, chunk
tables, plan cache, launches) and, shared with the cupy backend, the kernels'
host scalars in ``backends/_host.py``. Same function names and signatures as the
reference backend (fisheropt.backends.interface). Importing this module fails
with ImportError when numba is missing, which the registry reports as the reason
the backend is unavailable; a rule without a module here is unavailable on this
backend only.
"""

import numba  # noqa: F401  (an ImportError here is the registry's "why not")
import numpy as np

from ..interface import load_rule_functions
from . import _core
from .esimcse import ema_update  # noqa: F401  (ESimCSE momentum encoder)
from .finite import all_finite  # noqa: F401
from .fisher import fisher_gram, fisher_sample_space_direction  # noqa: F401  (Fisher directions)

NAME = "numba"
array_module = np


def owns(array) -> bool:
    return isinstance(array, np.ndarray)


load_rule_functions(__name__, globals())


def clear_cache() -> None:
    """Forget every cached plan (addresses and chunk tables); they are rebuilt on demand."""
    _core.PLANS.clear()
    from .finite import clear_cache as clear_finite

    clear_finite()
