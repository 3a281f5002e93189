"""The contract every backend implements.

The reference backend (``fisheropt.backends.reference``, name "numpy") defines
the signatures; every other backend must expose the same function names with
identical signatures (checked by tests/test_interface.py).

Conventions shared by all step functions
----------------------------------------
* Multi-tensor and in place: ``params``, ``grads`` and every state list are
  sequences of arrays, aligned by index, updated in place. A fused backend
  may update all tensors in one pass; nothing is returned.
* ``step`` is the 1-based index t of the update being applied (the optimizer
  increments its counter before calling, as torch.optim does).
* Arithmetic is elementwise in the parameter dtype (float32 or float64);
  scalar coefficients (bias corrections, lr·wd, ...) are computed in float64
  on the host and rounded to the parameter dtype. Global reductions (RMS,
  column means) are accumulated in float64.
* The step functions do not validate: the optimizer classes in
  fisheropt.optim check shapes, dtypes, flags, finiteness and hyperparameters
  before any backend call, so a rejected step changes nothing.
"""
from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend was asked for but cannot run here; the message says why."""


# Functions every backend must provide (the registry refuses incomplete ones).
# Later issues append to this tuple (Fisher directions, ESimCSE EMA).
FUNCTIONS = (
    "all_finite",
    "adam_step",
    "adamw_step",
    "fadam_step",
    "coupled_adam_step",
    "ema_update",
    "fisher_gram",
    "fisher_sample_space_direction",
)
