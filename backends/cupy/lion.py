"""Lion on the GPU: one fused, multi-tensor CUDA kernel (reference: refimpl/lion.py).

One pass per step: read θ, g, m; write θ, m (20 B per float32 element), one launch
per dtype whatever the number of tensors (and whatever their step counts: Lion
has no bias correction, so its host scalars do not depend on t). Arithmetic in
the parameter dtype in spec/lion.md's order of operations, with no FMA
contraction and no flush-to-zero: float32 and float64 results equal the
reference bit for bit, sign(0) = 0, NaN and ±Inf and subnormals included
(tested on the CPU emulator).
"""

from fisheropt.backends._host import lion_scalars

from ._kernels import streaming_kernel
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
    "lion": streaming_kernel(
        {"theta": "param_ptrs", "g": "grad_ptrs", "m": "m_ptrs"},
        "T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T lr, T weight_decay",
        r"""
            const T c = beta1 * m_group[k] + one_minus_beta1 * g_group[k];
            const T decay = weight_decay * theta_group[k];
            const T update = lion_sign(c) + decay;
            theta_group[k] = theta_group[k] - lr * update;
            m_group[k] = beta2 * m_group[k] + one_minus_beta2 * g_group[k];
        """,
        written=("theta", "m"),
    )
}


def lion_launches(engine, params, grads, m, **hyperparams) -> list:
    """The launches of one Lion step, every argument converted: one per dtype and set of host
    scalars. Nothing is written until they run."""
    arrays = dict(param_ptrs=params, grad_ptrs=grads, m_ptrs=m)
    return engine.streaming_launches("lion", lion_scalars, hyperparams, arrays)


def lion_step(params, grads, m, *, step, lr, beta1, beta2, weight_decay):
    """Multi-tensor, in place: the backend interface for Lion."""
    engine = current()
    hyperparams = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    engine.run(lion_launches(engine, params, grads, m, **hyperparams))
