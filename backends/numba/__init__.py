"""The "numba" backend: fused, multi-threaded CPU kernels (Numba, cache=True).

Same function names and signatures as the reference backend
(fisheropt.backends.reference); see fisheropt.backends.interface.
Importing this module fails with ImportError when numba is missing, which the
registry reports as the reason the backend is unavailable.
"""
import numpy as np
import numba  # noqa: F401  (an ImportError here is the registry's "why not")

NAME = "numba"
array_module = np


def owns(array) -> bool:
    return isinstance(array, np.ndarray)


# --- update rules (issue: Numba CPU backend) -------------------------------------
from .optim import all_finite, adam_step, adamw_step, fadam_step, coupled_adam_step  # noqa: F401,E402

# --- Fisher directions (issue: Fisher estimators) --------------------------------
from .fisher import fisher_gram, fisher_sample_space_direction  # noqa: E402,F401

# --- ESimCSE momentum encoder (issue: ESimCSE) -----------------------------------
from .esimcse import ema_update  # noqa: E402,F401
