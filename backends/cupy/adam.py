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
from ._plan import current, select

__all__ = ["adam_step", "adam_launches"]

ADAM, ADAM_L2, ADAMW = 0, 1, 2   # how weight decay enters (the kernel's ``mode``)

KERNELS = {
    # ---- Adam (mode 0: no decay, 1: L2 decay g += wd*θ) and AdamW (mode 2: θ *= 1 - lr*wd).
    "adam": Kernel(
        [("const long long*", "chunks"), ("const unsigned long long*", "P"),
         ("const unsigned long long*", "G"), ("const unsigned long long*", "M"),
         ("const unsigned long long*", "V"), ("int", "mode"),
         ("T", "wd"), ("T", "decay"), ("T", "b1"), ("T", "omb1"), ("T", "b2"), ("T", "omb2"),
         ("T", "step_size"), ("T", "bc2s"), ("T", "eps")], r"""
    CHUNK_HEADER
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    T* v = (T*)V[t]; FO_ASSUME_GLOBAL(v);
    const bool al = aligned16(P[t] | G[t] | M[t] | V[t]);
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], mr[VEC], vr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
        load_group(v, base, stop, full, vr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            T gi = gr[k];
            if (mode == 1) gi = gi + wd * pr[k];
            if (mode == 2) pr[k] = pr[k] * decay;
            mr[k] = b1 * mr[k] + omb1 * gi;
            vr[k] = b2 * vr[k] + omb2 * (gi * gi);
            const T denom = {SQRT}(vr[k]) / bc2s + eps;
            pr[k] = pr[k] - step_size * (mr[k] / denom);
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
        store_group(v, base, stop, full, vr);
    }
"""),
}


def adam_scalars(*, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """One tensor's kernel scalars, float64 on the host (rounded to its dtype at the launch)."""
    c = RULE.coefficients(step, lr=lr, beta1=beta1, beta2=beta2)
    return dict(mode=ADAMW if decoupled else (ADAM_L2 if weight_decay != 0 else ADAM), wd=weight_decay,
                decay=1 - lr * weight_decay, b1=beta1, omb1=1 - beta1, b2=beta2, omb2=1 - beta2,
                step_size=c["step_size"], bc2s=c["bias_correction2_sqrt"], eps=eps)


def adam_launches(engine, params, grads, m, v, *, decoupled, **hyperparams) -> list:
    """The launches of one Adam (``decoupled``: AdamW) step, every argument converted: one per
    dtype and set of host scalars. Nothing is written until they run."""
    params = list(params)
    if not params:
        return []
    grads, m, v = list(grads), list(m), list(v)
    launches = []
    for slot, (dtype, scalars, idx) in enumerate(
            engine.scalar_groups(params, {**hyperparams, "decoupled": decoupled}, adam_scalars)):
        P, G, M, V = select(idx, params, grads, m, v)
        plan = engine.plan("elem", dtype, P, slot)
        launches.append(engine.prepared(
            "adam", dtype, plan.n_chunks, chunks=plan.chunks,
            P=engine.pointers(P), G=engine.pointers(G), M=engine.pointers(M), V=engine.pointers(V), **scalars))
    return launches


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: the backend interface for Adam (L2 decay, as torch.optim.Adam)."""
    engine = current()
    engine.run(adam_launches(engine, params, grads, m, v, decoupled=False, step=step, lr=lr, beta1=beta1,
                             beta2=beta2, eps=eps, weight_decay=weight_decay))
