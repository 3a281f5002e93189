"""FAdam on the GPU: fused, multi-tensor CUDA kernels (reference: refimpl/fadam.py).

Per dtype and set of host scalars, seven launches whatever the number of tensors,
with no host synchronisation: ε_t and the two clip scales of every tensor are
computed on the device from deterministic float64 two-stage reductions (fixed
order, no atomics).

Pass 1 reads θ, g and f and writes scratch only (the sums, ε_t):

1. ``sumsq``: per chunk, Σg² (read g, 4 B per float32 element);
2. ``fadam_tensor_sums`` (one block per tensor): each tensor's chunks added, Σg²;
3. ``fadam_eps`` (a thread per tensor): ε_t = min(ε, ε₂·RMS(g))^{2p} from Σg² and the
   element count, as ``refimpl.fadam.adaptive_epsilon``;
4. ``fadam_sums``: per chunk Σḡ² and Σw̄², the new f ← β̂₂f + (1-β̂₂)g² formed and not
   stored (read θ, g, f: 12 B);
5. ``fadam_tensor_sums`` again: Σḡ², Σw̄² per tensor.

Pass 2 writes:

6. ``fadam_scales`` (a thread per tensor): the clip scales max(1, RMS/c);
7. ``fadam_apply``: f ← β̂₂f + (1-β̂₂)g², m ← β₁m + (1-β₁)ḡ/s_g, θ ← θ - lr(m + λ w̄/s_w)
   (read θ, g, m, f; write θ, m, f: 28 B).

A sharded step (spec/distributed.md §5) is the same two passes: ``fadam_partials``
runs pass 1 with ε_t given (the guess ε^{2p} by default) in place of launch 3 and
reads the per-tensor sums back; ``fadam_apply`` takes the whole tensors' sums and
element counts and runs launches 3, 6 and 7. With a tensor's own sums that is the
single-process step, bit for bit (where ε₂·RMS(g) ≥ ε, ε_t is the host's ε^{2p}, the
guess itself).

Elementwise arithmetic in the parameter dtype in the reference's order (it
divides, where the numba kernels multiply by reciprocals); β̂₂ comes from the
rule's descriptor. ``fadam_step_checked`` fuses the finiteness check into pass 1
(see there).
"""

import math
import textwrap

import numpy as np

from fisheropt.refimpl.fadam import RULE, adaptive_epsilon

from ._kernels import Kernel, streaming_kernel
from ._plan import current
from .finite import exactly_finite, partials_finite_launch

__all__ = ["fadam_step", "fadam_step_checked", "fadam_partials", "fadam_apply"]

DEVICE_CODE = r"""
// f^p for FAdam: pow_mode 0 -> sqrt (p = 0.5), 1 -> f (p = 1), 2 -> pow(f, p).
__device__ __forceinline__ T pow_p(T x, int pow_mode, T p) {
    return pow_mode == 0 ? {SQRT}(x) : (pow_mode == 1 ? x : {POW}(x, p));
}

// FAdam's new f: pass 1 forms it without storing it, so that it writes nothing; pass 2 stores it.
__device__ __forceinline__ T fadam_new_f(T f, T g, T beta2_hat, T one_minus_beta2_hat) {
    return beta2_hat * f + one_minus_beta2_hat * (g * g);
}

// A whole tensor's RMS from its float64 sum of squares and element count (0 when empty).
__device__ __forceinline__ double fadam_rms(double total, long long n) {
    return (n == 0) ? 0.0 : sqrt(total / (double)n);
}
"""


def _per_tensor(signature, body) -> Kernel:
    """A kernel of per-tensor float64 scalar math: a thread per tensor t < n_tensors.

    Per tensor t: tensor_sums[3t .. 3t+2] = (Σg², Σḡ², Σw̄²) and tensor_scalars[3t .. 3t+2] =
    (ε_t, clip scale of ḡ, clip scale of w̄), float64."""
    inner = textwrap.indent(textwrap.dedent(body).strip("\n"), "        ")
    head = "const long long t = (long long)blockIdx.x * BLOCK + threadIdx.x;\n    if (t < n_tensors) {"
    return Kernel([*signature, ("long long", "n_tensors")], f"\n    {head}\n{inner}\n    }}\n", kind="finalize")


KERNELS = {
    "sumsq": streaming_kernel(
        {"g": "grad_ptrs"},
        "double* g2_partials",
        "const double x = (double)g_group[k];\nacc += x * x;",
        before="double acc = 0;",
        after="""
            __shared__ double shared[BLOCK];
            const double sum = block_sum(acc, shared);
            if (threadIdx.x == 0) g2_partials[blockIdx.x] = sum;
        """,
    ),
    # ---- one block per tensor: its chunks' partial sums (``width`` per chunk) added in a fixed
    # tree, into tensor_sums[3t + first ...].
    "fadam_tensor_sums": Kernel(
        [
            ("const long long*", "meta"),
            ("const double*", "partials"),
            ("int", "width"),
            ("int", "first"),
            ("double*", "tensor_sums"),
        ],
        r"""
    const long long* tensor_meta = meta + (long long)META_ROW * blockIdx.x;
    const long long chunk_begin = tensor_meta[1], chunk_end = tensor_meta[2];
    __shared__ double shared[BLOCK];
    for (int k = 0; k < width; ++k) {
        double acc = 0;
        for (long long c = chunk_begin + threadIdx.x; c < chunk_end; c += BLOCK) acc += partials[width * c + k];
        const double sum = block_sum(acc, shared);
        if (threadIdx.x == 0) tensor_sums[3 * (long long)blockIdx.x + first + k] = sum;
    }
""",
        kind="finalize",
    ),
    # ---- ε_t per tensor, as refimpl.fadam.adaptive_epsilon; where the min is ε, the host's ε^{2p}
    # (the guess of a sharded pass 1, so that both sides agree to the bit).
    "fadam_eps": _per_tensor(
        [
            ("const long long*", "counts"),
            ("const double*", "tensor_sums"),
            ("double*", "tensor_scalars"),
            ("double", "eps"),
            ("double", "eps2"),
            ("double", "two_p"),
            ("int", "two_p_is_one"),
            ("T", "eps_pow_2p"),
            ("T", "tiny"),
        ],
        """
        const double x = eps2 * fadam_rms(tensor_sums[3 * t], counts[t]);
        T eps_t = (x < eps) ? (T)(two_p_is_one ? x : pow(x, two_p)) : eps_pow_2p;  // min(eps, x) ** (2p)
        if (eps_t == (T)0) eps_t = eps_pow_2p;  // eps ** (2p) where that is 0
        if (tiny > eps_t) eps_t = tiny;  // max(eps_t, finfo.tiny)
        tensor_scalars[3 * t] = (double)eps_t;
        """,
    ),
    "fadam_sums": streaming_kernel(
        {"theta": "param_ptrs", "g": "grad_ptrs", "f": "f_ptrs"},
        "const double* tensor_scalars, double* clip_partials, T beta2_hat, T one_minus_beta2_hat, int pow_mode, T p",
        """
            const T fi = fadam_new_f(f_group[k], g_group[k], beta2_hat, one_minus_beta2_hat);
            const T denom = pow_p(fi, pow_mode, p) + eps_t;
            const double g_bar = (double)(g_group[k] / denom);
            const double w_bar = (double)(theta_group[k] / denom);
            if (full || base + k < stop) {
                sum_g_bar2 += g_bar * g_bar;
                sum_w_bar2 += w_bar * w_bar;
            }
        """,
        before="const T eps_t = (T)tensor_scalars[3 * t];\ndouble sum_g_bar2 = 0, sum_w_bar2 = 0;",
        after="""
            __shared__ double shared[BLOCK];
            const double block_g_bar2 = block_sum(sum_g_bar2, shared);
            const double block_w_bar2 = block_sum(sum_w_bar2, shared);
            if (threadIdx.x == 0) {
                clip_partials[2 * (long long)blockIdx.x] = block_g_bar2;
                clip_partials[2 * (long long)blockIdx.x + 1] = block_w_bar2;
            }
        """,
    ),
    # ---- the clip scales max(1, RMS/c) of ḡ and w̄ per tensor.
    "fadam_scales": _per_tensor(
        [
            ("const long long*", "counts"),
            ("const double*", "tensor_sums"),
            ("double*", "tensor_scalars"),
            ("double", "clip"),
        ],
        """
        const double ratio_g = fadam_rms(tensor_sums[3 * t + 1], counts[t]) / clip;
        const double ratio_w = fadam_rms(tensor_sums[3 * t + 2], counts[t]) / clip;
        tensor_scalars[3 * t + 1] = (ratio_g > 1.0) ? ratio_g : 1.0;  // Python max(1.0, rms/c)
        tensor_scalars[3 * t + 2] = (ratio_w > 1.0) ? ratio_w : 1.0;
        """,
    ),
    "fadam_apply": streaming_kernel(
        {"theta": "param_ptrs", "g": "grad_ptrs", "m": "m_ptrs", "f": "f_ptrs"},
        "const double* tensor_scalars, T beta2_hat, T one_minus_beta2_hat, int pow_mode, T p, T beta1, "
        "T one_minus_beta1, T lr, T weight_decay",
        """
            f_group[k] = fadam_new_f(f_group[k], g_group[k], beta2_hat, one_minus_beta2_hat);
            const T denom = pow_p(f_group[k], pow_mode, p) + eps_t;
            T g_bar = g_group[k] / denom;
            g_bar = g_bar / clip_g;
            m_group[k] = beta1 * m_group[k] + one_minus_beta1 * g_bar;
            T w_bar = theta_group[k] / denom;
            w_bar = w_bar / clip_w;
            theta_group[k] = theta_group[k] - lr * (m_group[k] + weight_decay * w_bar);
        """,
        written=("theta", "m", "f"),
        before="""
            const T eps_t = (T)tensor_scalars[3 * t];
            const T clip_g = (T)tensor_scalars[3 * t + 1];
            const T clip_w = (T)tensor_scalars[3 * t + 2];
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


def _groups(engine, params, grads, m, f, hyperparams) -> list:
    """The step's launch groups (``_plan.LaunchGroup``), each with its scratch among its arguments."""
    groups = list(
        engine.launch_groups("elem", fadam_scalars, hyperparams, param_ptrs=params, grad_ptrs=grads, m_ptrs=m, f_ptrs=f)
    )
    for group in groups:
        plan = group.plan
        scratch = plan.scratch("fadam", plan.n_chunks, 2 * plan.n_chunks, 3 * plan.n_tensors, 3 * plan.n_tensors)
        group.args.update(zip(("g2_partials", "clip_partials", "tensor_sums", "tensor_scalars"), scratch))
        group.args.update(counts=plan.counts, n_tensors=plan.n_tensors, tiny=np.finfo(group.dtype).tiny)
    return groups


def _launch(group, name, **given):
    grid = group.plan.n_chunks  # the streaming kernels: a block per chunk
    if name == "fadam_tensor_sums":
        grid = group.plan.n_tensors  # a block per tensor
    elif name in ("fadam_eps", "fadam_scales"):
        grid = -(-group.plan.n_tensors // group.engine.block)  # a thread per tensor
    return group.launch(name, grid, **given)


def _pass1(group, *, epsilon: bool) -> list:
    """Σg², (``epsilon``: ε_t from it,) Σḡ² and Σw̄², per chunk and per tensor: writes scratch only."""
    g2 = _launch(group, "fadam_tensor_sums", partials=group.args["g2_partials"], width=1, first=0)
    bars = _launch(group, "fadam_tensor_sums", partials=group.args["clip_partials"], width=2, first=1)
    return [_launch(group, "sumsq"), g2, *_epsilon(group, epsilon), _launch(group, "fadam_sums"), bars]


def _pass2(group, *, epsilon: bool) -> list:
    """(``epsilon``: ε_t,) the clip scales and the update, from the per-tensor sums."""
    return [*_epsilon(group, epsilon), _launch(group, "fadam_scales"), _launch(group, "fadam_apply")]


def _epsilon(group, wanted: bool) -> list:
    # ε_t from the per-tensor Σg²: between the sums of pass 1 in a single-process step, first in a
    # sharded pass 2 (whose pass 1 used ε_t given from the host)
    return [_launch(group, "fadam_eps")] if wanted else []


def _launches(engine, params, grads, m, f, check, flag, hyperparams):
    """(reads only, writes): the launches of one single-process step, every argument converted.

    Pass 1 then pass 2, ε_t derived on the device in between; with ``check`` the first list is
    Σg² per chunk and the test of those partial sums (which sets ``flag``), the rest the second."""
    reads, writes = [], []
    for group in _groups(engine, params, grads, m, f, hyperparams):
        launches = _pass1(group, epsilon=True) + _pass2(group, epsilon=False)
        reads.append(launches[0])
        if check:
            reads.append(
                partials_finite_launch(engine, group.dtype, group.args["g2_partials"], group.plan.n_chunks, flag)
            )
        writes += launches[1:]
    return reads, writes


def _step(params, grads, m, f, check, hyperparams) -> bool:
    engine = current()
    flag = engine.new_flag() if check else None
    reads, writes = _launches(engine, params, grads, m, f, check, flag, hyperparams)
    return engine.run_checked(reads, writes, flag, lambda: exactly_finite(engine, grads))


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: the backend interface for FAdam (no host synchronisation)."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    _step(params, grads, m, f, False, hp)


def fadam_step_checked(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay) -> bool:
    """:func:`fadam_step` that returns False, having written nothing, when a gradient holds
    NaN or Inf.

    Pass 1 reads g anyway: its float64 partial sums are checked on the device (a launch
    over n_chunks doubles) and the flag read back before any write, instead of the
    optimizer's separate all_finite pass over g: 44 B per float32 element instead of 48,
    and the same single host synchronisation per step. A float64 g above 1e154 overflows
    Σg² although finite: only then are the gradients read again, to tell the two apart."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    return _step(params, grads, m, f, True, hp)


def fadam_partials(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, eps_t=None):
    """Pass 1 of a sharded step (spec/distributed.md §5): (T, 3) float64 on the host, per tensor Σg²,
    Σḡ², Σw̄² over its local elements, ḡ and w̄ formed with ``eps_t`` (one per tensor; None: the guess
    ε^{2p}). Writes nothing but scratch; reads the sums back (one host synchronisation)."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    engine = current()
    groups = _groups(engine, params, grads, m, f, hp)
    for group in groups:
        scalars = np.zeros((len(group.indices), 3))
        if eps_t is None:
            row = group.scalars
            scalars[:, 0] = adaptive_epsilon(math.inf, eps=row["eps"], eps2=row["eps2"], p=row["p"], dtype=group.dtype)
        else:  # as the kernels read ε_t: a value of the parameter dtype
            scalars[:, 0] = np.asarray(eps_t, np.float64)[group.indices].astype(group.dtype)
        group.args["tensor_scalars"] = engine.upload(scalars.ravel())
    engine.run([launch for group in groups for launch in _pass1(group, epsilon=False)])
    sums = np.zeros((len(params), 3))
    for group in groups:
        sums[group.indices] = engine.download(group.args["tensor_sums"])[: 3 * len(group.indices)].reshape(-1, 3)
    return sums


def fadam_apply(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, sums, counts):
    """Pass 2 of a sharded step (launches 3, 6, 7) on the local elements: ε_t, the clip scales and the
    update from ``sums`` ((T, 3), each tensor's :func:`fadam_partials` added over its shards, Σḡ², Σw̄²
    formed with the ε_t of that Σg²) and ``counts`` (the whole tensors' sizes)."""
    hp = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    engine = current()
    groups = _groups(engine, params, grads, m, f, hp)
    for group in groups:
        group.args["tensor_sums"] = engine.upload(np.asarray(sums, np.float64)[group.indices].ravel())
        group.args["counts"] = engine.upload(np.asarray(counts, np.int64)[group.indices])
    engine.run([launch for group in groups for launch in _pass2(group, epsilon=True)])
