r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay — exactly torch.optim.AdamW.

Spec: spec/adamw.md. The decay shrinks the parameter before the Adam step and
never enters the moments:

.. math::
    \theta &\leftarrow \theta\,(1 - \alpha\lambda) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2 \\
    \theta_t &= \theta - \frac{\alpha}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
"""
from .adam import adam_direction


def adamw_update(theta, g, m, v, *, t, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step on one tensor. Pure: returns (theta, m, v) as new arrays."""
    theta = theta * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    return theta - adam_direction(m, v, t=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


def adamw_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for AdamW."""
    for theta_i, g_i, m_i, v_i in zip(params, grads, m, v):
        theta_new, m_new, v_new = adamw_update(
            theta_i, g_i, m_i, v_i, t=step, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay)
        theta_i[...], m_i[...], v_i[...] = theta_new, m_new, v_new
