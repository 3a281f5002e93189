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

from . import distributed  # noqa: F401  (torch.distributed: spec/distributed.md)
from .fisher_operator import CGConvergenceWarning, CGNotConverged, FisherOperator, conjugate_gradient
from .groups import coupled_param_groups, embedding_parameters
from .natural_gradient import NaturalGradient
from .optim import CLASSES, COMPILE_MESSAGE, Optimizer, optimizer_class
from .per_sample import ParamLayout, logit_jacobians, per_sample_grads

# One class per rule: Adam, AdamW, CoupledAdam, FAdam, ...
globals().update({cls.__name__: cls for cls in CLASSES.values()})

__all__ = [
    *(cls.__name__ for cls in CLASSES.values()),
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
