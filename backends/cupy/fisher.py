"""CuPy backend: Fisher natural-gradient directions on the GPU (cuBLAS + cuSOLVER).

Same signatures as fisheropt.refimpl.fisher_ngd; arrays are cupy.ndarray.

* ``fisher_gram(G)``: cuBLAS products; for float32 G, column blocks of ``GRAM_BLOCK``
  parameters are multiplied in float32 and accumulated in float64 (no float64 copy of G).
* ``fisher_sample_space_direction(G, rhs, damping)``: the reference's formulation
  (``sample_space_direction``: the smaller Gram, GGᵀ or GᵀG) with a float64 solve on the
  device: the condition number from cupy.linalg.eigvalsh (cuSOLVER syevd) goes through the
  reference's ``check_condition``, then Cholesky (potrf) and two triangular solves — a
  condition number the check accepts lets the factorisation succeed. Then d = G^T a by
  cuBLAS gemv in G's dtype.
"""

import cupy

from fisheropt.refimpl.fisher_ngd import GRAM_BLOCK, checked_damped_gram, sample_space_direction

__all__ = ["fisher_gram", "fisher_sample_space_direction", "solve_damped_gram"]


def fisher_gram(G):
    """G G^T, (N, N) float64 on the device."""
    N, P = G.shape
    if G.dtype == cupy.float64 or P <= GRAM_BLOCK:
        return (G @ G.T).astype(cupy.float64)
    gram = cupy.zeros((N, N), dtype=cupy.float64)
    for start in range(0, P, GRAM_BLOCK):
        block = G[:, start : start + GRAM_BLOCK]
        gram += (block @ block.T).astype(cupy.float64)
    return gram


def solve_damped_gram(gram, rhs, damping, *, singular=False):
    """(gram + damping I)^{-1} rhs in float64 on the device, once check_condition accepted gram + λI
    (``singular``: as the reference's, for the Woodbury form; fisheropt._ngd uses it for the
    parameter-space solves of SF and the exact direction on the GPU)."""
    damped = checked_damped_gram(gram, damping, singular=singular, xp=cupy)
    # Imported here: cupyx.scipy.linalg loads cuBLAS/cuSOLVER at import time, and a missing CUDA
    # library must not make the whole backend unimportable.
    from cupyx.scipy.linalg import solve_triangular

    L = cupy.linalg.cholesky(damped)
    y = solve_triangular(L, rhs.astype(cupy.float64, copy=False), lower=True)
    return solve_triangular(L.T, y, lower=False)


def fisher_sample_space_direction(G, rhs, damping):
    """d = G^T (G G^T + damping I)^{-1} rhs, (P,) in G's dtype; the solve in float64."""
    return sample_space_direction(G, rhs, float(damping), gram=fisher_gram, solve=solve_damped_gram, xp=cupy)
