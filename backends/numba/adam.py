"""Adam and AdamW on the CPU: one fused, multi-tensor Numba kernel (reference: refimpl/adam.py, adamw.py).

One pass per step: read θ, g, m, v; write θ, m, v (28 B per float32 element).
Arithmetic in the parameter dtype in the reference's order, every coefficient
computed in float64 on the host (backends/_host.py, from the rule's descriptor)
and rounded to the parameter dtype; no fastmath, no FMA contraction: float32 and float64
results equal the reference bit for bit (tested). Each tensor reads its own
row of the coefficient table, so param groups with their own learning rate
and parameters with their own step count still take one launch per dtype.
"""

import numpy as np
from numba import njit, prange

from fisheropt.backends._host import DECOUPLED_DECAY, L2_DECAY, adam_scalars

from ._core import PLANS, addresses, as_pointer, dtype_groups, flat_chunks, per_tensor_table, run_all

__all__ = ["adam_step", "adam_launches"]

# The per-tensor table of host scalars (backends/_host.adam_scalars), in the kernel's column order.
COLUMNS = (
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "bias_correction2_sqrt",
    "eps",
    "step_size",
    "weight_decay",
    "decay_factor",
)


@njit(parallel=True, cache=True)
def _adam_kernel(theta_addrs, grad_addrs, m_addrs, v_addrs, chunk_tensor, chunk_start, chunk_stop, coef, mode):
    # coef[t]: COLUMNS in the parameter dtype; mode[t]: how weight decay enters (backends/_host.py).
    # One loop per kind of decay: it is the same for every element of a chunk, and each loop
    # vectorizes alone; no decay is the decoupled loop with the factor 1 (θ·1 is θ, bit for bit).
    one = coef.dtype.type(1)
    for c in prange(chunk_tensor.size):
        t = chunk_tensor[c]
        beta1, one_minus_beta1, beta2, one_minus_beta2 = coef[t, 0], coef[t, 1], coef[t, 2], coef[t, 3]
        bias_correction2_sqrt, eps, step_size = coef[t, 4], coef[t, 5], coef[t, 6]
        theta = as_pointer(theta_addrs[t], beta1)
        g = as_pointer(grad_addrs[t], beta1)
        m = as_pointer(m_addrs[t], beta1)
        v = as_pointer(v_addrs[t], beta1)
        start = chunk_start[c]
        stop = chunk_stop[c]
        if mode[t] == L2_DECAY:
            weight_decay = coef[t, 7]
            for i in range(start, stop):
                ti = theta[i]
                gi = g[i] + weight_decay * ti
                mi = beta1 * m[i] + one_minus_beta1 * gi
                vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                theta[i] = ti - step_size * (mi / (np.sqrt(vi) / bias_correction2_sqrt + eps))
        else:
            decay_factor = coef[t, 8] if mode[t] == DECOUPLED_DECAY else one
            for i in range(start, stop):
                gi = g[i]
                mi = beta1 * m[i] + one_minus_beta1 * gi
                vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
                m[i] = mi
                v[i] = vi
                theta[i] = theta[i] * decay_factor - step_size * (mi / (np.sqrt(vi) / bias_correction2_sqrt + eps))


def build_flat_plan(lists):
    """Per dtype group of lists[0]: (dtype, idx, addresses of each list, chunk table, sizes, n)."""
    params = lists[0]
    plan = []
    for dt, idx in dtype_groups(params):
        chunk_tensor, start, stop, first = flat_chunks([params[i].size for i in idx])
        sizes = np.array([params[i].size for i in idx], dtype=np.int64)
        plan.append(
            (dt, idx, [addresses(lst, idx) for lst in lists], chunk_tensor, start, stop, first, sizes, int(sizes.sum()))
        )
    return plan


def adam_launches(params, grads, m, v, *, decoupled, **hyperparams):
    """The launches of one Adam (or, ``decoupled``, AdamW) step, every argument allocated;
    nothing is written until they run (backends/interface.py, all or nothing)."""
    if not params:
        return []
    values = {**hyperparams, "decoupled": decoupled}
    launches = []
    for dt, idx, (theta_addrs, m_addrs, v_addrs), chunk_tensor, start, stop, _first, _sizes, n in PLANS.get(
        "adam", (params, m, v), build_flat_plan
    ):
        launches.append(
            (
                _adam_kernel,
                n,
                (
                    theta_addrs,
                    addresses(grads, idx),
                    m_addrs,
                    v_addrs,
                    chunk_tensor,
                    start,
                    stop,
                    per_tensor_table(idx, adam_scalars, values, dt, COLUMNS),
                    per_tensor_table(idx, adam_scalars, values, np.int64, ("mode",))[:, 0].copy(),
                ),
            )
        )
    return launches


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam (L2 decay, as torch.optim.Adam)."""
    hyperparams = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    run_all(adam_launches(params, grads, m, v, decoupled=False, **hyperparams))
