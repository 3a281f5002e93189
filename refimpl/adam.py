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

from .rule import FIRST_MOMENT, SECOND_MOMENT, Rule, adam_coefficients, adam_hyperparams, weight_decay_param


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


RULE = Rule(
    title="Adam",
    summary="Adam with L2 weight decay, as torch.optim.Adam",
    paper="Kingma & Ba, 2015",
    update=adam_update,
    state=(FIRST_MOMENT, SECOND_MOMENT),
    hyperparams=adam_hyperparams(weight_decay_param(0.0, "L2 decay λ, added to the gradient")),
    coefficients=adam_coefficients,
    items_per_element=7,  # read θ, g, m, v; write θ, m, v
)

adam_step = RULE.step  # the multi-tensor, in-place form: refimpl/_multi_tensor.py
