"""The host scalars of the fused kernels, shared by the numba and cupy backends.

Besides its arrays, a fused kernel reads a few scalars per tensor: the EMA factors and
their complements, the step-dependent coefficients of the rule's descriptor
(``RULE.coefficients``: step size, bias correction), and how weight decay enters. Each
function here computes one tensor's, in float64, by the kernels' argument names, from
its ``step`` and kernel hyperparameters (one value each: backends/interface.py). The
backends round them to the parameter dtype and hand them over their own way: numba as a
per-tensor table, cupy as kernel arguments.
"""

from fisheropt.refimpl.adam import RULE as ADAM
from fisheropt.refimpl.lion import RULE as LION

# How weight decay enters Adam's kernel (its per-tensor ``mode``): not at all, as L2 decay
# g + λθ (Adam), or decoupled, θ·(1 - lr·λ) (AdamW).
NO_DECAY, L2_DECAY, DECOUPLED_DECAY = 0, 1, 2


def _moment_factors(beta1, beta2) -> dict:
    return {"beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2}


def adam_scalars(*, step, lr, beta1, beta2, eps, weight_decay, decoupled) -> dict:
    """Adam's (``decoupled``: AdamW's): the decay ``mode``, λ and 1 - lr·λ, ε, the moment factors,
    the step size α/(1-β1^t) and √(1-β2^t)."""
    mode = DECOUPLED_DECAY if decoupled else (L2_DECAY if weight_decay != 0 else NO_DECAY)
    return {
        "mode": mode,
        "weight_decay": weight_decay,
        "decay_factor": 1 - lr * weight_decay,
        "eps": eps,
        **_moment_factors(beta1, beta2),
        **ADAM.coefficients(step, lr=lr, beta1=beta1, beta2=beta2),
    }


def lion_scalars(*, step, lr, beta1, beta2, weight_decay) -> dict:
    """Lion's: lr, λ and the moment factors (its descriptor has no step-dependent coefficient)."""
    coefficients = LION.coefficients(step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    return {"lr": lr, "weight_decay": weight_decay, **_moment_factors(beta1, beta2), **coefficients}
