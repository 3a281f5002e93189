"""Adam and AdamW on the CPU: one fused, multi-tensor Numba kernel (reference: refimpl/adam.py, adamw.py).

One pass per step: read θ, g, m, v; write θ, m, v (28 B per float32 element).
Arithmetic in the parameter dtype in the reference's order, every coefficient
computed in float64 by the rule's descriptor and rounded to the parameter
dtype on the host; no fastmath, no FMA contraction: float32 and float64
results equal the reference bit for bit (tested). Each tensor reads its own
row of the coefficient table, so param groups with their own learning rate
and parameters with their own step count still take one launch per dtype.
"""
import numpy as np
from numba import njit, prange

from fisheropt.refimpl.adam import RULE

from ._core import PLANS, addresses, as_pointer, dtype_groups, flat_chunks, per_tensor_table, run_all

__all__ = ["adam_step", "adam_launches"]

ADAM, ADAM_L2, ADAMW = 0, 1, 2   # how weight decay enters, per tensor


@njit(parallel=True, cache=True)
def _adam_kernel(a_th, a_g, a_m, a_v, ctens, cstart, cstop, coef, mode):
    # coef[t] = (β1, 1-β1, β2, 1-β2, √(1-β2^t), ε, step size, wd); for ADAMW, wd holds 1 - lr·λ.
    for c in prange(ctens.size):
        t = ctens[c]
        b1, omb1, b2, omb2 = coef[t, 0], coef[t, 1], coef[t, 2], coef[t, 3]
        bc2, eps, step_size, wd = coef[t, 4], coef[t, 5], coef[t, 6], coef[t, 7]
        th = as_pointer(a_th[t], b1)
        g = as_pointer(a_g[t], b1)
        m = as_pointer(a_m[t], b1)
        v = as_pointer(a_v[t], b1)
        s = cstart[c]
        e = cstop[c]
        if mode[t] == ADAMW:
            for i in range(s, e):
                gi = g[i]
                mi = b1 * m[i] + omb1 * gi
                vi = b2 * v[i] + omb2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                th[i] = th[i] * wd - step_size * (mi / (np.sqrt(vi) / bc2 + eps))
        elif mode[t] == ADAM_L2:
            for i in range(s, e):
                ti = th[i]
                gi = g[i] + wd * ti
                mi = b1 * m[i] + omb1 * gi
                vi = b2 * v[i] + omb2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                th[i] = ti - step_size * (mi / (np.sqrt(vi) / bc2 + eps))
        else:
            for i in range(s, e):
                gi = g[i]
                mi = b1 * m[i] + omb1 * gi
                vi = b2 * v[i] + omb2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                th[i] = th[i] - step_size * (mi / (np.sqrt(vi) / bc2 + eps))


def build_flat_plan(lists):
    """Per dtype group of lists[0]: (dtype, idx, addresses of each list, chunk table, sizes, n)."""
    params = lists[0]
    plan = []
    for dt, idx in dtype_groups(params):
        tens, start, stop, first = flat_chunks([params[i].size for i in idx])
        sizes = np.array([params[i].size for i in idx], dtype=np.int64)
        plan.append((dt, idx, [addresses(lst, idx) for lst in lists], tens, start, stop, first,
                     sizes, int(sizes.sum())))
    return plan


def _row(*, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    wd = 1 - lr * weight_decay if decoupled else weight_decay
    return (beta1, 1 - beta1, beta2, 1 - beta2, c["bias_correction2_sqrt"], eps, c["step_size"], wd)


def _mode(*, weight_decay, decoupled, **_):
    return (ADAMW if decoupled else (ADAM_L2 if weight_decay != 0 else ADAM),)


def adam_launches(params, grads, m, v, *, decoupled, **hyperparams):
    """The launches of one Adam (or, ``decoupled``, AdamW) step, every argument allocated;
    nothing is written until they run (backends/interface.py, all or nothing)."""
    if not params:
        return []
    values = {**hyperparams, "decoupled": decoupled}
    launches = []
    for dt, idx, (a_th, a_m, a_v), tens, start, stop, _first, _sizes, n in PLANS.get(
            "adam", (params, m, v), build_flat_plan):
        launches.append((_adam_kernel, n, (a_th, addresses(grads, idx), a_m, a_v, tens, start, stop,
                                           per_tensor_table(idx, _row, values, dt),
                                           per_tensor_table(idx, _mode, values, np.int64)[:, 0].copy())))
    return launches


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam."""
    run_all(adam_launches(params, grads, m, v, decoupled=False, step=step, lr=lr, beta1=beta1, beta2=beta2,
                          eps=eps, weight_decay=weight_decay))
