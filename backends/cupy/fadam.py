"""FAdam on the GPU: fused, multi-tensor CUDA kernels (reference: refimpl/fadam.py).

Per dtype and set of host scalars, five launches whatever the number of tensors,
with no host synchronisation: ε_t and the two clip scales of every tensor are
computed on the device from deterministic float64 two-stage reductions (fixed
order, no atomics):

1. ``sumsq``: per chunk, Σg² (read g, 4 B per float32 element);
2. ``fadam_eps`` (one block per tensor): RMS(g) and ε_t = min(ε, ε₂·RMS(g))^{2p}, as
   ``refimpl.fadam.adaptive_epsilon``;
3. ``fadam_precond``: f ← β̂₂f + (1-β̂₂)g² (written), per chunk Σḡ² and Σw̄² (read θ, g, f;
   write f: 16 B);
4. ``fadam_scales`` (one block per tensor): the clip scales max(1, RMS/c);
5. ``fadam_apply``: m ← β₁m + (1-β₁)ḡ/s_g, θ ← θ - lr(m + λ w̄/s_w) (read θ, g, m, f;
   write θ, m: 24 B).

Elementwise arithmetic in the parameter dtype in the reference's order (it
divides, where the numba kernels multiply by reciprocals); β̂₂ comes from the
rule's descriptor. ``fadam_step_checked`` fuses the finiteness check into pass 1
(see there).
"""

import numpy as np

from fisheropt.refimpl.fadam import RULE

from ._kernels import Kernel
from ._plan import current
from .finite import exactly_finite, partials_finite_launch

__all__ = ["fadam_step", "fadam_step_checked", "fadam_launches"]

DEVICE_CODE = r"""
// f^p for FAdam: pow_mode 0 -> sqrt (p = 0.5), 1 -> f (p = 1), 2 -> pow(f, p).
__device__ __forceinline__ T pow_p(T x, int pow_mode, T p) {
    return pow_mode == 0 ? {SQRT}(x) : (pow_mode == 1 ? x : {POW}(x, p));
}
"""

# Per tensor t, tensor_scalars[3t .. 3t+2] = (ε_t, clip scale of ḡ, clip scale of w̄) in float64.
KERNELS = {
    # ---- FAdam pass 1: per-chunk float64 sum of g^2 (for RMS(g)).
    "sumsq": Kernel(
        [("const long long*", "chunks"), ("const unsigned long long*", "grad_ptrs"), ("double*", "g2_partials")],
        r"""
    CHUNK_HEADER
    TENSOR(const T, g, grad_ptrs);
    const bool aligned = aligned16(grad_ptrs[t]);
    double acc = 0;
    FOR_GROUPS(base) {
        const bool full = aligned && base + VEC <= stop;
        T g_group[VEC];
        load_group(g, base, stop, full, g_group);
#pragma unroll
        for (int k = 0; k < VEC; ++k) { const double x = (double)g_group[k]; acc += x * x; }
    }
    __shared__ double shared[BLOCK];
    const double sum = block_sum(acc, shared);
    if (threadIdx.x == 0) g2_partials[blockIdx.x] = sum;
""",
    ),
    # ---- FAdam finalize 1 (one block per tensor): eps_t from RMS(g), as refimpl.fadam.adaptive_epsilon.
    "fadam_eps": Kernel(
        [
            ("const long long*", "meta"),
            ("const double*", "g2_partials"),
            ("double*", "tensor_scalars"),
            ("double", "eps"),
            ("double", "eps2"),
            ("double", "two_p"),
            ("int", "two_p_is_one"),
            ("T", "eps_pow_2p"),
            ("T", "tiny"),
        ],
        r"""
    const long long* tensor_meta = meta + (long long)META_ROW * blockIdx.x;
    const long long n = tensor_meta[0], chunk_begin = tensor_meta[1], chunk_end = tensor_meta[2];
    double acc = 0;
    for (long long c = chunk_begin + threadIdx.x; c < chunk_end; c += BLOCK) acc += g2_partials[c];
    __shared__ double shared[BLOCK];
    const double sum = block_sum(acc, shared);
    if (threadIdx.x == 0) {
        const double rms = (n == 0) ? 0.0 : sqrt(sum / (double)n);
        const double x = eps2 * rms;
        const double smaller = (x < eps) ? x : eps;                     // Python min(eps, eps2*rms)
        const double powered = two_p_is_one ? smaller : pow(smaller, two_p);  // ** (2p)
        T eps_t = (T)powered;
        if (eps_t == (T)0) eps_t = eps_pow_2p;                          // eps ** (2p) where that is 0
        if (tiny > eps_t) eps_t = tiny;                                 // max(eps_t, finfo.tiny)
        tensor_scalars[3 * blockIdx.x] = (double)eps_t;
    }
""",
        kind="finalize",
    ),
    # ---- FAdam pass 2: f update (written), float64 sums of g_bar^2 and w_bar^2 per chunk.
    "fadam_precond": Kernel(
        [
            ("const long long*", "chunks"),
            ("const unsigned long long*", "param_ptrs"),
            ("const unsigned long long*", "grad_ptrs"),
            ("const unsigned long long*", "f_ptrs"),
            ("const double*", "tensor_scalars"),
            ("double*", "clip_partials"),
            ("T", "beta2_hat"),
            ("T", "one_minus_beta2_hat"),
            ("int", "pow_mode"),
            ("T", "p"),
        ],
        r"""
    CHUNK_HEADER
    TENSOR(const T, theta, param_ptrs);
    TENSOR(const T, g, grad_ptrs);
    TENSOR(T, f, f_ptrs);
    const bool aligned = aligned16(param_ptrs[t] | grad_ptrs[t] | f_ptrs[t]);
    const T eps_t = (T)tensor_scalars[3 * t];
    double sum_g_bar2 = 0, sum_w_bar2 = 0;
    FOR_GROUPS(base) {
        const bool full = aligned && base + VEC <= stop;
        T theta_group[VEC], g_group[VEC], f_group[VEC];
        load_group(theta, base, stop, full, theta_group);
        load_group(g, base, stop, full, g_group);
        load_group(f, base, stop, full, f_group);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T fi = beta2_hat * f_group[k] + one_minus_beta2_hat * (g_group[k] * g_group[k]);
            f_group[k] = fi;
            const T denom = pow_p(fi, pow_mode, p) + eps_t;
            const T g_bar = g_group[k] / denom;
            const T w_bar = theta_group[k] / denom;
            if (full || base + k < stop) {
                const double g_bar64 = (double)g_bar;
                const double w_bar64 = (double)w_bar;
                sum_g_bar2 += g_bar64 * g_bar64;
                sum_w_bar2 += w_bar64 * w_bar64;
            }
        }
        store_group(f, base, stop, full, f_group);
    }
    __shared__ double shared[BLOCK];
    const double block_g_bar2 = block_sum(sum_g_bar2, shared);
    const double block_w_bar2 = block_sum(sum_w_bar2, shared);
    if (threadIdx.x == 0) {
        clip_partials[2 * (long long)blockIdx.x] = block_g_bar2;
        clip_partials[2 * (long long)blockIdx.x + 1] = block_w_bar2;
    }
""",
    ),
    # ---- FAdam finalize 2 (one block per tensor): clip scales max(1, RMS/c) for g_bar and w_bar.
    "fadam_scales": Kernel(
        [
            ("const long long*", "meta"),
            ("const double*", "clip_partials"),
            ("double*", "tensor_scalars"),
            ("double", "clip"),
        ],
        r"""
    const long long* tensor_meta = meta + (long long)META_ROW * blockIdx.x;
    const long long n = tensor_meta[0], chunk_begin = tensor_meta[1], chunk_end = tensor_meta[2];
    double sum_g_bar2 = 0, sum_w_bar2 = 0;
    for (long long c = chunk_begin + threadIdx.x; c < chunk_end; c += BLOCK) {
        sum_g_bar2 += clip_partials[2 * c];
        sum_w_bar2 += clip_partials[2 * c + 1];
    }
    __shared__ double shared[BLOCK];
    const double total_g_bar2 = block_sum(sum_g_bar2, shared);
    const double total_w_bar2 = block_sum(sum_w_bar2, shared);
    if (threadIdx.x == 0) {
        const double ratio_g = ((n == 0) ? 0.0 : sqrt(total_g_bar2 / (double)n)) / clip;
        const double ratio_w = ((n == 0) ? 0.0 : sqrt(total_w_bar2 / (double)n)) / clip;
        tensor_scalars[3 * blockIdx.x + 1] = (ratio_g > 1.0) ? ratio_g : 1.0;    // Python max(1.0, rms/c)
        tensor_scalars[3 * blockIdx.x + 2] = (ratio_w > 1.0) ? ratio_w : 1.0;
    }
""",
        kind="finalize",
    ),
    # ---- FAdam pass 3: momentum of the clipped natural gradient, preconditioned weight decay, θ.
    "fadam_apply": Kernel(
        [
            ("const long long*", "chunks"),
            ("const unsigned long long*", "param_ptrs"),
            ("const unsigned long long*", "grad_ptrs"),
            ("const unsigned long long*", "m_ptrs"),
            ("const unsigned long long*", "f_ptrs"),
            ("const double*", "tensor_scalars"),
            ("int", "pow_mode"),
            ("T", "p"),
            ("T", "beta1"),
            ("T", "one_minus_beta1"),
            ("T", "lr"),
            ("T", "weight_decay"),
        ],
        r"""
    CHUNK_HEADER
    TENSOR(T, theta, param_ptrs);
    TENSOR(const T, g, grad_ptrs);
    TENSOR(T, m, m_ptrs);
    TENSOR(const T, f, f_ptrs);
    const bool aligned = aligned16(param_ptrs[t] | grad_ptrs[t] | m_ptrs[t] | f_ptrs[t]);
    const T eps_t = (T)tensor_scalars[3 * t];
    const T clip_g = (T)tensor_scalars[3 * t + 1];
    const T clip_w = (T)tensor_scalars[3 * t + 2];
    FOR_GROUPS(base) {
        const bool full = aligned && base + VEC <= stop;
        T theta_group[VEC], g_group[VEC], m_group[VEC], f_group[VEC];
        load_group(theta, base, stop, full, theta_group);
        load_group(g, base, stop, full, g_group);
        load_group(m, base, stop, full, m_group);
        load_group(f, base, stop, full, f_group);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T denom = pow_p(f_group[k], pow_mode, p) + eps_t;
            T g_bar = g_group[k] / denom;
            g_bar = g_bar / clip_g;
            m_group[k] = beta1 * m_group[k] + one_minus_beta1 * g_bar;
            T w_bar = theta_group[k] / denom;
            w_bar = w_bar / clip_w;
            theta_group[k] = theta_group[k] - lr * (m_group[k] + weight_decay * w_bar);
        }
        store_group(theta, base, stop, full, theta_group);
        store_group(m, base, stop, full, m_group);
    }
""",
    ),
}


def fadam_scalars(*, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """One tensor's kernel scalars, float64 on the host (β̂₂ from the rule's descriptor)."""
    beta2_hat = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)["beta2_hat"]
    return dict(
        eps=eps,
        eps2=eps2,
        two_p=2 * p,
        two_p_is_one=int(2 * p == 1),
        eps_pow_2p=eps ** (2 * p),
        beta2_hat=beta2_hat,
        one_minus_beta2_hat=1 - beta2_hat,
        pow_mode=0 if p == 0.5 else (1 if p == 1 else 2),
        p=p,
        clip=clip,
        beta1=beta1,
        one_minus_beta1=1 - beta1,
        lr=lr,
        weight_decay=weight_decay,
    )


def fadam_launches(engine, params, grads, m, f, *, check=False, flag=None, **hyperparams):
    """(reductions, the rest): the launches of one step, every argument converted.

    The first list reads only (pass 1, and with ``check`` the test of its partial sums,
    which sets ``flag``); the second writes. One set per dtype and set of host scalars,
    each group with its own scratch."""
    first, rest = [], []
    for dtype, scalars, plan, pointers in engine.launch_groups(
        "elem", fadam_scalars, hyperparams, param_ptrs=params, grad_ptrs=grads, m_ptrs=m, f_ptrs=f
    ):
        g2_partials, clip_partials, tensor_scalars = plan.scratch(
            "fadam", plan.n_chunks, 2 * plan.n_chunks, 3 * plan.n_tensors
        )
        available = {
            **plan.tables,
            **pointers,
            **scalars,
            "g2_partials": g2_partials,
            "clip_partials": clip_partials,
            "tensor_scalars": tensor_scalars,
            "tiny": np.finfo(dtype).tiny,
        }
        first.append(engine.prepared_from("sumsq", dtype, plan.n_chunks, available))
        if check:
            first.append(partials_finite_launch(engine, dtype, g2_partials, plan.n_chunks, flag))
        rest += [
            engine.prepared_from(name, dtype, grid, available)
            for name, grid in (
                ("fadam_eps", plan.n_tensors),
                ("fadam_precond", plan.n_chunks),
                ("fadam_scales", plan.n_tensors),
                ("fadam_apply", plan.n_chunks),
            )
        ]
    return first, rest


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: the backend interface for FAdam (no host synchronisation)."""
    engine = current()
    first, rest = fadam_launches(
        engine,
        params,
        grads,
        m,
        f,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        eps2=eps2,
        clip=clip,
        p=p,
        weight_decay=weight_decay,
    )
    engine.run(first + rest)


def fadam_step_checked(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay) -> bool:
    """:func:`fadam_step` that returns False, having written nothing, when a gradient holds
    NaN or Inf.

    Pass 1 reads g anyway: its float64 partial sums are checked on the device (a launch
    over n_chunks doubles) and the flag read back before any write, instead of the
    optimizer's separate all_finite pass over g: 44 B per float32 element instead of 48,
    and the same single host synchronisation per step. A float64 g above 1e154 overflows
    Σg² although finite: only then are the gradients read again, to tell the two apart."""
    engine = current()
    flag = engine.new_flag()
    first, rest = fadam_launches(
        engine,
        params,
        grads,
        m,
        f,
        check=True,
        flag=flag,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        eps2=eps2,
        clip=clip,
        p=p,
        weight_decay=weight_decay,
    )
    engine.run(first)
    if engine.flag_set(flag) and not exactly_finite(engine, grads):
        return False
    engine.run(rest)
    return True
