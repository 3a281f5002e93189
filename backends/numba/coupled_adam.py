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
    launch,
    per_tensor_table,
    row_chunks,
    run_all,
)
from .adam import adam_launches
from .finite import all_finite

__all__ = ["coupled_adam_step", "coupled_adam_step_checked", "coupled_adam_partials", "coupled_adam_apply"]

# At most this many row blocks per tensor in the column reduction, which bounds its
# float64 partials to COUPLED_MAX_BLOCKS * d per tensor.
COUPLED_MAX_BLOCKS = 64


@njit(parallel=True, cache=True)
def _coupled_reduce(
    grad_addrs,
    cols,
    block_tensor,
    block_start,
    block_stop,
    block_first,
    partial_offset,
    partials,
    column_offset,
    column_sums,
    itemsize,
    one,
):
    """Pass 1: Σ_i g²_ij over the rows of each tensor, float64, into ``column_sums`` at
    ``column_offset[t]``. Row block c covers rows block_start[c]..block_stop[c] of tensor
    block_tensor[c]; partials: its float64 column sums at partial_offset[c], zeroed by the
    caller; the blocks of a tensor are added in order. Reads g; writes only those two."""
    # Per row block (rows in order within the block). The partial row is addressed through a
    # pointer: plain `partials[offset + j]` indexing keeps a negative-index check in the loop,
    # which stops LLVM from vectorizing it.
    zero64 = np.float64(0.0)
    partials_addr = partials.ctypes.data
    for c in prange(block_tensor.size):
        t = block_tensor[c]
        d = cols[t]
        acc = as_pointer(partials_addr + 8 * partial_offset[c], zero64)
        for r in range(block_start[c], block_stop[c]):
            row = as_pointer(grad_addrs[t] + r * d * itemsize, one)
            for j in range(d):
                x = np.float64(row[j])
                acc[j] += x * x
    for t in prange(cols.size):
        for j in range(cols[t]):
            col_sum = 0.0
            for c in range(block_first[t], block_first[t + 1]):
                col_sum += partials[partial_offset[c] + j]
            column_sums[column_offset[t] + j] = col_sum


@njit(cache=True)
def _coupled_finite(column_sums, column_offset, rows, cols, grad_addrs, one):
    # A NaN/Inf in g makes its column sum non-finite; so can a float64 g² that overflows:
    # only then is the tensor read again, to tell the two apart.
    for t in range(cols.size):
        sums = column_sums[column_offset[t] : column_offset[t] + cols[t]]
        if not np.isfinite(sums).all() and not all_finite_at(as_pointer(grad_addrs[t], one), rows[t] * cols[t]):
            return False
    return True


@njit(parallel=True, cache=True)
def _coupled_apply(
    theta_addrs,
    grad_addrs,
    m_addrs,
    v_col_addrs,
    counts,
    cols,
    update_tensor,
    update_start,
    update_stop,
    column_offset,
    column_sums,
    denominator,
    itemsize,
    coef,
):
    """Pass 2. Per column: v̄ ← β₂v̄ + (1-β₂)·(column sum / counts[t], the V rows of the whole tensor),
    denominator_j = √v̄/bc2 + ε; then over row blocks (update_tensor, update_start, update_stop) of
    whole rows: m ← β₁m + (1-β₁)g; θ ← θ(1-lr·λ) - step_size · m/denominator_j.

    coef[t] = (β1, 1-β1, β2, 1-β2, √(1-β2^t), ε, step size, 1 - lr·λ) in the parameter dtype."""
    one = denominator.dtype.type(1)
    for t in prange(cols.size):
        v_col = as_pointer(v_col_addrs[t], one)
        beta2, one_minus_beta2, bias_correction2_sqrt, eps = coef[t, 2], coef[t, 3], coef[t, 4], coef[t, 5]
        offset = column_offset[t]
        for j in range(cols[t]):
            denominator[offset + j] = column_sums[offset + j] / counts[t]  # the mean, in the parameter dtype
            vj = beta2 * v_col[j] + one_minus_beta2 * denominator[offset + j]
            v_col[j] = vj
            denominator[offset + j] = np.sqrt(vj) / bias_correction2_sqrt + eps
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


class _Coupled:
    """The coupled tensors of one dtype: their plan, and the step's scratch."""

    def __init__(self, entry, grads, hyperparams):
        (dt, self.idx, self.addrs, self.rows, self.cols, *self.blocks) = entry[:9]
        (self.partial_offset, partial_len, *self.updates, self.column_offset, column_len, self.n) = entry[9:]
        self.grad_addrs = addresses(grads, self.idx)
        self.coef = per_tensor_table(self.idx, _row, hyperparams, dt)
        self.one, self.partial_len = dt.type(1), partial_len
        self.column_sums = np.empty(column_len, np.float64)
        self.denominator = np.empty(column_len, dtype=dt)

    def reduce(self) -> None:
        partials = np.zeros(self.partial_len, np.float64)
        args = (self.partial_offset, partials, self.column_offset, self.column_sums, self.one.itemsize, self.one)
        launch(_coupled_reduce, self.n, self.grad_addrs, self.cols, *self.blocks, *args)

    def finite(self) -> bool:
        return _coupled_finite(self.column_sums, self.column_offset, self.rows, self.cols, self.grad_addrs, self.one)

    def apply(self, counts) -> None:
        theta_addrs, m_addrs, v_col_addrs = self.addrs
        args = (counts, self.cols, *self.updates, self.column_offset, self.column_sums, self.denominator)
        launch(
            _coupled_apply,
            self.n,
            theta_addrs,
            self.grad_addrs,
            m_addrs,
            v_col_addrs,
            *args,
            self.one.itemsize,
            self.coef,
        )


def _split(params, grads, m, v, coupled, hyperparams):
    """(the dtype groups of the coupled tensors, the AdamW launches of the others); prepared, nothing run."""
    coupled_idx = [i for i, c in enumerate(coupled) if c]
    adamw_idx = [i for i, c in enumerate(coupled) if not c]

    def pick(idx, lst):
        return [lst[i] for i in idx]

    coupled_hp = {k: (pick(coupled_idx, x) if isinstance(x, (list, tuple)) else x) for k, x in hyperparams.items()}
    adamw_hp = {k: (pick(adamw_idx, x) if isinstance(x, (list, tuple)) else x) for k, x in hyperparams.items()}
    lists = tuple(pick(coupled_idx, lst) for lst in (params, m, v))
    groups = []
    if coupled_idx:
        grads_c = pick(coupled_idx, grads)
        groups = [_Coupled(entry, grads_c, coupled_hp) for entry in PLANS.get("coupled", lists, _build_plan)]
    adamw = adam_launches(*(pick(adamw_idx, lst) for lst in (params, grads, m, v)), decoupled=True, **adamw_hp)
    return groups, adamw, pick(adamw_idx, grads)


def _step(params, grads, m, v, coupled, check, hyperparams) -> bool:
    groups, adamw, adamw_grads = _split(params, grads, m, v, coupled, hyperparams)
    with KERNEL_LOCK:
        for group in groups:
            group.reduce()
        if check and not (all(group.finite() for group in groups) and all_finite(adamw_grads)):
            return False  # (the AdamW tensors have no reduction to check in)
        for group in groups:
            group.apply(group.rows)
        run_all(adamw)
    return True


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam.

    ``coupled[i]`` True: a V×d tensor with v[i] of shape (d,); False: AdamW with
    v[i] like params[i]. Every launch of both kinds is prepared before any runs."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    _step(params, grads, m, v, coupled, False, hp)


def coupled_adam_step_checked(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled) -> bool:
    """:func:`coupled_adam_step` that returns False, having written nothing, when a gradient
    holds NaN or Inf: the coupled ones are checked by the column sums they need anyway."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    return _step(params, grads, m, v, coupled, True, hp)


def coupled_adam_partials(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Pass 1 of a sharded step (spec/distributed.md §5): per coupled tensor, in order, its float64
    column sums Σ_i g²_ij over the local rows ((d,) each). Writes nothing."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    groups, _adamw, _grads = _split(params, grads, m, v, coupled, hp)
    out = [None] * sum(map(bool, coupled))
    with KERNEL_LOCK:
        for group in groups:
            group.reduce()
            for k, t in enumerate(group.idx):
                start = group.column_offset[k]
                out[t] = group.column_sums[start : start + group.cols[k]].copy()
    return out


def coupled_adam_apply(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled, column_sums, rows):
    """Pass 2 of a sharded step: coupled tensor k (in order) takes the column sums ``column_sums[k]``
    of all its V = ``rows[k]`` rows (added over the shards); the others AdamW. With the tensors' own
    partials and row counts it is :func:`coupled_adam_step`, bit for bit."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    groups, adamw, _grads = _split(params, grads, m, v, coupled, hp)
    with KERNEL_LOCK:
        for group in groups:
            for k, t in enumerate(group.idx):
                start = group.column_offset[k]
                group.column_sums[start : start + group.cols[k]] = column_sums[t]
            group.apply(np.array([rows[t] for t in group.idx], np.int64))
        run_all(adamw)
