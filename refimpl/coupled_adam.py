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

from ._multi_tensor import step_tensors
from .adam import adam_direction
from .adamw import adamw_update
from .rule import Rule, StateArray, TensorFlag, adam_coefficients, betas_param, eps_param, lr_param, weight_decay_param


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


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam (all tensors computed, then written).

    ``coupled[i]`` True: params[i] is a V×d embedding and v[i] its length-d shared
    second moment; False: an ordinary tensor, updated by AdamW with v[i] like
    params[i]."""
    step_tensors(
        [coupled_adam_update if c else adamw_update for c in coupled],
        params,
        grads,
        (m, v),
        t=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )


RULE = Rule(
    name="coupled_adam",
    title="CoupledAdam",
    summary="AdamW with one second moment per column shared by an embedding's vocabulary rows",
    paper="Stollenwerk & Stollenwerk, 2025",
    step=coupled_adam_step,
    update=coupled_adam_update,
    state=(
        StateArray("m", "first moment (EMA of g)"),
        StateArray(
            "v",
            "second moment: per column (d,) for coupled tensors, else like θ",
            second_moment=True,
            per_column=True,
            reduced=True,
        ),
    ),
    hyperparams=(
        lr_param(1e-3),
        betas_param((0.9, 0.999)),
        eps_param(1e-8),
        weight_decay_param(1e-2, "decoupled decay λ: θ ← θ(1 − αλ)"),
    ),
    coefficients=adam_coefficients,
    tensor_flag=TensorFlag(
        "coupled",
        "True for an embedding matrix (V×d, rows = vocabulary) whose second "
        "moment is shared across its rows; False: AdamW",
    ),
    items_per_element=6,  # pass 1 read g; pass 2 read θ, g, m, write θ, m
    items_per_element_unflagged=7,  # AdamW
)
