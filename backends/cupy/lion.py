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
from ._plan import current, select

__all__ = ["lion_step", "lion_launches"]

DEVICE_CODE = r"""
// np.sign: +1 / -1, 0 (a positive zero) for ±0, the NaN itself for NaN.
__device__ __forceinline__ T lion_sign(T c) {
    return c > (T)0 ? (T)1 : (c < (T)0 ? (T)-1 : (c == (T)0 ? (T)0 : c));
}
"""

KERNELS = {
    # ---- Lion: c = b1·m + omb1·g (old m); θ = θ − lr·(sign(c) + wd·θ) (old θ); m = b2·m + omb2·g.
    "lion": Kernel(
        [("const long long*", "chunks"), ("const unsigned long long*", "P"),
         ("const unsigned long long*", "G"), ("const unsigned long long*", "M"),
         ("T", "b1"), ("T", "omb1"), ("T", "b2"), ("T", "omb2"), ("T", "lr"), ("T", "wd")], r"""
    CHUNK_HEADER
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    const bool al = aligned16(P[t] | G[t] | M[t]);
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], mr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T c = b1 * mr[k] + omb1 * gr[k];
            const T decay = wd * pr[k];
            const T u = lion_sign(c) + decay;
            pr[k] = pr[k] - lr * u;
            mr[k] = b2 * mr[k] + omb2 * gr[k];
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
    }
"""),
}


def lion_scalars(*, step, lr, beta1, beta2, weight_decay):
    """One tensor's kernel scalars, float64 on the host (the descriptor has none that depend on t)."""
    return dict(RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay),
                b1=beta1, omb1=1 - beta1, b2=beta2, omb2=1 - beta2, lr=lr, wd=weight_decay)


def lion_launches(engine, params, grads, m, **hyperparams) -> list:
    """The launches of one Lion step, every argument converted: one per dtype and set of host
    scalars. Nothing is written until they run."""
    params = list(params)
    if not params:
        return []
    grads, m = list(grads), list(m)
    launches = []
    for slot, (dtype, sc, idx) in enumerate(engine.scalar_groups(params, hyperparams, lion_scalars)):
        P, G, M = select(idx, params, grads, m)
        plan = engine.plan("elem", dtype, P, slot)
        launches.append(engine.prepared("lion", dtype, plan.n_chunks, chunks=plan.chunks, P=engine.pointers(P),
                                        G=engine.pointers(G), M=engine.pointers(M), **sc))
    return launches


def lion_step(params, grads, m, *, step, lr, beta1, beta2, weight_decay):
    """Multi-tensor, in place: the backend interface for Lion."""
    engine = current()
    engine.run(lion_launches(engine, params, grads, m, step=step, lr=lr, beta1=beta1, beta2=beta2,
                             weight_decay=weight_decay))
