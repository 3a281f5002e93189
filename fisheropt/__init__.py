"""fisheropt: Fisher-information optimizers and natural-gradient estimators.

Public API::

    import fisheropt as fo
    fo.backends.available()                     # usable backends ("numpy" always)
    opt = fo.FAdam(params, lr=1e-3, backend="auto")
    opt.step(grads)
    fo.save_state(opt.state_dict(), "opt.npz")

The math is in fisheropt.refimpl (NumPy reference) and spec/ (one page per rule).
"""

import importlib.util as _util

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
from .backends import BackendUnavailable
from .optim import CLASSES as _CLASSES
from .optim import Optimizer
from .state_io import load_state, save_state

__version__ = "0.1.0"

# One optimizer class per rule of the registry (fisheropt.refimpl.RULES): Adam, AdamW, FAdam, ...
globals().update({cls.__name__: cls for cls in _CLASSES.values()})

__all__ = [
    *(cls.__name__ for cls in _CLASSES.values()),
    "Optimizer",
    "backends",
    "fisher",
    "BackendUnavailable",
    "save_state",
    "load_state",
    "__version__",
]
