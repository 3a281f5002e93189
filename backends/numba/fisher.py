"""Numba backend: Fisher natural-gradient directions in sample space.

Same signatures as fisheropt.refimpl.fisher_ngd (the reference backend):

* ``fisher_gram(G)``: the Gram product stays in BLAS (NumPy's matmul, column blocks of
  float32 products accumulated in float64, exactly as the reference) — no hand-written
  kernel beats BLAS on G G^T, and the reference already avoids a float64 copy of G.
* ``fisher_sample_space_direction(G, rhs, damping)``: the damped N x N solve is one
  compiled kernel (Cholesky + two triangular substitutions, float64; a symmetric
  eigendecomposition with eigenvalues clipped at 0 when Cholesky breaks down), then
  d = G^T a by BLAS gemv in G's dtype.
"""
import numba
import numpy as np
from fisheropt.refimpl.fisher_ngd import check_gram
from fisheropt.refimpl.fisher_ngd import fisher_gram as _reference_gram

__all__ = ["fisher_gram", "fisher_sample_space_direction"]

array_module = np  # lets this module serve as `ops` for fisheropt.refimpl.fisher_ngd


def fisher_gram(G):
    """K = G G^T, (N, N) float64 (BLAS; see module docstring)."""
    return _reference_gram(G)


@numba.njit(cache=True)
def _cholesky_solve(K, rhs, damping):
    """(K + damping I)^{-1} rhs by Cholesky; returns (x, ok)."""
    n = K.shape[0]
    L = np.zeros((n, n))
    for j in range(n):
        acc = K[j, j] + damping
        for k in range(j):
            acc -= L[j, k] * L[j, k]
        if not (acc > 0.0) or not np.isfinite(acc):
            return rhs.copy(), False
        ljj = np.sqrt(acc)
        L[j, j] = ljj
        for i in range(j + 1, n):
            acc = K[i, j]
            for k in range(j):
                acc -= L[i, k] * L[j, k]
            L[i, j] = acc / ljj
    y = np.empty(n)
    for i in range(n):
        acc = rhs[i]
        for k in range(i):
            acc -= L[i, k] * y[k]
        y[i] = acc / L[i, i]
    x = np.empty(n)
    for i in range(n - 1, -1, -1):
        acc = y[i]
        for k in range(i + 1, n):
            acc -= L[k, i] * x[k]
        x[i] = acc / L[i, i]
    for i in range(n):
        if not np.isfinite(x[i]):
            return x, False
    return x, True


@numba.njit(cache=True)
def _eigh_solve(K, rhs, damping):
    w, V = np.linalg.eigh(0.5 * (K + K.T))
    w = np.maximum(w, 0.0) + damping
    return V @ ((V.T @ rhs) / w)


def _solve_damped_gram(K, rhs, damping):
    K = np.ascontiguousarray(K, dtype=np.float64)
    rhs = np.ascontiguousarray(rhs, dtype=np.float64)
    x, ok = _cholesky_solve(K, rhs, float(damping))
    if ok:
        return x
    return _eigh_solve(K, rhs, float(damping))


def fisher_sample_space_direction(G, rhs, damping):
    """d = G^T (G G^T + damping I)^{-1} rhs, (P,) in G's dtype; the solve in float64."""
    K = fisher_gram(G)
    check_gram(K)
    a = _solve_damped_gram(K, rhs, damping)
    return G.T @ a.astype(G.dtype)
