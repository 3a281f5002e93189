"""CuPy backend: Fisher natural-gradient directions on the GPU (cuBLAS + cuSOLVER).

Same signatures as fisheropt.refimpl.fisher_ngd; arrays are cupy.ndarray.

* ``fisher_gram(G)``: cuBLAS products; for float32 G, column blocks of ``GRAM_BLOCK``
  parameters are multiplied in float32 and accumulated in float64 (no float64 copy of G).
* ``fisher_sample_space_direction(G, rhs, damping)``: Cholesky (cuSOLVER potrf) of the
  float64 N x N damped Gram and two triangular solves; cuSOLVER does not raise on a
  failed factorisation (it fills NaN), so a non-finite factor or solution switches to the
  eigendecomposition fallback (cupy.linalg.eigh, eigenvalues clipped at 0). Then
  d = G^T a by cuBLAS gemv in G's dtype.
"""
import cupy

from fisheropt.refimpl.fisher_ngd import GRAM_BLOCK, check_gram

__all__ = ["fisher_gram", "fisher_sample_space_direction"]

array_module = cupy  # lets this module serve as `ops` for fisheropt.refimpl.fisher_ngd


def fisher_gram(G):
    """K = G G^T, (N, N) float64 on the device."""
    N, P = G.shape
    if G.dtype == cupy.float64 or P <= GRAM_BLOCK:
        return (G @ G.T).astype(cupy.float64)
    K = cupy.zeros((N, N), dtype=cupy.float64)
    for start in range(0, P, GRAM_BLOCK):
        Gb = G[:, start:start + GRAM_BLOCK]
        K += (Gb @ Gb.T).astype(cupy.float64)
    return K


def _solve_damped_gram(K, rhs, damping):
    K = K.astype(cupy.float64, copy=False)
    rhs = rhs.astype(cupy.float64, copy=False)
    n = K.shape[0]
    Kd = K + damping * cupy.eye(n, dtype=cupy.float64)
    try:
        L = cupy.linalg.cholesky(Kd)
        if bool(cupy.isfinite(L).all()):
            # Imported here: cupyx.scipy.linalg loads cuBLAS/cuSOLVER at import time, and a
            # missing CUDA library must not make the whole backend unimportable.
            from cupyx.scipy.linalg import solve_triangular
            y = solve_triangular(L, rhs, lower=True)
            x = solve_triangular(L.T, y, lower=False)
            if bool(cupy.isfinite(x).all()):
                return x
    except cupy.linalg.LinAlgError:
        pass
    w, V = cupy.linalg.eigh(0.5 * (K + K.T))
    w = cupy.maximum(w, 0.0) + damping
    return V @ ((V.T @ rhs) / w)


def fisher_sample_space_direction(G, rhs, damping):
    """d = G^T (G G^T + damping I)^{-1} rhs, (P,) in G's dtype; the solve in float64."""
    K = fisher_gram(G)
    check_gram(K, cupy)
    a = _solve_damped_gram(K, rhs, float(damping))
    return G.T @ a.astype(G.dtype)
