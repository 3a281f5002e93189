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

from functools import partial

import numpy as np

from ._multi_tensor import step_tensors
from .adam import adam_direction
from .adamw import adamw_update
from .rule import DECOUPLED_DECAY, FIRST_MOMENT, Rule, StateArray, TensorFlag, adam_coefficients, adam_hyperparams


def column_sums_of_squares(g):
    r"""\sum_i g_{ij}^2 over the rows, in float64 (what the row shards of a tensor add up)."""
    g64 = g.astype(np.float64)
    return np.sum(g64 * g64, axis=0)


def column_mean_of_squares(g, column_sums=None, rows=None):
    r"""\frac1V \sum_i g_{ij}^2, accumulated in float64 and rounded to g's dtype; where g is a row
    shard (spec/distributed.md §5), from the whole tensor's ``column_sums`` and V = ``rows``."""
    if column_sums is None:
        column_sums, rows = column_sums_of_squares(g), g.shape[0]
    elif rows is None:
        raise ValueError("the column sums of a row shard need the whole tensor's row count, rows")
    return (np.asarray(column_sums, np.float64) / rows).astype(g.dtype)


def coupled_adam_update(theta, g, m, v_col, *, t, lr, beta1, beta2, eps, weight_decay, column_sums=None, rows=None):
    """One Coupled Adam step on one V×d tensor (or a row shard of one: ``column_sums`` and ``rows``
    of the whole, :func:`column_mean_of_squares`). Pure: returns (theta, m, v_col)."""
    theta = theta * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v_col = beta2 * v_col + (1 - beta2) * column_mean_of_squares(g, column_sums, rows)
    return theta - adam_direction(m, v_col, t=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps), m, v_col


def coupled_adam_partials(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Pass 1 of a sharded step: per coupled tensor, in order, its column sums over the local rows."""
    return [column_sums_of_squares(g) for g, c in zip(grads, coupled) if c]


def coupled_adam_apply(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled, column_sums, rows):
    """Pass 2 of a sharded step: coupled tensor k (in order) with the column sums and row count of
    its whole tensor, the others AdamW; in place, all computed, then written."""
    whole = iter(zip(column_sums, rows))
    updates = []
    for c in coupled:
        if c:
            sums_k, rows_k = next(whole)
            updates.append(partial(coupled_adam_update, column_sums=sums_k, rows=rows_k))
        else:
            updates.append(adamw_update)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    step_tensors(updates, params, grads, (m, v), t=step, **hp)


RULE = Rule(
    title="CoupledAdam",
    summary="AdamW with one second moment per column shared by an embedding's vocabulary rows",
    paper="Stollenwerk & Stollenwerk, 2025",
    update=coupled_adam_update,
    update_unflagged=adamw_update,  # coupled[i] False: an ordinary tensor, updated by AdamW
    state=(
        FIRST_MOMENT,
        StateArray(
            "v",
            "second moment: per column (d,) for coupled tensors, else like θ",
            second_moment=True,
            per_column=True,
            reduced=True,
        ),
    ),
    hyperparams=adam_hyperparams(DECOUPLED_DECAY),
    coefficients=adam_coefficients,
    tensor_flag=TensorFlag(
        "coupled",
        "True for an embedding matrix (V×d, rows = vocabulary) whose second "
        "moment is shared across its rows; False: AdamW",
    ),
    items_per_element=6,  # pass 1 read g; pass 2 read θ, g, m, write θ, m
    items_per_element_unflagged=7,  # AdamW
)

coupled_adam_step = RULE.step  # the multi-tensor, in-place form: refimpl/_multi_tensor.py
