"""Lion on the GPU: one fused, multi-tensor CUDA kernel (reference: refimpl/lion.py).

One pass per step: read θ, g, m; write θ, m (20 B per float32 element), one launch
per dtype whatever the number of tensors (and whatever their step counts: Lion
has no bias correction, so its host scalars do not depend on t). Arithmetic in
the parameter dtype in spec/lion.md's order of operations, with no FMA
contraction and no flush-to-zero: float32 and float64 results equal the
reference bit for bit, sign(0) = 0, NaN and ±Inf and subnormals included
(tested on the CPU emulator).
"""

from fisheropt.refimpl.lion import RULE

from ._kernels import Kernel
from ._plan import current

__all__ = ["lion_step", "lion_launches"]

DEVICE_CODE = r"""
// np.sign: +1 / -1, 0 (a positive zero) for ±0, the NaN itself for NaN.
__device__ __forceinline__ T lion_sign(T c) {
    return c > (T)0 ? (T)1 : (c < (T)0 ? (T)-1 : (c == (T)0 ? (T)0 : c));
}
"""

KERNELS = {
    # ---- Lion: c = beta1·m + (1-beta1)·g (old m); θ = θ − lr·(sign(c) + weight_decay·θ) (old θ);
    # m = beta2·m + (1-beta2)·g.
    "lion": Kernel(
        [
            ("const long long*", "chunks"),
            ("const unsigned long long*", "param_ptrs"),
            ("const unsigned long long*", "grad_ptrs"),
            ("const unsigned long long*", "m_ptrs"),
            ("T", "beta1"),
            ("T", "one_minus_beta1"),
            ("T", "beta2"),
            ("T", "one_minus_beta2"),
            ("T", "lr"),
            ("T", "weight_decay"),
        ],
        r"""
    CHUNK_HEADER
    TENSOR(T, theta, param_ptrs);
    TENSOR(const T, g, grad_ptrs);
    TENSOR(T, m, m_ptrs);
    const bool aligned = aligned16(param_ptrs[t] | grad_ptrs[t] | m_ptrs[t]);
    FOR_GROUPS(base) {
        const bool full = aligned && base + VEC <= stop;
        T theta_group[VEC], g_group[VEC], m_group[VEC];
        load_group(theta, base, stop, full, theta_group);
        load_group(g, base, stop, full, g_group);
        load_group(m, base, stop, full, m_group);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T c = beta1 * m_group[k] + one_minus_beta1 * g_group[k];
            const T decay = weight_decay * theta_group[k];
            const T update = lion_sign(c) + decay;
            theta_group[k] = theta_group[k] - lr * update;
            m_group[k] = beta2 * m_group[k] + one_minus_beta2 * g_group[k];
        }
        store_group(theta, base, stop, full, theta_group);
        store_group(m, base, stop, full, m_group);
    }
""",
    )
}


def lion_scalars(*, step, lr, beta1, beta2, weight_decay):
    """One tensor's kernel scalars, float64 on the host (the descriptor has none that depend on t)."""
    return dict(
        RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay),
        beta1=beta1,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        lr=lr,
        weight_decay=weight_decay,
    )


def lion_launches(engine, params, grads, m, **hyperparams) -> list:
    """The launches of one Lion step, every argument converted: one per dtype and set of host
    scalars. Nothing is written until they run."""
    return [
        engine.prepared_from("lion", dtype, plan.n_chunks, {**plan.tables, **pointers, **scalars})
        for dtype, scalars, plan, pointers in engine.launch_groups(
            "elem", lion_scalars, hyperparams, param_ptrs=params, grad_ptrs=grads, m_ptrs=m
        )
    ]


def lion_step(params, grads, m, *, step, lr, beta1, beta2, weight_decay):
    """Multi-tensor, in place: the backend interface for Lion."""
    engine = current()
    engine.run(
        lion_launches(engine, params, grads, m, step=step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    )
