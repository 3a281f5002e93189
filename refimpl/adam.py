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
import math

import numpy as np


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
    step_size = lr / (1 - beta1**t)             # host scalar, float64
    bias_correction2_sqrt = math.sqrt(1 - beta2**t)
    denom = np.sqrt(v) / m.dtype.type(bias_correction2_sqrt) + m.dtype.type(eps)
    return m.dtype.type(step_size) * (m / denom)


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam."""
    for theta_i, g_i, m_i, v_i in zip(params, grads, m, v):
        theta_new, m_new, v_new = adam_update(
            theta_i, g_i, m_i, v_i, t=step, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay)
        theta_i[...], m_i[...], v_i[...] = theta_new, m_new, v_new
