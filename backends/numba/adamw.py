"""AdamW on the CPU: the Adam kernel with decoupled decay θ(1 - lr·λ) (reference: refimpl/adamw.py)."""

from ._core import run_all
from .adam import adam_launches

__all__ = ["adamw_step"]


def adamw_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for AdamW (as torch.optim.AdamW)."""
    hyperparams = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    run_all(adam_launches(params, grads, m, v, decoupled=True, **hyperparams))
