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

from ._core import (KERNEL_LOCK, PLANS, addresses, all_finite_at, as_pointer, dtype_groups, per_tensor_table,
                    row_chunks, run_phases)
from .adam import adam_launches
from .finite import all_finite

__all__ = ["coupled_adam_step", "coupled_adam_step_checked"]

# At most this many row blocks per tensor in the column reduction, which bounds its
# float64 partials to COUPLED_MAX_BLOCKS * d per tensor.
COUPLED_MAX_BLOCKS = 64


@njit(parallel=True, cache=True)
def _coupled_reduce(a_g, a_vc, rows, cols, rtens, rstart, rstop, rfirst, poff, part, doff, vnew, den,
                    itemsize, coef, check):
    """Column means of g² over the V rows → v̄_new (into ``vnew``) and √v̄/bc2 + ε (into ``den``).

    coef[t] = (β1, 1-β1, β2, 1-β2, √(1-β2^t), ε, step size, 1 - lr·λ) in the parameter dtype.
    part: float64 column partials per row block, zeroed by the caller. Returns False,
    having written only scratch, when ``check`` and a coupled gradient holds NaN or Inf."""
    nr = rtens.size
    ntens = rows.size
    one = vnew.dtype.type(1)

    # Pass 1: per row block, column sums of g² in float64 (rows in order within the block).
    # (The partial row is addressed through a pointer: plain `part[o + j]` indexing keeps a
    # negative-index check in the loop, which stops LLVM from vectorizing it.)
    zero64 = np.float64(0.0)
    part_addr = part.ctypes.data
    for c in prange(nr):
        t = rtens[c]
        d = cols[t]
        acc = as_pointer(part_addr + 8 * poff[c], zero64)
        for r in range(rstart[c], rstop[c]):
            row = as_pointer(a_g[t] + r * d * itemsize, one)
            for j in range(d):
                x = np.float64(row[j])
                acc[j] += x * x

    # Per tensor and column: mean over the V rows (blocks combined in order), v̄, denominator.
    ok = np.ones(ntens, np.bool_)
    for t in prange(ntens):
        d = cols[t]
        vc = as_pointer(a_vc[t], one)
        b2, omb2, bc2, eps = coef[t, 2], coef[t, 3], coef[t, 4], coef[t, 5]
        o = doff[t]
        for j in range(d):
            s = 0.0
            for c in range(rfirst[t], rfirst[t + 1]):
                s += part[poff[c] + j]
            if check and not np.isfinite(s):
                ok[t] = False    # NaN/Inf in g (or, float64, a g² that overflows: looked at below)
            den[o + j] = s / rows[t]          # the column mean, rounded to the parameter dtype
            vj = b2 * vc[j] + omb2 * den[o + j]
            vnew[o + j] = vj
            den[o + j] = np.sqrt(vj) / bc2 + eps
    for t in range(ntens):
        if not ok[t] and not all_finite_at(as_pointer(a_g[t], one), rows[t] * cols[t]):
            return False
    return True


@njit(parallel=True, cache=True)
def _coupled_apply(a_th, a_g, a_m, a_vc, cols, utens, ustart, ustop, doff, vnew, den, itemsize, coef):
    """v̄ ← v̄_new; θ ← θ(1-lr·λ) - step_size · m/den_j with m ← β₁m + (1-β₁)g."""
    one = vnew.dtype.type(1)
    for t in prange(cols.size):
        vc = as_pointer(a_vc[t], one)
        for j in range(cols[t]):
            vc[j] = vnew[doff[t] + j]
    den_addr = den.ctypes.data
    for c in prange(utens.size):
        t = utens[c]
        d = cols[t]
        b1, omb1, step_size, decay = coef[t, 0], coef[t, 1], coef[t, 6], coef[t, 7]
        dj = as_pointer(den_addr + itemsize * doff[t], one)
        for r in range(ustart[c], ustop[c]):
            off = r * d * itemsize
            th = as_pointer(a_th[t] + off, one)
            g = as_pointer(a_g[t] + off, one)
            m = as_pointer(a_m[t] + off, one)
            for j in range(d):
                mi = b1 * m[j] + omb1 * g[j]
                m[j] = mi
                th[j] = th[j] * decay - step_size * (mi / dj[j])


def _build_plan(lists):
    params = lists[0]
    plan = []
    for dt, idx in dtype_groups(params):
        rows = np.array([params[i].shape[0] for i in idx], dtype=np.int64)
        cols = np.array([params[i].shape[1] for i in idx], dtype=np.int64)
        rtens, rstart, rstop, rfirst = row_chunks(rows, cols, max_blocks=COUPLED_MAX_BLOCKS)
        poff = np.zeros(rtens.size + 1, dtype=np.int64)
        np.cumsum(cols[rtens], out=poff[1:])
        utens, ustart, ustop, _ = row_chunks(rows, cols)
        doff = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(cols, out=doff[1:])
        plan.append((dt, idx, [addresses(lst, idx) for lst in lists], rows, cols,
                     rtens, rstart, rstop, rfirst, poff[:-1].copy(), int(poff[-1]),
                     utens, ustart, ustop, doff[:-1].copy(), int(doff[-1]), int((rows * cols).sum())))
    return plan


def _row(*, step, lr, beta1, beta2, eps, weight_decay):
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    return (beta1, 1 - beta1, beta2, 1 - beta2, c["bias_correction2_sqrt"], eps, c["step_size"],
            1 - lr * weight_decay)


def _coupled_launches(params, grads, m, v, check, hyperparams):
    if not params:
        return [], []
    reduce, apply = [], []
    for (dt, idx, (a_th, a_m, a_vc), rows, cols, rtens, rstart, rstop, rfirst, poff, plen,
         utens, ustart, ustop, doff, dlen, n) in PLANS.get("coupled", (params, m, v), _build_plan):
        a_g = addresses(grads, idx)
        coef = per_tensor_table(idx, _row, hyperparams, dt)
        vnew, den = np.empty(dlen, dtype=dt), np.empty(dlen, dtype=dt)
        reduce.append((_coupled_reduce, n, (a_g, a_vc, rows, cols, rtens, rstart, rstop, rfirst, poff,
                                            np.zeros(plen, np.float64), doff, vnew, den, dt.itemsize, coef,
                                            check)))
        apply.append((_coupled_apply, n, (a_th, a_g, a_m, a_vc, cols, utens, ustart, ustop, doff, vnew, den,
                                          dt.itemsize, coef)))
    return reduce, apply


def _step(params, grads, m, v, coupled, check, hyperparams) -> bool:
    yes = [i for i, c in enumerate(coupled) if c]
    no = [i for i, c in enumerate(coupled) if not c]

    def pick(idx, lst):
        return [lst[i] for i in idx]

    pick_hp = {k: (pick(yes, x) if isinstance(x, (list, tuple)) else x) for k, x in hyperparams.items()}
    rest_hp = {k: (pick(no, x) if isinstance(x, (list, tuple)) else x) for k, x in hyperparams.items()}
    reduce, apply = _coupled_launches(pick(yes, params), pick(yes, grads), pick(yes, m), pick(yes, v), check,
                                      pick_hp)
    adamw = adam_launches(pick(no, params), pick(no, grads), pick(no, m), pick(no, v), decoupled=True, **rest_hp)
    with KERNEL_LOCK:
        if check and not all_finite(pick(no, grads)):   # the AdamW tensors have no reduction to check in
            return False
        return run_phases(reduce, apply + adamw, check)


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam.

    ``coupled[i]`` True: a V×d tensor with v[i] of shape (d,); False: AdamW with
    v[i] like params[i]. Every launch of both kinds is prepared before any runs."""
    _step(params, grads, m, v, coupled, False,
          dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay))


def coupled_adam_step_checked(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay,
                              coupled) -> bool:
    """:func:`coupled_adam_step` that returns False, having written nothing, when a gradient
    holds NaN or Inf: the coupled ones are checked by the column sums they need anyway."""
    return _step(params, grads, m, v, coupled, True,
                 dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay))
