"""fisheropt for PyTorch: every update rule as a drop-in ``torch.optim.Optimizer``.

::

    import fisheropt.torch as fot
    opt = fot.FAdam(model.parameters(), lr=1e-3)             # was: torch.optim.AdamW(...)
    opt = fot.CoupledAdam(fot.coupled_param_groups(model), lr=3e-4)
    loss.backward(); opt.step(); opt.zero_grad()

One class per rule of the registry (:data:`fisheropt.refimpl.RULES`): ``Adam``,
``AdamW``, ``FAdam``, ``CoupledAdam`` and every rule added later, each with the
hyperparameters and defaults of its ``fisheropt.*`` counterpart and the same
kernels, with torch's semantics (param groups, schedulers, ``GradScaler``,
per-parameter state and steps, ``state_dict`` of tensors). CPU tensors are
updated in place through NumPy views (numba backend when installed, else the
NumPy reference); CUDA tensors through DLPack by the cupy backend, on torch's
current stream. See :mod:`fisheropt.torch.optim`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .._types import missing_attribute
from . import distributed as distributed  # torch.distributed: spec/distributed.md
from .fisher_operator import CGConvergenceWarning, CGNotConverged, FisherOperator, conjugate_gradient
from .groups import coupled_param_groups, embedding_parameters
from .natural_gradient import NaturalGradient
from .optim import CLASSES, COMPILE_MESSAGE, Optimizer, optimizer_class
from .per_sample import ParamLayout, logit_jacobians, per_sample_grads

if TYPE_CHECKING:
    from .optim import RuleOptimizer

# One class per rule: Adam, AdamW, CoupledAdam, FAdam, ...
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__getattr__: Callable[[str], type[RuleOptimizer]] = missing_attribute(__name__)  # types the classes

__all__ = [
    "Optimizer",
    "optimizer_class",
    "CLASSES",
    "coupled_param_groups",
    "embedding_parameters",
    "COMPILE_MESSAGE",
    "NaturalGradient",
    "per_sample_grads",
    "logit_jacobians",
    "ParamLayout",
    "FisherOperator",
    "conjugate_gradient",
    "CGNotConverged",
    "CGConvergenceWarning",
]
# The classes' names come from the registry at import, so a type checker cannot list them.
__all__ += [cls.__name__ for cls in CLASSES.values()]  # pyright: ignore[reportUnsupportedDunderAll]
