"""ESimCSE momentum-encoder update, CuPy: θ_k ← λ·θ_k + (1 − λ)·θ_q on the GPU.

Same signature and arithmetic as fisheropt.refimpl.esimcse_momentum.ema_update
(spec/esimcse.md). The coefficients are computed in float64 on the host and
rounded to the parameter dtype; each element is two round-to-nearest products
and one round-to-nearest sum in that dtype. NVRTC contracts ``a*x + b*y`` into a
fused multiply-add by default, which would round once less than the reference,
so the kernel spells the operations with the ``__fmul_rn``/``__fadd_rn``
(``__dmul_rn``/``__dadd_rn``) intrinsics, which are never contracted: the GPU
result equals the NumPy reference bit for bit.

One ElementwiseKernel launch per tensor; ``check_ema_args`` (shared with the
other backends) first validates every tensor — CuPy arrays, C-contiguous targets,
sources of the targets' shapes and dtypes — so a bad call writes nothing. cupy is
imported when the kernel is first built, so the kernel text (``PREAMBLE``,
``BODY``) can be read and checked on a machine without CuPy.
"""

from __future__ import annotations

from fisheropt.refimpl.esimcse_momentum import check_ema_args, ema_coefficients

KERNEL_NAME = "fisheropt_esimcse_ema_update"
IN_PARAMS = "T q, T a, T b"
OUT_PARAMS = "T k"
PREAMBLE = r"""
__device__ __forceinline__ float  ema_mul(float x, float y)   { return __fmul_rn(x, y); }
__device__ __forceinline__ float  ema_add(float x, float y)   { return __fadd_rn(x, y); }
__device__ __forceinline__ double ema_mul(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ double ema_add(double x, double y) { return __dadd_rn(x, y); }
"""
BODY = "k = ema_add(ema_mul(a, k), ema_mul(b, q));"

_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is None:
        import cupy

        _kernel = cupy.ElementwiseKernel(IN_PARAMS, OUT_PARAMS, BODY, KERNEL_NAME, preamble=PREAMBLE)
    return _kernel


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets`` (cupy.ndarray): the backend interface."""
    decay = check_ema_args(targets, sources, decay, device=True)  # everything, before any write
    kernel = None
    for k, q in zip(targets, sources):
        if k.size == 0:
            continue
        kernel = kernel or _get_kernel()
        a, b = ema_coefficients(decay, k.dtype)
        kernel(q, a, b, k)
