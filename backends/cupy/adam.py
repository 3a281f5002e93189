"""Adam on the GPU: one fused, multi-tensor CUDA kernel (reference: refimpl/adam.py).

One pass per step: read θ, g, m, v; write θ, m, v (28 B per float32 element),
one launch per dtype whatever the number of tensors. Arithmetic in the parameter
dtype in the reference's order (no FMA contraction, no flush-to-zero): float32
and float64 results equal the reference bit for bit (tested on the CPU emulator).
The host scalars (step size α/(1-β1^t), √(1-β2^t), ...) come from
backends/_host.py in float64 and are rounded to the parameter dtype once. The same
kernel runs AdamW (``adamw.py``, mode 2) and the uncoupled tensors of Coupled Adam.
"""

from fisheropt.backends._host import adam_scalars

from ._kernels import streaming_kernel
from ._plan import current

__all__ = ["adam_step", "adam_launches"]

KERNELS = {
    # ---- Adam (mode 0: no decay, 1: L2 decay g += weight_decay*θ) and AdamW (mode 2: θ *= decay_factor,
    # decay_factor = 1 - lr*weight_decay); the modes of backends/_host.py.
    "adam": streaming_kernel(
        {"theta": "param_ptrs", "g": "grad_ptrs", "m": "m_ptrs", "v": "v_ptrs"},
        "int mode, T weight_decay, T decay_factor, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, "
        "T step_size, T bias_correction2_sqrt, T eps",
        r"""
            T gi = g_group[k];
            if (mode == 1) gi = gi + weight_decay * theta_group[k];
            if (mode == 2) theta_group[k] = theta_group[k] * decay_factor;
            m_group[k] = beta1 * m_group[k] + one_minus_beta1 * gi;
            v_group[k] = beta2 * v_group[k] + one_minus_beta2 * (gi * gi);
            const T denom = {SQRT}(v_group[k]) / bias_correction2_sqrt + eps;
            theta_group[k] = theta_group[k] - step_size * (m_group[k] / denom);
        """,
        written=("theta", "m", "v"),
    )
}


def adam_launches(engine, params, grads, m, v, *, decoupled, **hyperparams) -> list:
    """The launches of one Adam (``decoupled``: AdamW) step, every argument converted: one per
    dtype and set of host scalars. Nothing is written until they run."""
    arrays = dict(param_ptrs=params, grad_ptrs=grads, m_ptrs=m, v_ptrs=v)
    return engine.streaming_launches("adam", adam_scalars, {**hyperparams, "decoupled": decoupled}, arrays)


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam (L2 decay, as torch.optim.Adam)."""
    engine = current()
    hyperparams = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    engine.run(adam_launches(engine, params, grads, m, v, decoupled=False, **hyperparams))
