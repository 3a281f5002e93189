"""Lion on the CPU: one fused, multi-tensor Numba kernel (reference: refimpl/lion.py).

One pass per step: read θ, g, m; write θ, m (20 B per float32 element). Arithmetic
in the parameter dtype in the reference's order (spec/lion.md), coefficients
rounded on the host, no FMA contraction: the same bits as the reference.
"""

from numba import njit, prange

from fisheropt.backends._host import lion_scalars

from ._core import PLANS, addresses, as_pointer, per_tensor_table, run_all
from .adam import build_flat_plan

__all__ = ["lion_step"]

# The per-tensor table of host scalars (backends/_host.lion_scalars), in the kernel's column order.
COLUMNS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "lr", "weight_decay")


@njit(cache=True, inline="always")
def _sign(x, zero, one):
    # sign(0) = 0, sign(NaN) = NaN, as np.sign
    if x > zero:
        return one
    if x < zero:
        return -one
    return x - x if x != x else zero


@njit(parallel=True, cache=True)
def _lion_kernel(theta_addrs, grad_addrs, m_addrs, chunk_tensor, chunk_start, chunk_stop, coef):
    # coef[t]: COLUMNS in the parameter dtype.
    zero = coef.dtype.type(0)  # typed constants: a Python 1 would promote float32 sums to float64
    one = coef.dtype.type(1)
    for c in prange(chunk_tensor.size):
        t = chunk_tensor[c]
        beta1, one_minus_beta1, beta2, one_minus_beta2 = coef[t, 0], coef[t, 1], coef[t, 2], coef[t, 3]
        lr, weight_decay = coef[t, 4], coef[t, 5]
        theta = as_pointer(theta_addrs[t], beta1)
        g = as_pointer(grad_addrs[t], beta1)
        m = as_pointer(m_addrs[t], beta1)
        for i in range(chunk_start[c], chunk_stop[c]):
            gi = g[i]
            mi = m[i]
            ti = theta[i]
            theta[i] = ti - lr * (_sign(beta1 * mi + one_minus_beta1 * gi, zero, one) + weight_decay * ti)
            m[i] = beta2 * mi + one_minus_beta2 * gi


def lion_step(params, grads, m, *, step, lr, beta1, beta2, weight_decay):
    """Multi-tensor, in place: the backend interface for Lion."""
    if not params:
        return
    values = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    run_all(
        [
            (
                _lion_kernel,
                n,
                (
                    theta_addrs,
                    addresses(grads, idx),
                    m_addrs,
                    chunk_tensor,
                    start,
                    stop,
                    per_tensor_table(idx, lion_scalars, values, dt, COLUMNS),
                ),
            )
            for dt, idx, (theta_addrs, m_addrs), chunk_tensor, start, stop, _first, _sizes, n in PLANS.get(
                "lion", (params, m), build_flat_plan
            )
        ]
    )
