"""Lion on the CPU: one fused, multi-tensor Numba kernel (reference: refimpl/lion.py).

One pass per step: read θ, g, m; write θ, m (20 B per float32 element). Arithmetic
in the parameter dtype in the reference's order (spec/lion.md), coefficients
rounded on the host, no FMA contraction: the same bits as the reference.
"""
import numpy as np
from numba import njit, prange

from ._core import PLANS, addresses, as_pointer, per_tensor_table, run_all
from .adam import build_flat_plan

__all__ = ["lion_step"]


@njit(cache=True, inline="always")
def _sign(x, zero, one):
    # sign(0) = 0, sign(NaN) = NaN, as np.sign
    if x > zero:
        return one
    if x < zero:
        return -one
    return x - x if x != x else zero


@njit(parallel=True, cache=True)
def _lion_kernel(a_th, a_g, a_m, ctens, cstart, cstop, coef):
    # coef[t] = (β1, 1-β1, β2, 1-β2, lr, λ) in the parameter dtype.
    zero = coef.dtype.type(0)   # typed constants: a Python 1 would promote float32 sums to float64
    one = coef.dtype.type(1)
    for c in prange(ctens.size):
        t = ctens[c]
        b1, omb1, b2, omb2, lr, wd = coef[t, 0], coef[t, 1], coef[t, 2], coef[t, 3], coef[t, 4], coef[t, 5]
        th = as_pointer(a_th[t], b1)
        g = as_pointer(a_g[t], b1)
        m = as_pointer(a_m[t], b1)
        for i in range(cstart[c], cstop[c]):
            gi = g[i]
            mi = m[i]
            ti = th[i]
            th[i] = ti - lr * (_sign(b1 * mi + omb1 * gi, zero, one) + wd * ti)
            m[i] = b2 * mi + omb2 * gi


def _row(*, step, lr, beta1, beta2, weight_decay):
    return (beta1, 1 - beta1, beta2, 1 - beta2, lr, weight_decay)


def lion_step(params, grads, m, *, step, lr, beta1, beta2, weight_decay):
    """Multi-tensor, in place: the backend interface for Lion."""
    if not params:
        return
    values = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    run_all([(_lion_kernel, n, (a_th, addresses(grads, idx), a_m, tens, start, stop,
                                per_tensor_table(idx, _row, values, dt)))
             for dt, idx, (a_th, a_m), tens, start, stop, _first, _sizes, n in PLANS.get(
                 "lion", (params, m), build_flat_plan)])
