r"""Natural-gradient directions in sample space — spec/fisher.md §3–4.

Update :math:`\theta\leftarrow\theta-\eta d`, damping :math:`\lambda>0`,
:math:`\nabla L = G^\top\mathbf 1`. Every direction is a damped solve in an
:math:`M`-dimensional "sample space" (M = N, K·N or N·C) through the push-through
identity :math:`A^\top(AA^\top+\lambda I_M)^{-1} = (A^\top A+\lambda I_P)^{-1}A^\top`,
so no P×P matrix is ever built:

* EF:    :math:`d = G^\top(GG^\top+\lambda I)^{-1}\mathbf 1 = (\mathrm{EF}+\lambda I)^{-1}\nabla L`
* iEF:   :math:`d = G^\top(GG^\top+\lambda I)^{-1}s` (Wu et al. 2024, Eq. 8; damping on the Gram)
* SF:    :math:`d = (\hat G^\top\hat G+\lambda I)^{-1}\nabla L
  = \tfrac1\lambda\big(\nabla L-\hat G^\top(\hat G\hat G^\top+\lambda I)^{-1}\hat G\nabla L\big)`
* exact: the same Woodbury form with the Fisher factor A (:math:`A^\top A = F`, NC rows),
  or matrix-free conjugate gradients on :math:`F+\lambda I` when NC is large.

Backend functions (identical signatures on every backend):

``fisher_gram(G) -> K``
    :math:`K = GG^\top`, (N, N) float64. float64 G: one float64 BLAS product. float32 G:
    float32 BLAS products over column blocks of ``GRAM_BLOCK`` parameters, each upcast and
    accumulated in float64 — the speed of single-precision BLAS, no float64 copy of G, and the
    float32 rounding error of a block product grows with the block length, not with P.
``fisher_sample_space_direction(G, rhs, damping) -> d``
    :math:`d = G^\top (GG^\top + \lambda I)^{-1}\,\mathrm{rhs}`, (P,) in G's dtype. The N×N system
    is solved in float64: Cholesky first, a symmetric eigendecomposition (eigenvalues clipped
    at 0) when Cholesky fails. Raises ValueError when diag(GGᵀ) is non-finite (G holds NaN/Inf):
    the only check a backend makes, O(N), and the one the public API relies on for G.

Inputs are assumed valid (fisheropt.fisher validates).
"""
import numpy as np
import scipy.linalg

from .fisher_exact import fisher_factor
from .fisher_sampled import sampled_grads

GRAM_BLOCK = 1 << 15   # parameters (columns of G) per float32 block product in fisher_gram
EXACT_WOODBURY_MAX_ROWS = 4096   # exact direction: Woodbury in N*C space up to this many rows, else CG


# ---- backend functions (the "numpy" backend) ------------------------------------
def fisher_gram(G):
    """K = G G^T, (N, N) float64 (float32 G: blockwise float32 BLAS, float64 accumulation)."""
    N, P = G.shape
    if G.dtype == np.float64 or P <= GRAM_BLOCK:
        K = G @ G.T                      # syrk
        return K.astype(np.float64, copy=False) if G.dtype == np.float64 else K.astype(np.float64)
    K = np.zeros((N, N), dtype=np.float64)
    for start in range(0, P, GRAM_BLOCK):
        Gb = G[:, start:start + GRAM_BLOCK]   # strided view, no copy; BLAS takes lda = P
        K += Gb @ Gb.T
    return K


def solve_damped_gram(K, rhs, damping):
    """(K + damping I)^{-1} rhs in float64 for symmetric PSD K: Cholesky, eigh fallback."""
    K = np.asarray(K, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    Kd = K + damping * np.eye(K.shape[0])
    try:
        factor = scipy.linalg.cho_factor(Kd, lower=True, check_finite=False)
        x = scipy.linalg.cho_solve(factor, rhs, check_finite=False)
        if np.all(np.isfinite(x)):
            return x
    except np.linalg.LinAlgError:
        pass
    return solve_damped_gram_eigh(K, rhs, damping)


def solve_damped_gram_eigh(K, rhs, damping):
    """The fallback: K = V diag(w) V^T, w clipped at 0 (K is PSD in exact arithmetic)."""
    w, V = np.linalg.eigh(0.5 * (K + K.T))
    w = np.maximum(w, 0.0) + damping
    return V @ ((V.T @ rhs) / w)


def fisher_sample_space_direction(G, rhs, damping):
    """d = G^T (G G^T + damping I)^{-1} rhs, (P,) in G's dtype; the N x N solve in float64."""
    K = fisher_gram(G)
    check_gram(K)
    a = solve_damped_gram(K, rhs, float(damping))
    return G.T @ a.astype(G.dtype)


NONFINITE_GRAM = ("G contains NaN or Inf (detected on the diagonal of G Gᵀ, which is non-finite "
                  "exactly when a row of G is, or when a row's squared norm overflows)")


def check_gram(K, xp=np):
    """The O(N) finiteness guard: diag(G Gᵀ)_n = ||g_n||² is non-finite iff row n of G holds a
    NaN or Inf (or its squared norm overflows), so G itself never needs a separate pass."""
    if not bool(xp.isfinite(xp.diagonal(K)).all()):
        raise ValueError(NONFINITE_GRAM)


# ---- directions (generic over a backend ``ops``; xp = ops.array_module) ----------
def _ops_default(ops):
    if ops is None:
        import sys
        return sys.modules[__name__]
    return ops


array_module = np   # so that this module can serve as ``ops`` itself


def batch_gradient(G, xp=np):
    """∇L = G^T 1 = sum_n g_n, (P,) float64."""
    return G.sum(axis=0, dtype=xp.float64)


def ef_direction(G, damping, ops=None):
    """EF: d = G^T (G G^T + λ I)^{-1} 1."""
    ops = _ops_default(ops)
    xp = ops.array_module
    return ops.fisher_sample_space_direction(G, xp.ones(G.shape[0], dtype=xp.float64), damping)


def ief_direction(G, s, damping, ops=None):
    """iEF (Wu et al. 2024, Eq. 8): d = G^T (G G^T + λ I)^{-1} s."""
    ops = _ops_default(ops)
    xp = ops.array_module
    return ops.fisher_sample_space_direction(G, s.astype(xp.float64), damping)


def woodbury_direction(A, grad, damping, ops=None):
    """(A^T A + λ I)^{-1} grad = (grad - A^T (A A^T + λ I)^{-1} A grad) / λ, float64 (P,)."""
    ops = _ops_default(ops)
    xp = ops.array_module
    grad = grad.astype(xp.float64)
    if A.dtype == xp.float64:
        v = A @ grad
    else:
        v = (A @ grad.astype(A.dtype)).astype(xp.float64)
    w = ops.fisher_sample_space_direction(A, v, damping).astype(xp.float64)
    return (grad - w) / damping


def sf_direction(G, J, probs, labels_sampled, damping, ops=None):
    """SF: d = (Ĝ^T Ĝ + λ I)^{-1} ∇L by Woodbury in K·N space; (P,) in G's dtype."""
    ops = _ops_default(ops)
    xp = ops.array_module
    # float64 Ĝ: (∇L − w)/λ cancels where ∇L lies in Ĝ's row space, so w must be accurate
    # to float64, not to the input dtype (the cost: a float64 K·N×P array, like the exact path's A).
    Gh = sampled_grads(J, probs, labels_sampled, xp=xp, dtype=xp.float64)
    return woodbury_direction(Gh, batch_gradient(G, xp), damping, ops).astype(G.dtype)


def exact_direction(G, J, probs, damping, ops=None, *, method="auto", cg_tol=1e-10, cg_maxiter=None):
    """Exact NG: d = (F + λ I)^{-1} ∇L; (P,) in G's dtype.

    method "woodbury": F = A^T A (fisher_factor), solve in N·C space (exact up to rounding);
    "cg": matrix-free conjugate gradients on F + λ I (nothing larger than J is stored);
    "auto": woodbury when N·C <= EXACT_WOODBURY_MAX_ROWS, else cg."""
    ops = _ops_default(ops)
    xp = ops.array_module
    grad = batch_gradient(G, xp)
    N, C, P = J.shape
    if method == "auto":
        method = "woodbury" if N * C <= EXACT_WOODBURY_MAX_ROWS else "cg"
    if method == "woodbury":
        A = fisher_factor(J, probs, xp=xp)
        return woodbury_direction(A, grad, damping, ops).astype(G.dtype)
    if method == "cg":
        J64 = J.astype(xp.float64)
        p64 = probs.astype(xp.float64)

        def matvec(v):
            Jv = xp.einsum("ncp,p->nc", J64, v)
            HJv = p64 * Jv - p64 * xp.sum(p64 * Jv, axis=1, keepdims=True)
            return xp.einsum("ncp,nc->p", J64, HJv) + damping * v

        x = conjugate_gradient(matvec, grad, xp=xp, tol=cg_tol, maxiter=cg_maxiter or 10 * P)
        return x.astype(G.dtype)
    raise ValueError(f"unknown exact method {method!r}; use 'auto', 'woodbury' or 'cg'")


def conjugate_gradient(matvec, b, *, xp=np, tol=1e-10, maxiter=1000):
    """Plain CG for a symmetric positive-definite operator, float64; stops at ||r|| <= tol ||b||."""
    x = xp.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = (tol * float(xp.sqrt(b @ b))) ** 2
    for _ in range(int(maxiter)):
        if rr <= stop:
            break
        Ap = matvec(p)
        alpha = rr / float(p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def ngd_direction(kind, *, G, damping, s=None, J=None, probs=None, labels_sampled=None, ops=None,
                  exact_method="auto"):
    """Dispatch on kind in {"exact", "ef", "sf", "ief"} (no validation; see fisheropt.fisher)."""
    if kind == "ef":
        return ef_direction(G, damping, ops)
    if kind == "ief":
        return ief_direction(G, s, damping, ops)
    if kind == "sf":
        return sf_direction(G, J, probs, labels_sampled, damping, ops)
    if kind == "exact":
        return exact_direction(G, J, probs, damping, ops, method=exact_method)
    raise ValueError(f"unknown kind {kind!r}")


# ---- dense forms (tests and small problems only: they build P x P) -------------
def dense_direction(F, grad, damping):
    """(F + λ I)^{-1} grad with a dense F (float64)."""
    F = np.asarray(F, dtype=np.float64)
    return np.linalg.solve(F + damping * np.eye(F.shape[0]), np.asarray(grad, dtype=np.float64))
