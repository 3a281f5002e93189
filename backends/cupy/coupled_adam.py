"""Coupled Adam on the GPU: fused, multi-tensor CUDA kernels (reference: refimpl/coupled_adam.py).

A coupled tensor is a V×d embedding whose second moment is one value per column,
the row mean of g². Per dtype and set of host scalars, three launches whatever
the number of tensors, with no host synchronisation:

1. ``colsumsq``: float64 column sums of g² over tiles of rows (a thread per
   column, rows in order), one partial row per row tile (read g, 4 B per float32
   element, plus the partials, about 1/rows_per_tile of g in float64);
2. ``coupled_v``: per column, the partials summed in a fixed order, the mean over
   the V rows rounded to the parameter dtype, v̄ ← β₂v̄ + (1-β₂)·mean;
3. ``coupled_apply``: AdamW with the column's v̄ (read θ, g, m; write θ, m: 20 B).

Tensors with ``coupled[i]`` False take Adam's kernel in AdamW mode in the same
call. The step size and √(1-β2^t) come from the rule's descriptor.
``coupled_adam_step_checked`` fuses the finiteness check into pass 1 (see there).
"""
from fisheropt.refimpl.coupled_adam import RULE

from ._kernels import Kernel
from ._plan import check_per_tensor, current, pick, select
from .adam import adam_launches
from .finite import exactly_finite, finite_launches, partials_finite_launch

__all__ = ["coupled_adam_step", "coupled_adam_step_checked", "coupled_adam_launches"]

KERNELS = {
    # ---- Coupled Adam pass 1: float64 column sums of g^2 over a tile of rows (thread = column).
    "colsumsq": Kernel(
        [("const long long*", "tiles"), ("const long long*", "meta"),
         ("const unsigned long long*", "G"), ("double*", "partial")], r"""
    const long long* tl = tiles + (long long)TW * blockIdx.x;
    const int t = (int)tl[0];
    const long long r0 = tl[1], r1 = tl[2];
    const long long c = tl[3] + threadIdx.x;
    const long long d = meta[(long long)MW * t + 4];
    if (c < d) {
        const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
        double acc = 0;
#pragma unroll 8
        for (long long r = r0; r < r1; ++r) { const double x = (double)g[r * d + c]; acc += x * x; }
        partial[tl[4] + c] = acc;
    }
"""),
    # ---- Coupled Adam pass 2: column mean over all rows (fixed order), v_col EMA.
    "coupled_v": Kernel(
        [("const long long*", "ctiles"), ("const long long*", "meta"), ("const double*", "partial"),
         ("const unsigned long long*", "Vc"), ("T", "b2"), ("T", "omb2")], r"""
    const int t = (int)ctiles[(long long)CTW * blockIdx.x];
    const long long c = ctiles[(long long)CTW * blockIdx.x + 1] + threadIdx.x;
    const long long* mt = meta + (long long)MW * t;
    const long long rows = mt[3], d = mt[4], pbase = mt[5], nrc = mt[6];
    if (c < d) {
        double s = 0;
        for (long long k = 0; k < nrc; ++k) s += partial[pbase + k * d + c];
        const T cm = (T)(s / (double)rows);
        T* v = (T*)Vc[t]; FO_ASSUME_GLOBAL(v);
        v[c] = b2 * v[c] + omb2 * cm;
    }
"""),
    # ---- Coupled Adam pass 3: AdamW with the per-column second moment.
    "coupled_apply": Kernel(
        [("const long long*", "chunks"), ("const long long*", "meta"),
         ("const unsigned long long*", "P"), ("const unsigned long long*", "G"),
         ("const unsigned long long*", "M"), ("const unsigned long long*", "Vc"),
         ("T", "decay"), ("T", "b1"), ("T", "omb1"), ("T", "step_size"), ("T", "bc2s"),
         ("T", "eps")], r"""
    CHUNK_HEADER
    const long long d = meta[(long long)MW * t + 4];
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    const T* v = (const T*)Vc[t]; FO_ASSUME_GLOBAL(v);
    const bool al = aligned16(P[t] | G[t] | M[t]);
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        // column of element `base`: (start % d) + offset in chunk, reduced mod d without a
        // 64-bit division (offset < chunk < 2^31, so 32 bits suffice below 2^31 columns)
        long long col = ch[3] + (base - start);
        if (d >= 0x80000000LL) { if (col >= d) col -= d; }
        else col = (long long)((unsigned)col % (unsigned)d);
        T pr[VEC], gr[VEC], mr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T denom = {SQRT}(v[col]) / bc2s + eps;
            pr[k] = pr[k] * decay;
            mr[k] = b1 * mr[k] + omb1 * gr[k];
            pr[k] = pr[k] - step_size * (mr[k] / denom);
            if (++col == d) col = 0;
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
    }
"""),
}


def coupled_scalars(*, step, lr, beta1, beta2, eps, weight_decay):
    """One coupled tensor's kernel scalars, float64 on the host."""
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    return dict(decay=1 - lr * weight_decay, b1=beta1, omb1=1 - beta1, b2=beta2, omb2=1 - beta2,
                step_size=c["step_size"], bc2s=c["bias_correction2_sqrt"], eps=eps)


def _coupled_only(engine, params, grads, m, v_col, check, flag, hyperparams):
    params = list(params)
    if not params:
        return [], []
    grads, m, v_col = list(grads), list(m), list(v_col)
    first, rest = [], []
    for slot, (dtype, sc, idx) in enumerate(engine.scalar_groups(params, hyperparams, coupled_scalars)):
        P, G, M, Vc = select(idx, params, grads, m, v_col)
        plan = engine.plan("coupled", dtype, P, slot)
        (partial,) = plan.scratch("colsum", plan.n_partial)
        Gp, Vp = engine.pointers(G), engine.pointers(Vc)
        first.append(engine.prepared("colsumsq", dtype, plan.n_tiles, tiles=plan.tiles, meta=plan.meta, G=Gp,
                                     partial=partial))
        if check:
            first.append(partials_finite_launch(engine, dtype, partial, plan.n_partial, flag))
        rest += [
            engine.prepared("coupled_v", dtype, plan.n_ctiles, ctiles=plan.ctiles, meta=plan.meta,
                            partial=partial, Vc=Vp, b2=sc["b2"], omb2=sc["omb2"]),
            engine.prepared("coupled_apply", dtype, plan.n_chunks, chunks=plan.chunks, meta=plan.meta,
                            P=engine.pointers(P), G=Gp, M=engine.pointers(M), Vc=Vp, decay=sc["decay"],
                            b1=sc["b1"], omb1=sc["omb1"], step_size=sc["step_size"], bc2s=sc["bc2s"],
                            eps=sc["eps"]),
        ]
    return first, rest


def coupled_adam_launches(engine, params, grads, m, v, *, coupled, check=False, flag=None, **hyperparams):
    """(reads only, writes): the launches of one step, every argument converted.

    ``coupled[i]`` True: a V×d tensor, v[i] of shape (d,);
    False: AdamW, v[i] like params[i]. With ``check`` the first list also sets ``flag``
    for a non-finite gradient of either kind."""
    n = len(params)
    coupled = list(coupled)
    check_per_tensor(n, {**hyperparams, "coupled": coupled})
    yes = [i for i, c in enumerate(coupled) if c]
    no = [i for i, c in enumerate(coupled) if not c]
    first, rest = _coupled_only(engine, *select(yes, params, grads, m, v), check, flag, pick(yes, hyperparams))
    uncoupled = select(no, params, grads, m, v)
    if check:
        first += finite_launches(engine, uncoupled[1], flag)
    return first, rest + adam_launches(engine, *uncoupled, decoupled=True, **pick(no, hyperparams))


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: the backend interface for Coupled Adam (no host synchronisation)."""
    engine = current()
    first, rest = coupled_adam_launches(engine, params, grads, m, v, coupled=coupled, step=step, lr=lr,
                                        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    engine.run(first + rest)


def coupled_adam_step_checked(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay,
                              coupled) -> bool:
    """:func:`coupled_adam_step` that returns False, having written nothing, when a gradient
    holds NaN or Inf.

    The coupled gradients are checked through the column sums pass 1 computes anyway
    (a launch over the float64 partials), the AdamW ones by the all_finite kernel, all
    into one flag read back before any write: 24 B per float32 element of a coupled
    tensor instead of 28, and the same single host synchronisation per step. A
    float64 g above 1e154 overflows its column sum although finite: only then are the
    gradients read again."""
    engine = current()
    flag = engine.new_flag()
    first, rest = coupled_adam_launches(engine, params, grads, m, v, coupled=coupled, check=True, flag=flag,
                                        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                        weight_decay=weight_decay)
    engine.run(first)
    if engine.flag_set(flag) and not exactly_finite(engine, grads):
        return False
    engine.run(rest)
    return True
