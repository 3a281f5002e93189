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
from ._plan import current, select
from .finite import exactly_finite, partials_finite_launch

__all__ = ["fadam_step", "fadam_step_checked", "fadam_launches"]

DEVICE_CODE = r"""
// f^p for FAdam: pmode 0 -> sqrt (p = 0.5), 1 -> f (p = 1), 2 -> pow(f, p).
__device__ __forceinline__ T pow_p(T x, int pmode, T pp) {
    return pmode == 0 ? {SQRT}(x) : (pmode == 1 ? x : {POW}(x, pp));
}
"""

KERNELS = {
    # ---- FAdam pass 1: per-chunk float64 sum of g^2 (for RMS(g)).
    "sumsq": Kernel(
        [("const long long*", "chunks"), ("const unsigned long long*", "G"), ("double*", "partial")], r"""
    CHUNK_HEADER
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    const bool al = aligned16(G[t]);
    double acc = 0;
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T gr[VEC];
        load_group(g, base, stop, full, gr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) { const double x = (double)gr[k]; acc += x * x; }
    }
    __shared__ double sh[BLOCK];
    const double s = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
"""),
    # ---- FAdam finalize 1 (one block per tensor): eps_t from RMS(g), as refimpl.fadam.adaptive_epsilon.
    "fadam_eps": Kernel(
        [("const long long*", "meta"), ("const double*", "partial"), ("double*", "scal"),
         ("double", "eps"), ("double", "eps2"), ("double", "two_p"), ("int", "two_p_is_one"),
         ("T", "eps2p"), ("T", "tiny")], r"""
    const long long* mt = meta + (long long)MW * blockIdx.x;
    const long long n = mt[0], cb = mt[1], ce = mt[2];
    double acc = 0;
    for (long long c = cb + threadIdx.x; c < ce; c += BLOCK) acc += partial[c];
    __shared__ double sh[BLOCK];
    const double s = block_sum(acc, sh);
    if (threadIdx.x == 0) {
        const double r = (n == 0) ? 0.0 : sqrt(s / (double)n);
        const double x = eps2 * r;
        const double lo = (x < eps) ? x : eps;                 // Python min(eps, eps2*rms)
        const double pw = two_p_is_one ? lo : pow(lo, two_p);  // ** (2p)
        T et = (T)pw;
        if (et == (T)0) et = eps2p;                             // eps ** (2p) where that is 0
        if (tiny > et) et = tiny;                               // max(eps_t, finfo.tiny)
        scal[3 * blockIdx.x] = (double)et;
    }
""", kind="finalize"),
    # ---- FAdam pass 2: f update (written), float64 sums of g_bar^2 and w_bar^2 per chunk.
    "fadam_precond": Kernel(
        [("const long long*", "chunks"), ("const unsigned long long*", "P"),
         ("const unsigned long long*", "G"), ("const unsigned long long*", "F"),
         ("const double*", "scal"), ("double*", "partial2"),
         ("T", "b2h"), ("T", "omb2h"), ("int", "pmode"), ("T", "pp")], r"""
    CHUNK_HEADER
    const T* p = (const T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* f = (T*)F[t]; FO_ASSUME_GLOBAL(f);
    const bool al = aligned16(P[t] | G[t] | F[t]);
    const T et = (T)scal[3 * t];
    double ag = 0, aw = 0;
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], fr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(f, base, stop, full, fr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T fi = b2h * fr[k] + omb2h * (gr[k] * gr[k]);
            fr[k] = fi;
            const T denom = pow_p(fi, pmode, pp) + et;
            const T gb = gr[k] / denom;
            const T wb = pr[k] / denom;
            if (full || base + k < stop) {
                const double a = (double)gb;
                const double b = (double)wb;
                ag += a * a;
                aw += b * b;
            }
        }
        store_group(f, base, stop, full, fr);
    }
    __shared__ double sh[BLOCK];
    const double sg = block_sum(ag, sh);
    const double sw = block_sum(aw, sh);
    if (threadIdx.x == 0) {
        partial2[2 * (long long)blockIdx.x] = sg;
        partial2[2 * (long long)blockIdx.x + 1] = sw;
    }
"""),
    # ---- FAdam finalize 2 (one block per tensor): clip scales max(1, RMS/c) for g_bar and w_bar.
    "fadam_scales": Kernel(
        [("const long long*", "meta"), ("const double*", "partial2"), ("double*", "scal"),
         ("double", "clip")], r"""
    const long long* mt = meta + (long long)MW * blockIdx.x;
    const long long n = mt[0], cb = mt[1], ce = mt[2];
    double ag = 0, aw = 0;
    for (long long c = cb + threadIdx.x; c < ce; c += BLOCK) { ag += partial2[2 * c]; aw += partial2[2 * c + 1]; }
    __shared__ double sh[BLOCK];
    const double sg = block_sum(ag, sh);
    const double sw = block_sum(aw, sh);
    if (threadIdx.x == 0) {
        const double qg = ((n == 0) ? 0.0 : sqrt(sg / (double)n)) / clip;
        const double qw = ((n == 0) ? 0.0 : sqrt(sw / (double)n)) / clip;
        scal[3 * blockIdx.x + 1] = (qg > 1.0) ? qg : 1.0;    // Python max(1.0, rms/c)
        scal[3 * blockIdx.x + 2] = (qw > 1.0) ? qw : 1.0;
    }
""", kind="finalize"),
    # ---- FAdam pass 3: momentum of the clipped natural gradient, preconditioned weight decay, θ.
    "fadam_apply": Kernel(
        [("const long long*", "chunks"), ("const unsigned long long*", "P"),
         ("const unsigned long long*", "G"), ("const unsigned long long*", "M"),
         ("const unsigned long long*", "F"), ("const double*", "scal"),
         ("int", "pmode"), ("T", "pp"), ("T", "b1"), ("T", "omb1"), ("T", "lr"), ("T", "wd")], r"""
    CHUNK_HEADER
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    const T* f = (const T*)F[t]; FO_ASSUME_GLOBAL(f);
    const bool al = aligned16(P[t] | G[t] | M[t] | F[t]);
    const T et = (T)scal[3 * t];
    const T sg = (T)scal[3 * t + 1];
    const T sw = (T)scal[3 * t + 2];
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], mr[VEC], fr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
        load_group(f, base, stop, full, fr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T denom = pow_p(fr[k], pmode, pp) + et;
            T gb = gr[k] / denom;
            gb = gb / sg;
            mr[k] = b1 * mr[k] + omb1 * gb;
            T wb = pr[k] / denom;
            wb = wb / sw;
            pr[k] = pr[k] - lr * (mr[k] + wd * wb);
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
    }
"""),
}


def fadam_scalars(*, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """One tensor's kernel scalars, float64 on the host (β̂₂ from the rule's descriptor)."""
    b2h = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)["beta2_hat"]
    return dict(eps=eps, eps2=eps2, two_p=2 * p, two_p_is_one=int(2 * p == 1), eps2p=eps ** (2 * p),
                b2h=b2h, omb2h=1 - b2h, pmode=0 if p == 0.5 else (1 if p == 1 else 2), pp=p, clip=clip,
                b1=beta1, omb1=1 - beta1, lr=lr, wd=weight_decay)


def fadam_launches(engine, params, grads, m, f, *, check=False, flag=None, **hyperparams):
    """(reductions, the rest): the launches of one step, every argument converted.

    The first list reads only (pass 1, and with ``check`` the test of its partial sums,
    which sets ``flag``); the second writes. One set per dtype and set of host scalars,
    each group with its own scratch."""
    params = list(params)
    if not params:
        return [], []
    grads, m, f = list(grads), list(m), list(f)
    first, rest = [], []
    for slot, (dtype, sc, idx) in enumerate(engine.scalar_groups(params, hyperparams, fadam_scalars)):
        P, G, M, F = select(idx, params, grads, m, f)
        plan = engine.plan("elem", dtype, P, slot)
        partial, partial2, scal = plan.scratch("fadam", plan.n_chunks, 2 * plan.n_chunks, 3 * plan.n_tensors)
        Pp, Gp, Mp, Fp = engine.pointers(P), engine.pointers(G), engine.pointers(M), engine.pointers(F)
        first.append(engine.prepared("sumsq", dtype, plan.n_chunks, chunks=plan.chunks, G=Gp, partial=partial))
        if check:
            first.append(partials_finite_launch(engine, dtype, partial, plan.n_chunks, flag))
        rest += [
            engine.prepared("fadam_eps", dtype, plan.n_tensors, meta=plan.meta, partial=partial, scal=scal,
                            eps=sc["eps"], eps2=sc["eps2"], two_p=sc["two_p"], two_p_is_one=sc["two_p_is_one"],
                            eps2p=sc["eps2p"], tiny=np.finfo(dtype).tiny),
            engine.prepared("fadam_precond", dtype, plan.n_chunks, chunks=plan.chunks, P=Pp, G=Gp, F=Fp,
                            scal=scal, partial2=partial2, b2h=sc["b2h"], omb2h=sc["omb2h"], pmode=sc["pmode"],
                            pp=sc["pp"]),
            engine.prepared("fadam_scales", dtype, plan.n_tensors, meta=plan.meta, partial2=partial2, scal=scal,
                            clip=sc["clip"]),
            engine.prepared("fadam_apply", dtype, plan.n_chunks, chunks=plan.chunks, P=Pp, G=Gp, M=Mp, F=Fp,
                            scal=scal, pmode=sc["pmode"], pp=sc["pp"], b1=sc["b1"], omb1=sc["omb1"], lr=sc["lr"],
                            wd=sc["wd"]),
        ]
    return first, rest


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: the backend interface for FAdam (no host synchronisation)."""
    engine = current()
    first, rest = fadam_launches(engine, params, grads, m, f, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                 eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
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
    first, rest = fadam_launches(engine, params, grads, m, f, check=True, flag=flag, step=step, lr=lr, beta1=beta1,
                                 beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    engine.run(first)
    if engine.flag_set(flag) and not exactly_finite(engine, grads):
        return False
    engine.run(rest)
    return True
