"""ESimCSE momentum-encoder update on the GPU: θ_k ← λ·θ_k + (1 − λ)·θ_q, one fused
multi-tensor kernel (reference: refimpl/esimcse_momentum.py, spec/esimcse.md).

Same signature and arithmetic as fisheropt.refimpl.esimcse_momentum.ema_update: λ and
1 − λ are computed in float64 on the host (``ema_coefficients``) and rounded once to the
parameter dtype (``_plan.kernel_args`` converts each ``T`` scalar with a single cast);
each element is ``round(round(λ·θ_k) + round((1−λ)·θ_q))`` in that dtype. The kernel
is a streaming kernel of the backend (``_kernels.streaming_kernel``: one block per chunk of
the chunk table, one launch per dtype whatever the number of tensors), compiled by
``_device`` with ``_kernels.COMPILE_OPTIONS``: ``--fmad=false`` keeps ``a*x + b*y`` two
rounded products and a rounded sum (no FMA contraction), and ``--ftz=false`` keeps float32
subnormals. It is not a ``cupy.ElementwiseKernel``: CuPy compiles those with
``-ftz=true``, which flushes float32 subnormals to zero (a GPU gave 0 where the reference
gives -1.45e-40). Float32 and float64 results equal the reference bit for bit, ±0, NaN,
±Inf and subnormals included (tested on the CPU emulator).

``check_ema_args`` (shared with the other backends) first validates every tensor —
CuPy arrays, C-contiguous targets, sources of the targets' shapes and dtypes — and then
every launch is prepared before the first one runs, so a bad call writes nothing. Sources
may have any strides: a non-contiguous source is copied to a contiguous array first (the
kernel reads the tensors through tables of data pointers). cupy is never imported here:
``ema_update`` runs on ``_plan.current()``, the CuPy engine of the package (or the CPU
emulator's engine in the tests, which runs the same kernel on NumPy arrays).
"""

from fisheropt.refimpl.esimcse_momentum import check_ema_args, ema_coefficients

from ._kernels import streaming_kernel
from ._plan import current

__all__ = ["ema_update", "ema_launches"]

KERNELS = {
    # ---- ESimCSE momentum encoder: θ_k = λ·θ_k + (1−λ)·θ_q (old θ_k), the reference's order.
    # (``k`` is the loop index of a streaming kernel: the arrays are ``target`` and ``source``.)
    "esimcse_ema": streaming_kernel(
        {"target": "target_ptrs", "source": "source_ptrs"},
        "T decay, T one_minus_decay",
        "target_group[k] = decay * target_group[k] + one_minus_decay * source_group[k];",
        written=("target",),
    )
}


def _ema_scalars(decay) -> dict:
    """The kernel's host scalars λ and 1 − λ, in float64 as ``ema_coefficients`` computes them;
    ``_plan.kernel_args`` rounds each once to the parameter dtype, as the reference does."""
    a, b = ema_coefficients(decay, "float64")
    return {"decay": float(a), "one_minus_decay": float(b)}


def ema_launches(engine, targets, sources, decay) -> list:
    """The launches of one update (one per dtype); ``targets`` and ``sources`` C-contiguous, of
    the same shapes and dtypes (``check_ema_args``). Nothing is written until they run."""
    arrays = dict(target_ptrs=targets, source_ptrs=sources)
    return engine.streaming_launches("esimcse_ema", _ema_scalars, {"decay": decay}, arrays)


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets`` (cupy.ndarray): the backend interface."""
    engine = current()
    # everything, before any write; CuPy arrays, or NumPy ones on the tests' CPU emulation
    decay = check_ema_args(targets, sources, decay, device=not getattr(engine.launcher, "host_arrays", False))
    # The kernel reads the tensors through pointer tables: a strided source is copied to C order
    # first (``.copy()`` is C order in CuPy and NumPy), on the stream the kernel then runs on. The
    # copies are dropped once the launches are enqueued: CuPy's memory pool hands freed memory only
    # to later work on that stream, so the kernel has read them before they are reused.
    contiguous = [q if q.flags.c_contiguous else q.copy() for q in sources]
    engine.run(ema_launches(engine, list(targets), contiguous, decay))
