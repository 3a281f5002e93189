"""ESimCSE momentum-encoder update, CuPy: θ_k ← λ·θ_k + (1 − λ)·θ_q on the GPU.

Same signature and arithmetic as fisheropt.refimpl.esimcse_momentum.ema_update
(spec/esimcse.md). The coefficients are computed in float64 on the host and
rounded to the parameter dtype; each element is two round-to-nearest products
and one round-to-nearest sum in that dtype. NVRTC contracts ``a*x + b*y`` into a
fused multiply-add by default, which would round once less than the reference,
so the kernel spells the operations with the ``__fmul_rn``/``__fadd_rn``
(``__dmul_rn``/``__dadd_rn``) intrinsics, which are never contracted: the GPU
result equals the NumPy reference bit for bit.

One ElementwiseKernel launch per tensor (it handles any strides in place);
``sources`` must be CuPy arrays with the targets' shapes and dtypes.
"""
from __future__ import annotations

import cupy

from fisheropt.refimpl.esimcse_momentum import ema_coefficients

_PREAMBLE = r"""
__device__ __forceinline__ float  ema_mul(float x, float y)   { return __fmul_rn(x, y); }
__device__ __forceinline__ float  ema_add(float x, float y)   { return __fadd_rn(x, y); }
__device__ __forceinline__ double ema_mul(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ double ema_add(double x, double y) { return __dadd_rn(x, y); }
"""

_ema_kernel = cupy.ElementwiseKernel(
    "T q, T a, T b",
    "T k",
    "k = ema_add(ema_mul(a, k), ema_mul(b, q));",
    "fisheropt_esimcse_ema_update",
    preamble=_PREAMBLE,
)


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets`` (cupy.ndarray): the backend interface."""
    for k, q in zip(targets, sources):
        if k.size == 0:
            continue
        a, b = ema_coefficients(decay, k.dtype)
        _ema_kernel(q, a, b, k)
