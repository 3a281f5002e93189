"""The "numba" backend: fused, multi-threaded CPU kernels (Numba, cache=True).

One module per update rule, beside its reference (backends/numba/fadam.py next to
refimpl/fadam.py), plus the shared machinery in ``_core`` (pointers, chunk
tables, plan cache, launches). Same function names and signatures as the
reference backend (fisheropt.backends.interface). Importing this module fails
with ImportError when numba is missing, which the registry reports as the reason
the backend is unavailable; a rule without a module here is unavailable on this
backend only.
"""
import importlib

import numba  # noqa: F401  (an ImportError here is the registry's "why not")
import numpy as np

from fisheropt.refimpl import RULES

from . import _core
from .esimcse import ema_update  # noqa: F401  (ESimCSE momentum encoder)
from .finite import all_finite  # noqa: F401
from .fisher import fisher_gram, fisher_sample_space_direction  # noqa: F401  (Fisher directions)

NAME = "numba"
array_module = np


def owns(array) -> bool:
    return isinstance(array, np.ndarray)


def _load_rules() -> None:
    """``<rule>_step`` (and ``<rule>_step_checked`` where fused) from each rule's module here."""
    for rule in RULES.values():
        try:
            module = importlib.import_module(f"{__name__}.{rule.name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{rule.name}":
                continue          # no kernel for this rule on this backend (yet)
            raise
        for name in (rule.step_function, rule.step_function + "_checked"):
            if hasattr(module, name):
                globals()[name] = getattr(module, name)


_load_rules()


def clear_cache() -> None:
    """Forget every cached plan (addresses and chunk tables); they are rebuilt on demand."""
    _core.PLANS.clear()
    from .finite import clear_cache as clear_finite
    clear_finite()
