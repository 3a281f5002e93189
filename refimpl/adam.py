r"""Adam (Kingma & Ba, 2015) with L2 weight decay — exactly torch.optim.Adam.

Spec: spec/adam.md. With gradient g_t, step t >= 1, learning rate \alpha:

.. math::
    g_t &\leftarrow g_t + \lambda\,\theta_{t-1}            \quad\text{(L2 decay, coupled to the gradient)}\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2 \\
    \theta_t &= \theta_{t-1} - \frac{\alpha}{1-\beta_1^t}\;
               \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

The last line is \alpha\,\hat m_t/(\sqrt{\hat v_t}+\epsilon) with the bias
corrections folded into scalars, in the order PyTorch evaluates it.
"""

import numpy as np

from ._multi_tensor import step_tensors
from .rule import Rule, StateArray, adam_coefficients, betas_param, eps_param, lr_param, weight_decay_param


def adam_update(theta, g, m, v, *, t, lr, beta1, beta2, eps, weight_decay):
    """One Adam step on one tensor. Pure: returns (theta, m, v) as new arrays."""
    if weight_decay != 0:
        g = g + weight_decay * theta
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    return theta - adam_direction(m, v, t=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


def adam_direction(m, v, *, t, lr, beta1, beta2, eps):
    r"""\alpha \hat m / (\sqrt{\hat v} + \epsilon), shared by Adam, AdamW and Coupled Adam.

    v may be a per-element array (Adam) or a per-column vector that
    broadcasts over the rows of m (Coupled Adam)."""
    c = adam_coefficients(t, lr=lr, beta1=beta1, beta2=beta2)  # host scalars, float64
    denom = np.sqrt(v) / m.dtype.type(c["bias_correction2_sqrt"]) + m.dtype.type(eps)
    return m.dtype.type(c["step_size"]) * (m / denom)


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam (all tensors computed, then written)."""
    step_tensors(
        adam_update, params, grads, (m, v), t=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
    )


RULE = Rule(
    name="adam",
    title="Adam",
    summary="Adam with L2 weight decay, as torch.optim.Adam",
    paper="Kingma & Ba, 2015",
    step=adam_step,
    update=adam_update,
    state=(
        StateArray("m", "first moment (EMA of g)"),
        StateArray("v", "second moment (EMA of g²)", second_moment=True),
    ),
    hyperparams=(
        lr_param(1e-3),
        betas_param((0.9, 0.999)),
        eps_param(1e-8),
        weight_decay_param(0.0, "L2 decay λ, added to the gradient"),
    ),
    coefficients=adam_coefficients,
    items_per_element=7,  # read θ, g, m, v; write θ, m, v
)
