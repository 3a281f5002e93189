"""Adam on the GPU: one fused, multi-tensor CUDA kernel (reference: refimpl/adam.py).

One pass per step: read θ, g, m, v; write θ, m, v (28 B per float32 element),
one launch per dtype whatever the number of tensors. Arithmetic in the parameter
dtype in the reference's order (no FMA contraction, no flush-to-zero): float32
and float64 results equal the reference bit for bit (tested on the CPU emulator).
The host scalars (step size α/(1-β1^t), √(1-β2^t)) come from the rule's
descriptor in float64 and are rounded to the parameter dtype once. The same
kernel runs AdamW (``adamw.py``, mode 2) and the uncoupled tensors of Coupled Adam.
"""

from fisheropt.refimpl.adam import RULE

from ._kernels import Kernel
from ._plan import current

__all__ = ["adam_step", "adam_launches"]

ADAM, ADAM_L2, ADAMW = 0, 1, 2  # how weight decay enters (the kernel's ``mode``)

KERNELS = {
    # ---- Adam (mode 0: no decay, 1: L2 decay g += weight_decay*θ) and AdamW (mode 2: θ *= decay_factor,
    # decay_factor = 1 - lr*weight_decay).
    "adam": Kernel(
        [
            ("const long long*", "chunks"),
            ("const unsigned long long*", "param_ptrs"),
            ("const unsigned long long*", "grad_ptrs"),
            ("const unsigned long long*", "m_ptrs"),
            ("const unsigned long long*", "v_ptrs"),
            ("int", "mode"),
            ("T", "weight_decay"),
            ("T", "decay_factor"),
            ("T", "beta1"),
            ("T", "one_minus_beta1"),
            ("T", "beta2"),
            ("T", "one_minus_beta2"),
            ("T", "step_size"),
            ("T", "bias_correction2_sqrt"),
            ("T", "eps"),
        ],
        r"""
    CHUNK_HEADER
    TENSOR(T, theta, param_ptrs);
    TENSOR(const T, g, grad_ptrs);
    TENSOR(T, m, m_ptrs);
    TENSOR(T, v, v_ptrs);
    const bool aligned = aligned16(param_ptrs[t] | grad_ptrs[t] | m_ptrs[t] | v_ptrs[t]);
    FOR_GROUPS(base) {
        const bool full = aligned && base + VEC <= stop;
        T theta_group[VEC], g_group[VEC], m_group[VEC], v_group[VEC];
        load_group(theta, base, stop, full, theta_group);
        load_group(g, base, stop, full, g_group);
        load_group(m, base, stop, full, m_group);
        load_group(v, base, stop, full, v_group);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            T gi = g_group[k];
            if (mode == 1) gi = gi + weight_decay * theta_group[k];
            if (mode == 2) theta_group[k] = theta_group[k] * decay_factor;
            m_group[k] = beta1 * m_group[k] + one_minus_beta1 * gi;
            v_group[k] = beta2 * v_group[k] + one_minus_beta2 * (gi * gi);
            const T denom = {SQRT}(v_group[k]) / bias_correction2_sqrt + eps;
            theta_group[k] = theta_group[k] - step_size * (m_group[k] / denom);
        }
        store_group(theta, base, stop, full, theta_group);
        store_group(m, base, stop, full, m_group);
        store_group(v, base, stop, full, v_group);
    }
""",
    )
}


def adam_scalars(*, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """One tensor's kernel scalars, float64 on the host (rounded to its dtype at the launch)."""
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    return dict(
        mode=ADAMW if decoupled else (ADAM_L2 if weight_decay != 0 else ADAM),
        weight_decay=weight_decay,
        decay_factor=1 - lr * weight_decay,
        beta1=beta1,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        step_size=c["step_size"],
        bias_correction2_sqrt=c["bias_correction2_sqrt"],
        eps=eps,
    )


def adam_launches(engine, params, grads, m, v, *, decoupled, **hyperparams) -> list:
    """The launches of one Adam (``decoupled``: AdamW) step, every argument converted: one per
    dtype and set of host scalars. Nothing is written until they run."""
    return [
        engine.prepared_from("adam", dtype, plan.n_chunks, {**plan.tables, **pointers, **scalars})
        for dtype, scalars, plan, pointers in engine.launch_groups(
            "elem",
            adam_scalars,
            {**hyperparams, "decoupled": decoupled},
            param_ptrs=params,
            grad_ptrs=grads,
            m_ptrs=m,
            v_ptrs=v,
        )
    ]


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam (L2 decay, as torch.optim.Adam)."""
    engine = current()
    engine.run(
        adam_launches(
            engine,
            params,
            grads,
            m,
            v,
            decoupled=False,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
        )
    )
