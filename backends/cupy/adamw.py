"""AdamW on the GPU: Adam's kernel with decoupled decay θ(1 - lr·λ) (reference: refimpl/adamw.py)."""

from ._plan import current
from .adam import adam_launches

__all__ = ["adamw_step"]


def adamw_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for AdamW (as torch.optim.AdamW)."""
    engine = current()
    hyperparams = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    engine.run(adam_launches(engine, params, grads, m, v, decoupled=True, **hyperparams))
