"""Coupled Adam on the CPU: fused, multi-tensor Numba kernels (reference: refimpl/coupled_adam.py).

A coupled tensor is a V×d embedding whose second moment is one value per column,
the row mean of g² (accumulated in float64 per row block, blocks combined in a
fixed order, so results do not depend on the thread count); its other tensors
(``coupled[i]`` False) take the AdamW kernel in the same call. Per dtype group,
one launch reduces (read g: the column means, the new v̄ and the denominators
into scratch, nothing else written) and one applies (write v̄, θ, m): 24 B per
float32 element. The reductions of every group run before any update, and
their sums double as the finiteness check of the coupled gradients.
"""

import numpy as np
from numba import njit, prange

from fisheropt.refimpl.coupled_adam import RULE

from ._core import (
    KERNEL_LOCK,
    PLANS,
    addresses,
    all_finite_at,
    as_pointer,
    dtype_groups,
    per_tensor_table,
    row_chunks,
    run_phases,
)
from .adam import adam_launches
from .finite import all_finite

__all__ = ["coupled_adam_step", "coupled_adam_step_checked"]

# At most this many row blocks per tensor in the column reduction, which bounds its
# float64 partials to COUPLED_MAX_BLOCKS * d per tensor.
COUPLED_MAX_BLOCKS = 64


@njit(parallel=True, cache=True)
def _coupled_reduce(
    grad_addrs,
    v_col_addrs,
    rows,
    cols,
    block_tensor,
    block_start,
    block_stop,
    block_first,
    partial_offset,
    partials,
    column_offset,
    v_col_new,
    denominator,
    itemsize,
    coef,
    check,
):
    """Column means of g² over the V rows → v̄_new (into ``v_col_new``) and √v̄/bc2 + ε (into
    ``denominator``), both at ``column_offset[t]`` per tensor.

    coef[t] = (β1, 1-β1, β2, 1-β2, √(1-β2^t), ε, step size, 1 - lr·λ) in the parameter dtype.
    Row block c covers rows block_start[c]..block_stop[c] of tensor block_tensor[c];
    partials: its float64 column sums at partial_offset[c], zeroed by the caller. Returns False,
    having written only scratch, when ``check`` and a coupled gradient holds NaN or Inf."""
    n_blocks = block_tensor.size
    n_tensors = rows.size
    one = v_col_new.dtype.type(1)

    # Pass 1: per row block, column sums of g² in float64 (rows in order within the block).
    # (The partial row is addressed through a pointer: plain `partials[offset + j]` indexing keeps a
    # negative-index check in the loop, which stops LLVM from vectorizing it.)
    zero64 = np.float64(0.0)
    partials_addr = partials.ctypes.data
    for c in prange(n_blocks):
        t = block_tensor[c]
        d = cols[t]
        acc = as_pointer(partials_addr + 8 * partial_offset[c], zero64)
        for r in range(block_start[c], block_stop[c]):
            row = as_pointer(grad_addrs[t] + r * d * itemsize, one)
            for j in range(d):
                x = np.float64(row[j])
                acc[j] += x * x

    # Per tensor and column: mean over the V rows (blocks combined in order), v̄, denominator.
    ok = np.ones(n_tensors, np.bool_)
    for t in prange(n_tensors):
        d = cols[t]
        v_col = as_pointer(v_col_addrs[t], one)
        beta2, one_minus_beta2, bias_correction2_sqrt, eps = coef[t, 2], coef[t, 3], coef[t, 4], coef[t, 5]
        offset = column_offset[t]
        for j in range(d):
            col_sum = 0.0
            for c in range(block_first[t], block_first[t + 1]):
                col_sum += partials[partial_offset[c] + j]
            if check and not np.isfinite(col_sum):
                ok[t] = False  # NaN/Inf in g (or, float64, a g² that overflows: looked at below)
            denominator[offset + j] = col_sum / rows[t]  # the column mean, rounded to the parameter dtype
            vj = beta2 * v_col[j] + one_minus_beta2 * denominator[offset + j]
            v_col_new[offset + j] = vj
            denominator[offset + j] = np.sqrt(vj) / bias_correction2_sqrt + eps
    for t in range(n_tensors):
        if not ok[t] and not all_finite_at(as_pointer(grad_addrs[t], one), rows[t] * cols[t]):
            return False
    return True


@njit(parallel=True, cache=True)
def _coupled_apply(
    theta_addrs,
    grad_addrs,
    m_addrs,
    v_col_addrs,
    cols,
    update_tensor,
    update_start,
    update_stop,
    column_offset,
    v_col_new,
    denominator,
    itemsize,
    coef,
):
    """v̄ ← v̄_new; θ ← θ(1-lr·λ) - step_size · m/denominator_j with m ← β₁m + (1-β₁)g, over row
    blocks (update_tensor, update_start, update_stop) of whole rows."""
    one = v_col_new.dtype.type(1)
    for t in prange(cols.size):
        v_col = as_pointer(v_col_addrs[t], one)
        for j in range(cols[t]):
            v_col[j] = v_col_new[column_offset[t] + j]
    denominator_addr = denominator.ctypes.data
    for c in prange(update_tensor.size):
        t = update_tensor[c]
        d = cols[t]
        beta1, one_minus_beta1, step_size, decay_factor = coef[t, 0], coef[t, 1], coef[t, 6], coef[t, 7]
        col_denominator = as_pointer(denominator_addr + itemsize * column_offset[t], one)
        for r in range(update_start[c], update_stop[c]):
            row_offset = r * d * itemsize
            theta = as_pointer(theta_addrs[t] + row_offset, one)
            g = as_pointer(grad_addrs[t] + row_offset, one)
            m = as_pointer(m_addrs[t] + row_offset, one)
            for j in range(d):
                mi = beta1 * m[j] + one_minus_beta1 * g[j]
                m[j] = mi
                theta[j] = theta[j] * decay_factor - step_size * (mi / col_denominator[j])


def _build_plan(lists):
    params = lists[0]
    plan = []
    for dt, idx in dtype_groups(params):
        rows = np.array([params[i].shape[0] for i in idx], dtype=np.int64)
        cols = np.array([params[i].shape[1] for i in idx], dtype=np.int64)
        block_tensor, block_start, block_stop, block_first = row_chunks(rows, cols, max_blocks=COUPLED_MAX_BLOCKS)
        partial_offset = np.zeros(block_tensor.size + 1, dtype=np.int64)
        np.cumsum(cols[block_tensor], out=partial_offset[1:])
        update_tensor, update_start, update_stop, _ = row_chunks(rows, cols)
        column_offset = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(cols, out=column_offset[1:])
        plan.append(
            (
                dt,
                idx,
                [addresses(lst, idx) for lst in lists],
                rows,
                cols,
                block_tensor,
                block_start,
                block_stop,
                block_first,
                partial_offset[:-1].copy(),
                int(partial_offset[-1]),
                update_tensor,
                update_start,
                update_stop,
                column_offset[:-1].copy(),
                int(column_offset[-1]),
                int((rows * cols).sum()),
            )
        )
    return plan


def _row(*, step, lr, beta1, beta2, eps, weight_decay):
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    return (beta1, 1 - beta1, beta2, 1 - beta2, c["bias_correction2_sqrt"], eps, c["step_size"], 1 - lr * weight_decay)


def _coupled_launches(params, grads, m, v, check, hyperparams):
    if not params:
        return [], []
    reduce, apply = [], []
    for (
        dt,
        idx,
        (theta_addrs, m_addrs, v_col_addrs),
        rows,
        cols,
        block_tensor,
        block_start,
        block_stop,
        block_first,
        partial_offset,
        partial_len,
        update_tensor,
        update_start,
        update_stop,
        column_offset,
        column_len,
        n,
    ) in PLANS.get("coupled", (params, m, v), _build_plan):
        grad_addrs = addresses(grads, idx)
        coef = per_tensor_table(idx, _row, hyperparams, dt)
        v_col_new, denominator = np.empty(column_len, dtype=dt), np.empty(column_len, dtype=dt)
        reduce.append(
            (
                _coupled_reduce,
                n,
                (
                    grad_addrs,
                    v_col_addrs,
                    rows,
                    cols,
                    block_tensor,
                    block_start,
                    block_stop,
                    block_first,
                    partial_offset,
                    np.zeros(partial_len, np.float64),
                    column_offset,
                    v_col_new,
                    denominator,
                    dt.itemsize,
                    coef,
                    check,
                ),
            )
        )
        apply.append(
            (
                _coupled_apply,
                n,
                (
                    theta_addrs,
                    grad_addrs,
                    m_addrs,
                    v_col_addrs,
                    cols,
                    update_tensor,
                    update_start,
                    update_stop,
                    column_offset,
                    v_col_new,
                    denominator,
                    dt.itemsize,
                    coef,
                ),
            )
        )
    return reduce, apply


def _step(params, grads, m, v, coupled, check, hyperparams) -> bool:
    coupled_idx = [i for i, c in enumerate(coupled) if c]
    adamw_idx = [i for i, c in enumerate(coupled) if not c]

    def pick(idx, lst):
        return [lst[i] for i in idx]

    coupled_hp = {k: (pick(coupled_idx, x) if isinstance(x, (list, tuple)) else x) for k, x in hyperparams.items()}
    adamw_hp = {k: (pick(adamw_idx, x) if isinstance(x, (list, tuple)) else x) for k, x in hyperparams.items()}
    reduce, apply = _coupled_launches(*(pick(coupled_idx, lst) for lst in (params, grads, m, v)), check, coupled_hp)
    adamw = adam_launches(*(pick(adamw_idx, lst) for lst in (params, grads, m, v)), decoupled=True, **adamw_hp)
    with KERNEL_LOCK:
        if check and not all_finite(pick(adamw_idx, grads)):  # the AdamW tensors have no reduction to check in
            return False
        return run_phases(reduce, apply + adamw, check)


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam.

    ``coupled[i]`` True: a V×d tensor with v[i] of shape (d,); False: AdamW with
    v[i] like params[i]. Every launch of both kinds is prepared before any runs."""
    _step(
        params,
        grads,
        m,
        v,
        coupled,
        False,
        dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
    )


def coupled_adam_step_checked(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled) -> bool:
    """:func:`coupled_adam_step` that returns False, having written nothing, when a gradient
    holds NaN or Inf: the coupled ones are checked by the column sums they need anyway."""
    return _step(
        params,
        grads,
        m,
        v,
        coupled,
        True,
        dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
    )
