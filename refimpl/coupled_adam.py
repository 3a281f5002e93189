r"""Coupled Adam (Stollenwerk & Stollenwerk, 2025) for embedding matrices.

Spec: spec/coupled_adam.md. Adam's per-element second moment lets rare and
frequent vocabulary rows move at different speeds, which drifts all embeddings
along a common direction (anisotropy). Coupled Adam shares the second moment
across the V vocabulary rows of an embedding E \in R^{V\times d}: every
row of column j uses the row-mean of the per-element EMA of g^2.

Because the mean is linear, the mean of the EMAs is the EMA of the means:

.. math::
    \bar v_{t,j} = \frac1V\sum_i v_{t,ij}
       = \beta_2 \bar v_{t-1,j} + (1-\beta_2)\,\frac1V\sum_i g_{t,ij}^2 ,

so only the length-d vector \bar v is stored (1/V of Adam's second-moment
memory). The rest is AdamW: per-element m, decoupled decay, bias corrections.

.. math::
    \theta &\leftarrow \theta (1-\alpha\lambda),\qquad m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t \\
    \theta_{t,ij} &= \theta_{ij} - \frac{\alpha}{1-\beta_1^t}\,
        \frac{m_{t,ij}}{\sqrt{\bar v_{t,j}}/\sqrt{1-\beta_2^t} + \epsilon}
"""
import numpy as np

from .adam import adam_direction


def column_mean_of_squares(g):
    r"""\frac1V \sum_i g_{ij}^2, accumulated in float64 and rounded to g's dtype."""
    g64 = g.astype(np.float64)
    return np.mean(g64 * g64, axis=0).astype(g.dtype)


def coupled_adam_update(theta, g, m, v_col, *, t, lr, beta1, beta2, eps, weight_decay):
    """One Coupled Adam step on one V×d tensor. Pure: returns (theta, m, v_col)."""
    theta = theta * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v_col = beta2 * v_col + (1 - beta2) * column_mean_of_squares(g)
    return theta - adam_direction(m, v_col, t=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v_col


def coupled_adam_step(params, grads, m, v_col, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Coupled Adam.

    Every tensor here is coupled (2-D, shape V×d, v_col[i] of shape (d,));
    the optimizer class routes uncoupled tensors to adamw_step."""
    for theta_i, g_i, m_i, v_i in zip(params, grads, m, v_col):
        theta_new, m_new, v_new = coupled_adam_update(
            theta_i, g_i, m_i, v_i, t=step, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay)
        theta_i[...], m_i[...], v_i[...] = theta_new, m_new, v_new
