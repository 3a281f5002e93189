r"""Fisher estimators and natural-gradient directions (public, validated API).

Conventions (spec/fisher.md): a mini-batch of N samples, P parameters, C classes and the
**sum** loss :math:`L=\sum_n l_n`.

* ``G`` (N, P): per-sample gradients, row n = :math:`\nabla_\theta l_n`;
* ``J`` (N, C, P): logits Jacobians; ``probs`` (N, C): softmax probabilities;
* ``labels`` (N,): integer classes in 0..C-1; ``labels_sampled`` (K, N): K labels per
  datum drawn from ``probs`` (see :func:`sample_labels`), row k is the k-th draw;
* ``s`` (N,): :math:`s_n=\lVert p_n-e_{y_n}\rVert^2` (:func:`logit_grad_sq_norms`).

Mean loss :math:`\bar L = L/N` (curvlinops' ``reduction="mean"``): every curvature matrix of the
mean loss — exact Fisher, EF, SF, iEF and their diagonals — is the sum-loss one divided by N
(the EF of the mean loss is :math:`\frac1N\sum_n\nabla l_n\nabla l_n^\top`). So pass the sum-loss G
(if you have the per-sample gradients of :math:`\bar L`, which are :math:`\nabla l_n/N`, multiply them
by N) and the s above; the estimators here divided by N are the mean-loss ones; and for a damping
λ̄ of the mean loss call :func:`ngd_direction` with damping N·λ̄: it returns
:math:`(M/N+\bar\lambda I)^{-1}\nabla\bar L = (M+N\bar\lambda I)^{-1}\nabla L`, the mean-loss direction
itself (no rescaling of d).

Dense estimators (P×P, for small P and tests): :func:`exact`, :func:`empirical`,
:func:`sampled`, :func:`improved_empirical`. Matrix-free (scipy LinearOperator):
:func:`exact_operator`, :func:`empirical_operator`, :func:`sampled_operator`,
:func:`improved_operator`. Diagonals: :func:`diag_exact`, :func:`diag_empirical`,
:func:`diag_sampled`, :func:`diag_improved`. Directions: :func:`ngd_direction`
(never builds anything P×P when P exceeds the sample space). Quality: :func:`quality_indicator`,
:func:`relative_quality`.

Every function validates all its inputs before computing anything and raises
``ValueError``/``TypeError`` with the reason: arrays must be plain ``numpy.ndarray`` (or
``cupy.ndarray`` where a backend takes them) — not subclasses such as ``np.matrix``, NumPy scalars
or other frameworks' tensors — and floats float32/float64 in native byte order. A result that
would overflow (an entry beyond the float range) raises ValueError instead of holding Inf, and a
damping too small for float64 to deliver the direction accurately raises :class:`DampingTooSmall`
(a ValueError; spec/fisher.md §3, "Accuracy").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.sparse.linalg import LinearOperator  # pyright: ignore[reportMissingTypeStubs]  # scipy ships no annotations

from . import _ngd
from . import backends as _backends
from ._checks import (
    array_module,
    check_array_type,
    check_float_dtype,
    check_real,
    is_cupy_array,
    is_ndarray,
    positive_int,
)
from ._types import FloatArray, IntArray
from .refimpl import fisher_diagonal as _diag
from .refimpl import fisher_empirical as _emp
from .refimpl import fisher_exact as _exact
from .refimpl import fisher_improved as _imp
from .refimpl import fisher_ngd as _ngd_ref
from .refimpl import fisher_operators as _operators
from .refimpl import fisher_quality as _quality
from .refimpl import fisher_sampled as _sampled
from .refimpl.fisher_ngd import DampingTooSmall

__all__ = [
    "DampingTooSmall",
    "KINDS",
    "diag_empirical",
    "diag_exact",
    "diag_improved",
    "diag_sampled",
    "empirical",
    "empirical_operator",
    "exact",
    "exact_operator",
    "improved_empirical",
    "improved_operator",
    "logit_grad_sq_norms",
    "ngd_direction",
    "per_sample_grads",
    "quality_indicator",
    "relative_quality",
    "sample_labels",
    "sampled",
    "sampled_operator",
]

#: The kinds of natural-gradient direction :func:`ngd_direction` computes: "exact", "ef", "sf", "ief".
KINDS = _ngd.KINDS
_REQUIRED = {"ef": ("G",), "ief": ("G", "s"), "sf": ("G", "J", "probs", "labels_sampled"), "exact": ("G", "J", "probs")}


# ---- validation -------------------------------------------------------------------
_FINITE_CHUNK = 1 << 20  # elements per finiteness test: O(1 MiB) of temporaries, never a copy of a big array


def _all_finite(a: Any) -> bool:
    xp = array_module(a)
    if a.ndim == 0 or a.size == 0:
        return bool(xp.isfinite(a).all())
    rows = max(1, _FINITE_CHUNK // max(1, a.size // a.shape[0]))  # slices along axis 0: no reshape copy
    return all(bool(xp.isfinite(a[i : i + rows]).all()) for i in range(0, a.shape[0], rows))


def _array(a: Any, name: str, host_only: bool) -> None:
    """A plain numpy.ndarray (or cupy.ndarray unless ``host_only``): the one type rule, _checks'."""
    check_array_type(a, name)
    if host_only and is_cupy_array(a):
        raise TypeError(f"{name} must be a NumPy array here (this function runs on the host)")


def _float_array(a: Any, name: str, ndim: int, *, host_only: bool = False, check_finite: bool = True) -> None:
    _array(a, name, host_only)
    check_float_dtype(a.dtype, name)  # float32/float64, native byte order
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(a.shape)}")
    if check_finite and not _all_finite(a):
        raise ValueError(f"{name} contains NaN or Inf")


def _int_array(a: Any, name: str, ndim: int, n_classes: int, *, host_only: bool = False) -> None:
    # Labels are only read through NumPy/CuPy indexing and min/max, which convert a non-native
    # byte order correctly (tested), so integer labels of either byte order are accepted.
    _array(a, name, host_only)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class labels, got dtype {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(a.shape)}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= n_classes):
        raise ValueError(f"{name} must lie in 0..{n_classes - 1}, got values in {int(a.min())}..{int(a.max())}")


def _check_probs(probs: Any, N: int | None = None, *, host_only: bool = False) -> None:
    _float_array(probs, "probs", 2, host_only=host_only)
    if N is not None and probs.shape[0] != N:
        raise ValueError(f"probs has {probs.shape[0]} rows but the batch has N={N} samples")
    if probs.shape[1] < 2:
        raise ValueError(f"probs must have at least 2 classes, got shape {tuple(probs.shape)}")
    xp = array_module(probs)
    if bool((probs < 0).any()):
        raise ValueError("probs has negative entries; pass softmax probabilities")
    tol = 1e-3 if probs.dtype == np.float32 else 1e-6
    err = float(xp.abs(probs.sum(axis=1, dtype=xp.float64) - 1.0).max()) if probs.shape[0] else 0.0
    if err > tol:
        raise ValueError(f"rows of probs must sum to 1 (max deviation {err:.3g} > {tol:g})")


def _check_J(J: Any, probs: Any = None, *, host_only: bool = False) -> None:
    _float_array(J, "J", 3, host_only=host_only)
    if probs is not None and tuple(J.shape[:2]) != tuple(probs.shape):
        raise ValueError(
            f"J has shape {tuple(J.shape)} but probs has shape {tuple(probs.shape)}; "
            "J must be (N, C, P) with probs (N, C)"
        )


def _check_G(
    G: Any, *, P: int | None = None, N: int | None = None, host_only: bool = False, check_finite: bool = True
) -> None:
    _float_array(G, "G", 2, host_only=host_only, check_finite=check_finite)
    if N is not None and G.shape[0] != N:
        raise ValueError(f"G has {G.shape[0]} rows but J/probs have N={N} samples")
    if P is not None and G.shape[1] != P:
        raise ValueError(f"G has {G.shape[1]} columns but J has P={P} parameters")
    if G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"G must be non-empty, got shape {tuple(G.shape)}")


def _check_s(s: Any, N: int, *, positive: bool, host_only: bool = False) -> None:
    _float_array(s, "s", 1, host_only=host_only)
    if s.shape[0] != N:
        raise ValueError(f"s has shape {tuple(s.shape)} but G has N={N} rows")
    if positive and bool((s <= 0).any()):
        raise ValueError("s must be > 0 (iEF divides by s_n; a sample with s_n = 0 has g_n = 0, drop it)")
    if not positive and bool((s < 0).any()):
        raise ValueError("s must be >= 0 (squared norms)")


def _check_labels_sampled(labels_sampled: Any, N: int, C: int, *, host_only: bool = False) -> None:
    _int_array(labels_sampled, "labels_sampled", 2, C, host_only=host_only)
    if labels_sampled.shape[1] != N or labels_sampled.shape[0] < 1:
        raise ValueError(
            f"labels_sampled must have shape (K, N) = (K, {N}) with K >= 1, got {tuple(labels_sampled.shape)}"
        )


def _check_damping(damping: object, *, allow_zero: bool = False) -> float:
    return check_real("damping", damping, low=0.0, low_open=not allow_zero)


def _finite_result(out: Any, what: str, hint: str = "the inputs are too large") -> FloatArray:
    """Finite inputs can still overflow in products (g²/s with a subnormal s, a float32 cast):
    refuse to return Inf/NaN."""
    if not _all_finite(out):
        raise ValueError(f"{what} overflows {out.dtype.name} (an entry beyond its range): {hint}")
    return out


_IEF_OVERFLOW = "g_n²/s_n is too large for some sample (s_n tiny); scale G down or drop that sample"


# ---- per-sample quantities ---------------------------------------------------------
def per_sample_grads(J: FloatArray, probs: FloatArray, labels: IntArray) -> FloatArray:
    """G (N, P): g_n = J_n^T (p_n - e_{y_n}), in J's dtype."""
    _check_J_probs(J, probs)
    _int_array(labels, "labels", 1, probs.shape[1], host_only=True)
    if labels.shape[0] != J.shape[0]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but J has N={J.shape[0]} samples")
    return _emp.per_sample_grads(J, probs.astype(J.dtype), labels).astype(J.dtype, copy=False)


def logit_grad_sq_norms(probs: FloatArray, labels: IntArray) -> FloatArray:
    """s (N,): s_n = ||p_n - e_{y_n}||^2, in probs' dtype."""
    _check_probs(probs, host_only=True)
    _int_array(labels, "labels", 1, probs.shape[1], host_only=True)
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but probs has N={probs.shape[0]} rows")
    return _emp.logit_grad_sq_norms(probs, labels)


def sample_labels(
    probs: FloatArray, n_samples: int = 1, *, seed: int | np.random.Generator | None = None
) -> npt.NDArray[np.int64]:
    """(K, N) int64 labels, labels[k, n] ~ Categorical(probs[n]); ``seed``: int, None or a Generator."""
    _check_probs(probs, host_only=True)
    count = positive_int(n_samples)
    if count is None:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _sampled.sample_labels(probs, count, rng)


# ---- estimators: the dense matrix (P x P; small P only), its diagonal and the operator ----
def _check_J_probs(J: Any, probs: Any, labels_sampled: Any = None) -> None:
    """Host arrays J (N, C, P) and probs (N, C) that fit together; labels (K, N) if given."""
    _check_J(J, host_only=True)
    _check_probs(probs, J.shape[0], host_only=True)
    _check_J(J, probs)
    if labels_sampled is not None:
        _check_labels_sampled(labels_sampled, J.shape[0], J.shape[1], host_only=True)


def _check_G_s(G: Any, s: Any) -> None:
    """Host arrays G (N, P) and s (N,) > 0, for the iEF estimators (which divide by s)."""
    _check_G(G, host_only=True)
    _check_s(s, G.shape[0], positive=True, host_only=True)


def exact(J: FloatArray, probs: FloatArray) -> FloatArray:
    """F = sum_n J_n^T (diag p_n - p_n p_n^T) J_n, dense (P, P) in J's dtype."""
    _check_J_probs(J, probs)
    return _finite_result(_exact.exact(J, probs), "the exact Fisher")


def diag_exact(J: FloatArray, probs: FloatArray) -> FloatArray:
    """diag F, (P,)."""
    _check_J_probs(J, probs)
    return _finite_result(_diag.diag_exact(J, probs), "diag F")


def exact_operator(J: FloatArray, probs: FloatArray, damping: float = 0.0) -> LinearOperator:
    """scipy LinearOperator v -> (F + damping I) v, float64, nothing P x P stored."""
    _check_J_probs(J, probs)
    return _operators.exact_operator(J, probs, _check_damping(damping, allow_zero=True))


def empirical(G: FloatArray) -> FloatArray:
    """EF = G^T G, dense (P, P) in G's dtype."""
    _check_G(G, host_only=True)
    return _finite_result(_emp.empirical(G), "EF")


def diag_empirical(G: FloatArray) -> FloatArray:
    """diag EF = sum_n g_n^2, (P,)."""
    _check_G(G, host_only=True)
    return _finite_result(_diag.diag_empirical(G), "diag EF")


def empirical_operator(G: FloatArray, damping: float = 0.0) -> LinearOperator:
    """LinearOperator v -> (G^T G + damping I) v."""
    _check_G(G, host_only=True)
    return _operators.empirical_operator(G, _check_damping(damping, allow_zero=True))


def sampled(J: FloatArray, probs: FloatArray, labels_sampled: IntArray) -> FloatArray:
    """SF = (1/K) sum_{k,n} ĝ_kn ĝ_kn^T with labels_sampled (K, N), dense (P, P)."""
    _check_J_probs(J, probs, labels_sampled)
    return _finite_result(_sampled.sampled(J, probs.astype(J.dtype), labels_sampled), "SF")


def diag_sampled(J: FloatArray, probs: FloatArray, labels_sampled: IntArray) -> FloatArray:
    """diag SF = (1/K) sum_{k,n} ĝ_kn^2, (P,)."""
    _check_J_probs(J, probs, labels_sampled)
    return _finite_result(_diag.diag_sampled(J, probs.astype(J.dtype), labels_sampled), "diag SF")


def sampled_operator(
    J: FloatArray, probs: FloatArray, labels_sampled: IntArray, damping: float = 0.0
) -> LinearOperator:
    """LinearOperator v -> (Ĝ^T Ĝ + damping I) v."""
    _check_J_probs(J, probs, labels_sampled)
    return _operators.sampled_operator(
        J, probs.astype(J.dtype), labels_sampled, _check_damping(damping, allow_zero=True)
    )


def improved_empirical(G: FloatArray, s: FloatArray) -> FloatArray:
    """iEF = G^T diag(s)^{-1} G (Wu et al. 2024), dense (P, P); needs s > 0."""
    _check_G_s(G, s)
    return _finite_result(_imp.improved_empirical(G, s), "iEF", _IEF_OVERFLOW)


def diag_improved(G: FloatArray, s: FloatArray) -> FloatArray:
    """diag iEF = sum_n g_n^2 / s_n, (P,); needs s > 0."""
    _check_G_s(G, s)
    return _finite_result(_diag.diag_improved(G, s), "diag iEF", _IEF_OVERFLOW)


def improved_operator(G: FloatArray, s: FloatArray, damping: float = 0.0) -> LinearOperator:
    """LinearOperator v -> (G^T diag(s)^{-1} G + damping I) v; needs s > 0."""
    _check_G_s(G, s)
    damping = _check_damping(damping, allow_zero=True)
    # |F̃_ij| <= sqrt(F̃_ii F̃_jj): a finite float64 diagonal keeps every entry (and matvec with a
    # moderate v) finite, so one O(NP) pass settles it before the operator exists.
    _finite_result(_diag.diag_improved(G.astype(np.float64, copy=False), s), "the iEF operator", _IEF_OVERFLOW)
    return _operators.improved_operator(G, s, damping)


# ---- directions -------------------------------------------------------------------
def ngd_direction(
    kind: str,
    *,
    G: FloatArray,
    damping: float,
    s: FloatArray | None = None,
    J: FloatArray | None = None,
    probs: FloatArray | None = None,
    labels_sampled: IntArray | None = None,
    F: LinearOperator | None = None,
    backend: str = "numpy",
    exact_method: str = "auto",
    cg_maxiter: int | None = None,
) -> FloatArray:
    r"""Natural-gradient direction d (update θ ← θ − η d), (P,) in G's dtype.

    kind    required arguments             direction
    ------  -----------------------------  ----------------------------------------------------
    "ef"    G                              (EF + λI)⁻¹ ∇L = Gᵀ(GGᵀ + λI)⁻¹ 1
    "ief"   G, s                           Gᵀ(GGᵀ + λI)⁻¹ s = (EF + λI)⁻¹ Gᵀs (Wu et al. 2024, Eq. 8)
    "sf"    G, J, probs, labels_sampled    (SF + λI)⁻¹ ∇L
    "exact" G, J, probs                    (F + λI)⁻¹ ∇L

    with ∇L = Gᵀ1 and λ = ``damping`` > 0. Each is solved in the smaller of the parameter space
    and the sample space (N, K·N or N·C rows), so nothing P×P is built when P is the larger.
    ``exact_method``: "auto" | "woodbury" (the direct solve through the Fisher factor) | "cg"
    (matrix-free conjugate gradients; "auto" picks it when both spaces exceed 4096).
    ``backend``: "numpy", "numba", "cupy" or "auto" (CuPy arrays → cupy); host/device arrays are
    never copied silently.

    "exact" also takes the Fisher as an operator instead of J and probs: ``F`` of shape (P, P)
    with ``matvec`` (a SciPy LinearOperator, :func:`exact_operator`, or
    ``fisheropt.torch.FisherOperator(...).as_linear_operator()``: products, never J), solved on
    the host by conjugate gradients with the contract of ``exact_method="cg"`` (certified by λ
    alone; at most ``cg_maxiter`` iterations, default 10·P).

    Accuracy (spec/fisher.md §3): the relative rounding error is at most about 10·ε·κ, κ the
    condition number of the damped system; when that could exceed 1e-6 the call raises
    :class:`DampingTooSmall` (a ValueError naming a damping that works) instead, and a direction
    whose entries would overflow raises ValueError: never Inf/NaN.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    if F is not None:
        return _operator_direction(
            kind,
            G=G,
            F=F,
            damping=damping,
            exact_method=exact_method,
            others=(s, J, probs, labels_sampled),
            cg_maxiter=cg_maxiter,
        )
    given: dict[str, Any] = {"G": G, "s": s, "J": J, "probs": probs, "labels_sampled": labels_sampled}
    missing = [name for name in _REQUIRED[kind] if given[name] is None]
    if missing:
        raise ValueError(f"kind {kind!r} needs {', '.join(_REQUIRED[kind])}; missing: {', '.join(missing)}")
    unused = [name for name, v in given.items() if v is not None and name not in _REQUIRED[kind]]
    if unused:
        raise ValueError(f"kind {kind!r} does not use {', '.join(unused)}; leave them out")
    if exact_method not in ("auto", "woodbury", "cg"):
        raise ValueError(f"unknown exact_method {exact_method!r}; use 'auto', 'woodbury' or 'cg'")
    damping = _check_damping(damping)
    # ef/ief: G's finiteness is checked on diag(G Gᵀ) inside the backend (O(N), no extra pass
    # over G; see refimpl.fisher_ngd.check_gram); the other kinds check it here.
    _check_G(G, check_finite=kind not in ("ef", "ief"))
    N, P = G.shape
    if kind == "ief":
        _check_s(s, N, positive=False)
    if kind in ("sf", "exact"):
        assert J is not None and probs is not None  # required by these kinds: checked above
        _check_J(J)
        if J.shape[0] != N or J.shape[2] != P:
            raise ValueError(f"J has shape {tuple(J.shape)} but G has shape {tuple(G.shape)}; J must be (N, C, P)")
        _check_probs(probs, N)
        _check_J(J, probs)
        if kind == "sf":
            _check_labels_sampled(labels_sampled, N, J.shape[1])
    arrays = [a for a in given.values() if a is not None]
    backend_module = _backends.select(backend, arrays)
    if kind in ("sf", "exact"):
        assert J is not None and probs is not None
        given["probs"] = probs.astype(J.dtype, copy=False)
    d = _ngd.ngd_direction(kind, damping=damping, backend=backend_module, exact_method=exact_method, **given)
    return _finite_result(d, "the direction", "|d| exceeds the float range (a larger damping shrinks it)")


def _operator_direction(
    kind: str,
    *,
    G: FloatArray,
    F: Any,
    damping: float,
    exact_method: str,
    others: tuple[object, ...],
    cg_maxiter: object,
) -> FloatArray:
    """(F + λI)⁻¹ ∇L by conjugate gradients on the products of the operator F (host, float64)."""
    if kind != "exact":
        raise ValueError(f"F (a Fisher operator) is used by kind 'exact' only; kind {kind!r} does not take it")
    if any(a is not None for a in others):
        raise ValueError("kind 'exact' takes either J and probs, or the operator F; not both")
    if exact_method == "woodbury":
        raise ValueError("exact_method='woodbury' needs J; an operator F is solved by conjugate gradients")
    damping = _check_damping(damping)
    _check_G(G, host_only=True)
    P = G.shape[1]
    if not callable(getattr(F, "matvec", None)) or tuple(getattr(F, "shape", ())) != (P, P):
        raise ValueError(
            f"F must be a linear operator of shape ({P}, {P}) with matvec (a scipy LinearOperator, "
            "fisher.exact_operator(J, probs), fisheropt.torch.FisherOperator(...).as_linear_operator())"
        )
    maxiter = 10 * P if cg_maxiter is None else positive_int(cg_maxiter)
    if maxiter is None:
        raise ValueError(f"cg_maxiter must be a positive int, got {cg_maxiter!r}")
    grad = G.sum(axis=0, dtype=np.float64)

    def damped(v: FloatArray) -> FloatArray:
        return np.asarray(F.matvec(v), dtype=np.float64).ravel() + damping * v

    d = _ngd_ref.conjugate_gradient(damped, grad, maxiter=maxiter, damping=damping)
    return _finite_result(
        d.astype(G.dtype), "the direction", "|d| exceeds the float range (a larger damping shrinks it)"
    )


# ---- quality ------------------------------------------------------------------------
def _check_quality_args(d: Any, F: Any, grad: Any) -> None:
    _float_array(d, "d", 1, host_only=True)
    _float_array(grad, "grad", 1, host_only=True)
    P = d.shape[0]
    if grad.shape != (P,):
        raise ValueError(f"grad has shape {tuple(grad.shape)} but d has shape ({P},)")
    if is_ndarray(F) or not hasattr(F, "matvec"):  # else an operator
        _float_array(F, "F", 2, host_only=True)
    shape = tuple(getattr(F, "shape", ()))
    if shape != (P, P):
        raise ValueError(f"F has shape {shape}; expected ({P}, {P})")


def quality_indicator(d: FloatArray, F: FloatArray | LinearOperator, grad: FloatArray) -> float:
    r"""γ(d) = sqrt(dᵀ F d) / \|dᵀ ∇L\|; F dense (P, P) or a scipy LinearOperator.

    Scale-invariant; minimised by the exact natural gradient F⁺∇L. Compare directions
    with :func:`relative_quality` (γ(d)/γ(∇L), below 1 beats SGD)."""
    _check_quality_args(d, F, grad)
    return _quality.quality_indicator(d, F, grad)


def relative_quality(d: FloatArray, F: FloatArray | LinearOperator, grad: FloatArray) -> float:
    """γ(d) / γ(grad)."""
    _check_quality_args(d, F, grad)
    return _quality.relative_quality(d, F, grad)
