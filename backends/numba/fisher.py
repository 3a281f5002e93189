"""Numba backend: Fisher natural-gradient directions in sample space.

Same signatures as fisheropt.refimpl.fisher_ngd (the reference backend):

* ``fisher_gram(G)``: the Gram product stays in BLAS (NumPy's matmul, column blocks of
  float32 products accumulated in float64, exactly as the reference) — no hand-written
  kernel beats BLAS on G G^T, and the reference already avoids a float64 copy of G.
* ``fisher_sample_space_direction(G, rhs, damping)``: the reference's formulation
  (``sample_space_direction``: the smaller Gram, GGᵀ or GᵀG) with the damped solve as one
  compiled kernel (Cholesky + two triangular substitutions, float64), after the reference's
  condition-number check (``check_condition`` on LAPACK eigenvalues); then d = G^T a by BLAS
  gemv in G's dtype.
"""

import numba
import numpy as np

from fisheropt.refimpl.fisher_ngd import checked_damped_gram, sample_space_direction
from fisheropt.refimpl.fisher_ngd import fisher_gram as _reference_gram

__all__ = ["fisher_gram", "fisher_sample_space_direction"]


def fisher_gram(G):
    """G G^T, (N, N) float64 (BLAS; see module docstring)."""
    return _reference_gram(G)


@numba.njit(cache=True)
def _cholesky_solve(damped, rhs):
    """damped^{-1} rhs by Cholesky for a symmetric positive-definite ``damped`` (checked by the caller)."""
    n = damped.shape[0]
    L = np.zeros((n, n))
    for j in range(n):
        acc = damped[j, j]
        for k in range(j):
            acc -= L[j, k] * L[j, k]
        ljj = np.sqrt(acc)
        L[j, j] = ljj
        for i in range(j + 1, n):
            acc = damped[i, j]
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
    return x


def _solve_damped_gram(gram, rhs, damping):
    damped = checked_damped_gram(gram, damping)  # κ ≤ MAX_CONDITION: the Cholesky below succeeds
    return _cholesky_solve(damped, np.ascontiguousarray(rhs, dtype=np.float64))


def fisher_sample_space_direction(G, rhs, damping):
    """d = G^T (G G^T + damping I)^{-1} rhs, (P,) in G's dtype; the solve in float64."""
    return sample_space_direction(G, rhs, float(damping), gram=fisher_gram, solve=_solve_damped_gram)
