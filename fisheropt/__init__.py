"""fisheropt: Fisher-information optimizers and natural-gradient estimators.

Public API::

    import fisheropt as fo
    fo.backends.available()                     # usable backends ("numpy" always)
    opt = fo.FAdam(params, lr=1e-3, backend="auto")
    opt.step(grads)
    fo.save_state(opt.state_dict(), "opt.npz")

The math is in fisheropt.refimpl (NumPy reference) and spec/ (one page per rule).
"""

from __future__ import annotations

import importlib.util as _util
from collections.abc import Callable
from typing import TYPE_CHECKING

if _util.find_spec(f"{__name__}.backends") is None:  # a checkout on sys.path that was never installed
    raise ImportError(
        "fisheropt is not installed: refimpl/, backends/ and spec/ at the top of the repository become "
        "fisheropt.refimpl, fisheropt.backends and fisheropt.spec only through the install. In the checkout, "
        "run: pip install -e ."
    )

from . import (
    backends,  # noqa: E402
    fisher,
)
from ._types import missing_attribute
from .backends import BackendUnavailable
from .optim import CLASSES as _CLASSES
from .optim import Optimizer
from .state_io import load_state, save_state

if TYPE_CHECKING:
    from .optim import RuleOptimizer

__version__ = "0.1.0"

# One optimizer class per rule of the registry (fisheropt.refimpl.RULES): Adam, AdamW, FAdam, ...
globals().update({cls.__name__: cls for cls in _CLASSES.values()})
__getattr__: Callable[[str], type[RuleOptimizer]] = missing_attribute(__name__)  # types the classes

__all__ = ["Optimizer", "backends", "fisher", "BackendUnavailable", "save_state", "load_state", "__version__"]
# The classes' names come from the registry at import, so a type checker cannot list them.
__all__ += [cls.__name__ for cls in _CLASSES.values()]  # pyright: ignore[reportUnsupportedDunderAll]
