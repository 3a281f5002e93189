r"""Natural-gradient directions in sample space — spec/fisher.md §3–4.

Update :math:`\theta\leftarrow\theta-\eta d`, damping :math:`\lambda>0`,
:math:`\nabla L = G^\top\mathbf 1`. Every direction is a damped solve :math:`d = (A^\top A+\lambda I)^{-1}g`
for a factor :math:`A` (M × P) — :math:`G` (EF, iEF), :math:`\hat G` (SF) or the Fisher factor (exact) —
and nothing P×P is ever built when P > M. The formulation is chosen for accuracy
(spec/fisher.md §3, "Accuracy"):

* EF, iEF (:math:`g = G^\top\mathrm{rhs}`, rhs = 1 or s): through the smaller Gram,
  :math:`d = G^\top(GG^\top+\lambda I)^{-1}\mathrm{rhs}` when N ≤ P,
  :math:`d = (G^\top G+\lambda I)^{-1}G^\top\mathrm{rhs}` when N > P (there :math:`GG^\top` is
  singular); neither divides by λ.
* SF, exact (any g): P ≤ M: :math:`d = (A^\top A+\lambda I)^{-1}g` directly; P > M: Woodbury,
  :math:`d = \big(g - A^\top(AA^\top+\lambda I)^{-1}Ag\big)/\lambda`, whose cancellation costs
  :math:`\varepsilon\lVert A^\top A\rVert/\lambda`; or matrix-free conjugate gradients (exact only).
* Every solve knows the condition number κ of what it relies on and raises :class:`DampingTooSmall`
  when ``ERROR_CONSTANT``·ε·κ > ``MAX_ERROR`` instead of returning an inaccurate direction.

Backend functions (identical signatures on every backend):

``fisher_gram(G) -> gram``
    :math:`GG^\top`, (N, N) float64. float64 G: one float64 BLAS product. float32 G:
    float32 BLAS products over column blocks of ``GRAM_BLOCK`` parameters, each upcast and
    accumulated in float64 — the speed of single-precision BLAS, no float64 copy of G, and the
    float32 rounding error of a block product grows with the block length, not with P.
``fisher_sample_space_direction(G, rhs, damping) -> d``
    :math:`d = G^\top (GG^\top + \lambda I)^{-1}\,\mathrm{rhs} = (G^\top G+\lambda I)^{-1}G^\top\mathrm{rhs}`,
    (P,) in G's dtype, through the smaller Gram (:func:`sample_space_direction`, shared by the
    backends). The system is solved in float64 by Cholesky after an exact check of its condition
    number (eigenvalues); raises ValueError when diag of the Gram is non-finite (G holds NaN/Inf):
    the only check of G a backend makes, O(N), and the one the public API relies on for G.

The directions (:func:`ef_direction`, :func:`ief_direction`, :func:`sf_direction`,
:func:`exact_direction`, :func:`ngd_direction`) are written here in NumPy. fisheropt.fisher runs
the same formulas on any backend (fisheropt._ngd), through the building blocks that take the
backend's pieces as arguments: :func:`sample_space_direction`, :func:`factor_direction`,
:func:`exact_cg_solve`. Inputs are assumed valid (fisheropt.fisher validates).
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg

from .fisher_exact import fisher_factor
from .fisher_sampled import sampled_grads

GRAM_BLOCK = 1 << 15  # parameters (columns of G) per float32 block product in fisher_gram
EXACT_WOODBURY_MAX_ROWS = 4096  # exact direction: a direct solve when min(N*C, P) is at most this, else CG

# The accuracy contract (spec/fisher.md §3): a returned direction's relative rounding error is at
# most about ERROR_CONSTANT·ε·κ (times the cancellation in forming F and ∇L themselves), and a
# solve whose κ would allow more than MAX_ERROR raises DampingTooSmall instead.
EPS = float(np.finfo(np.float64).eps)
ERROR_CONSTANT = 10.0
MAX_ERROR = 1e-6
MAX_CONDITION = MAX_ERROR / (ERROR_CONSTANT * EPS)  # ≈ 4.5e8


class DampingTooSmall(ValueError):
    """The damping is too small for the problem: float64 cannot deliver the direction to the
    accuracy of spec/fisher.md §3. The message names a damping that is large enough."""


def check_condition(kappa, damping, scale, what="the damped system"):
    """Raise DampingTooSmall when ERROR_CONSTANT·ε·κ > MAX_ERROR (or κ is NaN).

    ``scale`` bounds the largest eigenvalue of the undamped matrix from above, so the suggested
    damping, 1.01·scale/(MAX_CONDITION − 1), gives κ ≤ (scale + λ)/λ < MAX_CONDITION."""
    if kappa <= MAX_CONDITION:
        return
    suggestion = 1.01 * scale / (MAX_CONDITION - 1.0)
    raise DampingTooSmall(
        f"damping={damping:.3g} is too small for this problem: {what} has condition number "
        f"{kappa:.2g}, so float64 rounding could leave a relative error up to "
        f"{min(ERROR_CONSTANT * EPS * kappa, 1.0):.1g} (more than {MAX_ERROR:g}) in the direction; "
        f"use damping >= {suggestion:.3g} or more (spec/fisher.md §3, Accuracy)"
    )


# ---- backend functions (the "numpy" backend) ------------------------------------
def fisher_gram(G):
    """GGᵀ, (N, N) float64 (float32 G: blockwise float32 BLAS, float64 accumulation)."""
    N, P = G.shape
    if G.dtype == np.float64 or P <= GRAM_BLOCK:
        gram = G @ G.T  # syrk
        return gram.astype(np.float64, copy=False) if G.dtype == np.float64 else gram.astype(np.float64)
    gram = np.zeros((N, N), dtype=np.float64)
    for start in range(0, P, GRAM_BLOCK):
        block = G[:, start : start + GRAM_BLOCK]  # strided view, no copy; BLAS takes lda = P
        gram += block @ block.T
    return gram


def damped_condition(w, singular_damping=None):
    """κ of gram + λI from its ascending eigenvalues w (inf when not positive definite in float64);
    with ``singular_damping`` = λ, at least (‖gram‖ + λ)/λ, the κ of a singular AᵀA + λI."""
    kappa = float(w[-1] / w[0]) if w[0] > 0 else math.inf
    return kappa if singular_damping is None else max(kappa, float(w[-1]) / singular_damping)


def checked_damped_gram(gram, damping, *, singular=False, xp=np):
    """gram + λI in float64, once its condition number (exact, from its eigenvalues; O(n³) like
    the factorisation that follows) passed check_condition. Every backend's solve starts here.

    ``singular``: the caller divides by λ afterwards (Woodbury, AᵀA singular), so the condition
    number that matters is that of AᵀA + λI, (‖gram‖ + λ)/λ."""
    damped = xp.asarray(gram, dtype=xp.float64) + damping * xp.eye(gram.shape[0], dtype=xp.float64)
    w = xp.linalg.eigvalsh(damped)
    check_condition(
        damped_condition(w, damping if singular else None),
        damping,
        float(w[-1]),
        "F + λI (singular, P > rank)" if singular else "the damped Gram matrix",
    )
    return damped


def solve_damped_gram(gram, rhs, damping, *, singular=False):
    """(gram + damping I)^{-1} rhs in float64 for a symmetric PSD gram: Cholesky of the checked
    :func:`checked_damped_gram`."""
    damped = checked_damped_gram(gram, damping, singular=singular)
    factor = scipy.linalg.cho_factor(damped, lower=True, check_finite=False)
    return scipy.linalg.cho_solve(factor, np.asarray(rhs, dtype=np.float64), check_finite=False)


def sample_space_direction(G, rhs, damping, *, gram, solve, xp=np):
    """d = Gᵀ(GGᵀ + λI)⁻¹rhs = (GᵀG + λI)⁻¹Gᵀrhs through the smaller Gram; the backends share it
    with their own ``gram`` (GGᵀ, float64) and ``solve`` ((gram + λI)⁻¹ rhs, checked)."""
    N, P = G.shape
    # Solve for rhs scaled by a power of two into [1, 2) and scale d back: exact, and a subnormal
    # right-hand side (iEF's s) keeps full precision through the solve.
    top = float(xp.abs(rhs).max())
    shift = math.frexp(top)[1] - 1 if 0.0 < top < math.inf else 0
    rhs = xp.ldexp(rhs, -shift) if shift else rhs
    if P < N:  # more samples than parameters: GGᵀ is singular, GᵀG (P × P) need not be
        parameter_gram = gram(G.T)
        check_gram(parameter_gram, G.dtype, xp)
        d = solve(parameter_gram, G.T.astype(xp.float64, copy=False) @ rhs, damping).astype(G.dtype)
    else:
        sample_gram = gram(G)
        check_gram(sample_gram, G.dtype, xp)
        d = G.T @ solve(sample_gram, rhs, damping).astype(G.dtype)
    return xp.ldexp(d, shift, out=d) if shift else d  # in place: d is ours, and may be large


def fisher_sample_space_direction(G, rhs, damping):
    """d = G^T (G G^T + damping I)^{-1} rhs, (P,) in G's dtype; the solve in float64."""
    return sample_space_direction(G, rhs, float(damping), gram=fisher_gram, solve=solve_damped_gram)


NONFINITE_GRAM = (
    "G contains NaN or Inf (detected on the diagonal of its Gram matrix, which is "
    "non-finite exactly when a row (column) of G is, or when its squared norm overflows)"
)


def check_gram(gram, dtype: npt.DTypeLike = np.float64, xp=np):
    """The O(N) guard on a Gram matrix's diagonal (squared row or column norms of G): non-finite iff
    G holds NaN/Inf (or a squared norm overflows), so G itself never needs a separate pass; and
    all of it so small that the products underflowed, where the Gram would have lost its precision."""
    diag = xp.diagonal(gram)
    if not bool(xp.isfinite(diag).all()):
        raise ValueError(NONFINITE_GRAM)
    top = float(diag.max()) if diag.size else 0.0
    info = np.finfo(dtype)
    if 0.0 < top < float(info.tiny) / float(info.eps):
        raise ValueError(
            f"G is too small for a {np.dtype(dtype).name} Gram matrix (largest squared "
            f"norm {top:.3g}: the products underflow and lose their precision); multiply "
            "G by 2**k and the damping by 4**k, and the direction comes out divided by 2**k"
        )


# ---- the directions (spec/fisher.md §3) ------------------------------------------
def batch_gradient(G, xp=np):
    """∇L = G^T 1 = sum_n g_n, (P,) float64."""
    return G.sum(axis=0, dtype=xp.float64)


def ef_direction(G, damping):
    """EF: d = (GᵀG + λI)⁻¹∇L = Gᵀ(GGᵀ + λI)⁻¹1, (P,) in G's dtype."""
    return fisher_sample_space_direction(G, np.ones(G.shape[0], dtype=np.float64), damping)


def ief_direction(G, s, damping):
    """iEF (Wu et al. 2024, Eq. 8): d = Gᵀ(GGᵀ + λI)⁻¹s, (P,) in G's dtype."""
    return fisher_sample_space_direction(G, s.astype(np.float64), damping)


def factor_direction(A, grad, damping, *, gram=fisher_gram, solve=solve_damped_gram, xp=np):
    """(AᵀA + λI)⁻¹ grad for a float64 factor A (M, P) and any grad, float64 (P,).

    P ≤ M: solve the P × P system itself (no larger than the M × M Gram), no division by λ.
    P > M: AᵀA is singular and the Woodbury form (grad − Aᵀ(AAᵀ + λI)⁻¹A grad)/λ cancels where grad
    lies in A's row space, to about ε·‖AᵀA‖/λ relative: the solve checks that condition number.
    ``gram``, ``solve`` and ``xp`` are NumPy's here; fisheropt.fisher passes a backend's."""
    M, P = A.shape
    if P <= M:
        parameter_gram = gram(A.T)
        check_gram(parameter_gram, A.dtype, xp)
        return solve(parameter_gram, grad, damping)
    sample_gram = gram(A)
    check_gram(sample_gram, A.dtype, xp)
    a = solve(sample_gram, A @ grad, damping, singular=True)
    return (grad - A.T @ a) / damping


def sf_direction(G, J, probs, labels_sampled, damping):
    """SF: d = (ĜᵀĜ + λI)⁻¹∇L (:func:`factor_direction` with A = Ĝ), (P,) in G's dtype.

    Ĝ is built in float64: the Woodbury form cancels where ∇L lies in Ĝ's row space, so its terms
    must carry float64 accuracy, not the input dtype's (the cost: a float64 K·N × P array, like
    the exact direction's factor A)."""
    sampled = sampled_grads(J, probs, labels_sampled, dtype=np.float64)
    return factor_direction(sampled, batch_gradient(G), damping).astype(G.dtype)


def choose_exact_method(method, J_shape):
    """The exact direction's solver: "woodbury" or "cg" as given; "auto": woodbury when
    min(N·C, P) <= EXACT_WOODBURY_MAX_ROWS, else cg (spec/fisher.md §3)."""
    if method == "auto":
        N, C, P = J_shape
        return "woodbury" if min(N * C, P) <= EXACT_WOODBURY_MAX_ROWS else "cg"
    if method in ("woodbury", "cg"):
        return method
    raise ValueError(f"unknown exact method {method!r}; use 'auto', 'woodbury' or 'cg'")


def exact_direction(G, J, probs, damping, *, method="auto", cg_tol=1e-10, cg_maxiter=None):
    """Exact NG: d = (F + λI)⁻¹∇L, (P,) in G's dtype.

    "woodbury": F = AᵀA with the Fisher factor A (fisher_exact.fisher_factor), then
    :func:`factor_direction` (a direct solve in the smaller of the N·C and P spaces); "cg":
    :func:`exact_cg_solve`, matrix-free; "auto": see :func:`choose_exact_method`."""
    grad = batch_gradient(G)
    if choose_exact_method(method, J.shape) == "cg":
        return exact_cg_solve(J, probs, grad, damping, tol=cg_tol, maxiter=cg_maxiter).astype(G.dtype)
    return factor_direction(fisher_factor(J, probs), grad, damping).astype(G.dtype)


def exact_trace(J64, p64, xp=np):
    """An upper bound on tr F = Σ_n [Σ_c p_nc ‖J_nc‖² − ‖Σ_c p_nc J_nc‖²], matrix-free; the slack covers
    the cancellation of the difference."""
    t1 = float(xp.einsum("nc,ncp,ncp->", p64, J64, J64))
    m = xp.einsum("nc,ncp->np", p64, J64)
    return max(t1 - float(xp.einsum("np,np->", m, m)), 0.0) + 1e-10 * t1


def exact_cg_solve(J, probs, grad, damping, *, tol=1e-10, maxiter=None, xp=np):
    """(F + λI)⁻¹ grad by conjugate gradients on v ↦ Σ_n J_nᵀH_nJ_n v + λv, float64 (P,): nothing
    larger than J is stored. Certified by λ alone (F + λI ⪰ λI), so the condition number that
    matters is (tr F + λ)/λ, checked first."""
    J64 = J.astype(xp.float64)
    p64 = probs.astype(xp.float64)
    trace = exact_trace(J64, p64, xp)
    check_condition((trace + damping) / damping, damping, trace, "F + λI (CG is certified by λ alone)")

    def matvec(v):
        Jv = xp.einsum("ncp,p->nc", J64, v)
        HJv = p64 * Jv - p64 * xp.sum(p64 * Jv, axis=1, keepdims=True)
        return xp.einsum("ncp,nc->p", J64, HJv) + damping * v

    maxiter = maxiter or 10 * J.shape[2]
    return conjugate_gradient(matvec, grad, xp=xp, tol=tol, maxiter=maxiter, damping=damping)


def conjugate_gradient(
    matvec: Callable[[Any], Any],
    b: npt.NDArray[Any],
    *,
    xp: Any = np,
    tol: float = 1e-10,
    maxiter: int = 1000,
    damping: float = 0.0,
):
    """CG for a symmetric positive-definite operator M ⪰ λI (λ = ``damping``), float64.

    Stops when ||r|| <= tol·||b|| and ||r|| <= ½·MAX_ERROR·λ·||x||. The second is a certificate:
    ||x − x*|| <= ||r||/λ since M ⪰ λI. The true residual is checked at the end, and
    DampingTooSmall is raised when it does not certify MAX_ERROR (rounding floor or maxiter)."""
    x = xp.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = (tol * float(xp.sqrt(b @ b))) ** 2
    cert = 0.5 * MAX_ERROR * damping
    for _ in range(int(maxiter)):
        if rr <= stop and rr <= cert**2 * float(x @ x):
            break
        Ap = matvec(p)
        alpha = rr / float(p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    residual = float(xp.linalg.norm(b - matvec(x)))
    if not residual <= MAX_ERROR * damping * float(xp.linalg.norm(x)):  # also catches NaN
        raise DampingTooSmall(
            f"conjugate gradients could not certify the direction to {MAX_ERROR:g} (residual "
            f"{residual:.3g} > {MAX_ERROR:g}·damping·‖d‖ after at most {int(maxiter)} iterations): damping="
            f"{damping:.3g} is too small for exact_method='cg' here; use a larger damping or exact_method='woodbury'"
        )
    return x


def ngd_direction(kind, *, G, damping, s=None, J=None, probs=None, labels_sampled=None, exact_method="auto"):
    """The direction of ``kind`` in {"exact", "ef", "sf", "ief"} (no validation; see fisheropt.fisher)."""
    if kind == "ef":
        return ef_direction(G, damping)
    if kind == "ief":
        return ief_direction(G, s, damping)
    if kind == "sf":
        return sf_direction(G, J, probs, labels_sampled, damping)
    if kind == "exact":
        return exact_direction(G, J, probs, damping, method=exact_method)
    raise ValueError(f"unknown kind {kind!r}")


# ---- dense forms (tests and small problems only: they build P x P) -------------
def dense_direction(F, grad, damping):
    """(F + λ I)^{-1} grad with a dense F (float64)."""
    F = np.asarray(F, dtype=np.float64)
    return np.linalg.solve(F + damping * np.eye(F.shape[0]), np.asarray(grad, dtype=np.float64))
