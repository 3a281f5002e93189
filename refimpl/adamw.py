r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay — exactly torch.optim.AdamW.

Spec: spec/adamw.md. The decay shrinks the parameter before the Adam step and
never enters the moments:

.. math::
    \theta &\leftarrow \theta\,(1 - \alpha\lambda) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2 \\
    \theta_t &= \theta - \frac{\alpha}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
"""

from .adam import adam_direction
from .rule import DECOUPLED_DECAY, FIRST_MOMENT, SECOND_MOMENT, Rule, adam_coefficients, adam_hyperparams


def adamw_update(theta, g, m, v, *, t, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step on one tensor. Pure: returns (theta, m, v) as new arrays."""
    theta = theta * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    return theta - adam_direction(m, v, t=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v


RULE = Rule(
    title="AdamW",
    summary="Adam with decoupled weight decay, as torch.optim.AdamW",
    paper="Loshchilov & Hutter, 2019",
    update=adamw_update,
    state=(FIRST_MOMENT, SECOND_MOMENT),
    hyperparams=adam_hyperparams(DECOUPLED_DECAY),
    coefficients=adam_coefficients,
    items_per_element=7,  # read θ, g, m, v; write θ, m, v
)

adamw_step = RULE.step  # the multi-tensor, in-place form: refimpl/_multi_tensor.py
