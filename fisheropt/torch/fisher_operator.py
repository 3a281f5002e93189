r"""The exact Fisher of a PyTorch classifier as matrix-vector products, and conjugate gradients.

:class:`FisherOperator` applies the exact Fisher (= the generalised Gauss–Newton matrix for softmax
cross-entropy, spec/fisher.md §2) of a model on one batch, at its current parameters, **without
ever forming the logits Jacobian J** (N·C·P numbers):

.. math:: F v = \sum_n J_n^\top H_n (J_n v),\qquad H_n u = p_n\odot u - p_n (p_n^\top u)

with :math:`J v` for the whole batch from one forward-mode product (``torch.func.jvp``; samples do not
interact, so the batch's Jacobian is block-diagonal over samples), :math:`H_n` applied in O(C) per
sample (per token for sequence models, padded tokens masked out) in float64, and
:math:`\sum_n J_n^\top u_n` from one reverse-mode product (``torch.func.vjp``, whose forward pass is
kept between products). ``kind="sf"`` replaces :math:`H_n` by
:math:`\frac1K\sum_k r_{kn}r_{kn}^\top`, :math:`r_{kn}=p_n-e_{\hat y_{kn}}` with labels drawn from the
model — the sampled Fisher, matrix-free. ``mode="vjp"`` computes :math:`Jv` by reverse-over-reverse
differentiation instead, for models with an operation that has no forward-mode derivative
(``"auto"``, the default, switches to it on the first such error).

Memory: the activations of the batch's forward pass (as in a training step; ``chunk_size`` bounds
them to one chunk of samples, at the price of recomputing the forward pass in each product), the
(N, C) logits and probabilities, and O(P) for the vectors: nothing N·C·P, nothing P×P.

:func:`conjugate_gradient` solves :math:`(F+\lambda I)x=b` with these products (float64 vectors,
torch or NumPy), :func:`operator_ngd_direction` is the NumPy/SciPy ``LinearOperator`` form proposed
for ``fisheropt.fisher.ngd_direction("exact", F=...)``.

Stopping rule of :func:`conjugate_gradient` (documented contract): iterate standard CG from
:math:`x_0 = 0` until the recursively updated residual satisfies
:math:`\lVert r_k\rVert \le \mathrm{rtol}\,\lVert b\rVert` (and, with ``certify=c``, also
:math:`\lVert r_k\rVert\le\frac c2\lambda\lVert x_k\rVert`), or ``maxiter`` products have been spent;
then recompute the **true** residual :math:`b-(F+\lambda I)x` with one more product. Converged means
the true residual meets the same bounds (with ``certify``: :math:`\lVert x-x^*\rVert\le
\lVert r\rVert/\lambda\le c\lVert x\rVert`, since :math:`F+\lambda I\succeq\lambda I`). Otherwise CG
restarts from x with the true residual while products remain (at most 3 restarts), and when it
still has not converged it warns (:class:`CGConvergenceWarning`, with the residual) or, with
``on_fail="raise"``, raises :class:`CGNotConverged`. Every CG iterate is a descent direction
(:math:`b^\top x_k > 0`), so an unconverged x is still usable.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from scipy.sparse.linalg import LinearOperator  # pyright: ignore[reportMissingTypeStubs]  # scipy ships no annotations
from torch import nn

from .._checks import positive_int
from ._tensors import from_numpy
from .per_sample import CheckedBatch, ParamLayout, check_chunk, check_output, logit_statistics

__all__ = [
    "FisherOperator",
    "conjugate_gradient",
    "CGResult",
    "CGNotConverged",
    "CGConvergenceWarning",
    "operator_ngd_direction",
    "DEFAULT_CG_RTOL",
    "DEFAULT_CG_MAXITER",
]

#: Defaults of NaturalGradient's matrix-free solves (relative residual, iteration cap).
DEFAULT_CG_RTOL = 1e-4
DEFAULT_CG_MAXITER = 250
_MAX_RESTARTS = 3


class CGNotConverged(RuntimeError):
    """Conjugate gradients did not reach the requested residual within the iteration cap."""


class CGConvergenceWarning(RuntimeWarning):
    """Conjugate gradients stopped at the iteration cap above the requested residual (the result,
    a descent direction, is used)."""


class CGResult(NamedTuple):
    """``x``; ``iterations`` (CG steps); ``matvecs`` (operator products, incl. the residual checks);
    ``residual`` (true relative residual ‖b − (F+λI)x‖/‖b‖); ``error_bound`` (‖r‖/(λ‖x‖) ≥
    ‖x − x*‖/‖x‖; inf when λ = 0); ``converged``."""

    x: torch.Tensor | np.ndarray[Any, np.dtype[np.float64]]  # the kind of b
    iterations: int
    matvecs: int
    residual: float
    error_bound: float
    converged: bool


#: A float64 vector: a torch tensor or a NumPy array (a solve keeps the kind of its right-hand side).
_Vector = TypeVar("_Vector", torch.Tensor, npt.NDArray[np.float64])


def _copy(a: _Vector) -> _Vector:
    return a.clone() if isinstance(a, torch.Tensor) else np.copy(a, order="C")


def _norm(a: _Vector) -> float:
    return math.sqrt(max(float(a @ a), 0.0))


def conjugate_gradient(
    matvec: Callable[[_Vector], _Vector],
    b: _Vector,
    *,
    damping: float = 0.0,
    rtol: float = 1e-6,
    maxiter: int | None = None,
    certify: float | None = None,
    on_fail: str = "warn",
) -> CGResult:
    r"""Solve :math:`(M+\lambda I)x = b` for a symmetric positive semi-definite ``matvec`` (M), λ = ``damping``.

    ``b``: a float64 (P,) torch tensor or NumPy array (``matvec`` takes and returns the same kind).
    Stopping rule, restarts and failure handling: module docstring. ``maxiter`` (default P) caps the
    CG iterations; ``on_fail``: "warn" (:class:`CGConvergenceWarning`) or "raise"
    (:class:`CGNotConverged`). A product that is not finite raises ValueError; a curvature
    ``pᵀ(M+λI)p <= 0`` (an operator that is not positive definite, e.g. rounding at a tiny damping)
    stops the iteration and is reported as non-convergence. Returns a :class:`CGResult`.
    """
    if on_fail not in ("warn", "raise"):
        raise ValueError(f"on_fail must be 'warn' or 'raise', got {on_fail!r}")
    damping = float(damping)
    if not (damping >= 0.0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite real >= 0, got {damping!r}")
    if not _in_unit_interval(rtol):
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}")
    P = b.shape[0]
    cap = P if maxiter is None else positive_int(maxiter)
    if cap is None:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}")
    if certify is not None and (damping == 0.0 or not 0.0 < certify < 1.0):
        raise ValueError("certify needs damping > 0 and a bound in (0, 1)")

    def apply(v: _Vector) -> _Vector:
        out = matvec(v)
        return out + damping * v if damping else out

    bnorm = _norm(b)
    if not math.isfinite(bnorm):
        raise ValueError("the right-hand side of the solve is not finite")
    x = b * 0.0
    if bnorm == 0.0:
        return CGResult(x, 0, 0, 0.0, 0.0, True)
    target = rtol * bnorm
    half_cert = 0.5 * certify * damping if certify is not None else None
    it = matvecs = restarts = 0
    breakdown = None
    r = _copy(b)
    while True:
        p = _copy(r)
        rr = float(r @ r)
        while it < cap:
            rn = math.sqrt(rr)
            if rn <= target and (half_cert is None or rn <= half_cert * _norm(x)):
                break
            Ap = apply(p)
            matvecs += 1
            pAp = float(p @ Ap)
            if not math.isfinite(pAp):
                raise ValueError(
                    "a Fisher-vector product is not finite (NaN/Inf in the model's outputs or "
                    "derivatives at these parameters)"
                )
            if pAp <= 0.0:  # not positive definite at the rounding level: stop, report below
                breakdown = pAp
                break
            alpha = rr / pAp
            x += alpha * p
            r -= alpha * Ap
            rr_new = float(r @ r)
            p = r + (rr_new / rr) * p
            rr = rr_new
            it += 1
        r = b - apply(x)
        matvecs += 1
        res = _norm(r)
        xn = _norm(x)
        ok = res <= target and (certify is None or res <= certify * damping * xn)
        if ok or it >= cap or restarts >= _MAX_RESTARTS or breakdown is not None:
            break
        restarts += 1
    bound = res / (damping * xn) if damping > 0 and xn > 0 else math.inf
    result = CGResult(x, it, matvecs, res / bnorm, bound, bool(ok))
    if not ok:
        what = (
            f"relative residual {res / bnorm:.3g} > rtol={rtol:g}"
            if res > target
            else f"error bound ‖r‖/(λ‖x‖) = {bound:.3g} > certify={certify:g}"
        )
        if breakdown is not None:
            what += (
                f"; breakdown: pᵀ(F + λI)p = {breakdown:.3g} <= 0, the operator is not positive definite "
                "to rounding (increase the damping)"
            )
        msg = (
            f"conjugate gradients did not converge: {what} after {it} iterations "
            f"(maxiter={cap}, damping={damping:.3g}); raise maxiter or the damping, or loosen rtol "
            "(a float32 model's products limit the attainable residual to about 1e-6·κ)"
        )
        if on_fail == "raise":
            raise CGNotConverged(msg)
        warnings.warn(msg, CGConvergenceWarning, stacklevel=3)
    return result


class FisherOperator:
    r"""Matrix-free exact Fisher (``kind="exact"``) or sampled Fisher (``kind="sf"``) of ``model`` on a batch.

    ``inputs`` (N, ...) as for :func:`fisheropt.torch.per_sample_grads`; ``targets`` (N,) or (N, T) are
    optional for the Fisher itself (it does not depend on the labels) but mark the tokens that count
    (``ignore_index``) and give :meth:`gradient`. ``params``/``layout`` select the parameters
    (:class:`~fisheropt.torch.ParamLayout`). ``kind="sf"``: ``n_samples`` (K) labels per sample
    (per token) drawn from the model's probabilities with ``generator``, or given as
    ``labels_sampled`` (K, M), M the number of logit rows (N, or N·T).

    The operator is the **undamped**, sum-loss Fisher at the parameters' values when it was built
    (changing the parameters afterwards does not change it). ``matvec(v)`` takes a (P,) torch tensor
    or NumPy array (any float dtype) and returns float64 of the same kind; the model itself runs in
    its parameters' dtype, so a float32 model's products carry float32 rounding
    (:math:`\approx10^{-7}\lVert F\rVert\lVert v\rVert`). :meth:`as_linear_operator` gives a SciPy
    ``LinearOperator`` for :mod:`fisheropt.fisher` (``relative_quality``) and SciPy's solvers.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        targets: torch.Tensor | None = None,
        *,
        kind: str = "exact",
        params: Iterable[Any] | None = None,
        n_samples: int = 1,
        labels_sampled: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        mode: str = "auto",
        layout: ParamLayout | None = None,
    ) -> None:
        if kind not in ("exact", "sf"):
            raise ValueError(f"kind must be 'exact' or 'sf', got {kind!r}")
        if mode not in ("auto", "jvp", "vjp"):
            raise ValueError(f"mode must be 'auto', 'jvp' or 'vjp', got {mode!r}")
        chunk_size = check_chunk(chunk_size)
        batch = CheckedBatch(model, inputs, targets, params, ignore_index, layout)
        self.kind, self.mode = kind, mode
        self._batch = batch
        self.layout = batch.layout
        self.P = self.layout.P
        self.shape = (self.P, self.P)
        self.dtype = np.dtype(np.float64)
        self.N, self.C = batch.N, batch.C
        self._primals = self.layout.primals()
        self._chunk = batch.N if chunk_size is None else min(chunk_size, batch.N)
        self._cache = self._chunk >= batch.N  # one chunk: keep its forward pass for every product
        self._vjps: dict[int, Callable[..., tuple[torch.Tensor, ...]]] = {}
        logits: list[torch.Tensor] = []
        for a, b, args, _ in batch.chunks(self._chunk):

            def forward(*ps: torch.Tensor, args: tuple[torch.Tensor, ...] = args) -> torch.Tensor:
                return batch.call(ps, args)

            out, vjp_fn = torch.func.vjp(forward, *self._primals)[:2]  # (output, vjp function)
            check_output(out, b - a, batch.targets[a:b] if batch.targets is not None else None)
            logits.append(out.detach())
            if self._cache:
                self._vjps[a] = vjp_fn
            del vjp_fn
        self.logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        tgt = (
            batch.targets
            if batch.targets is not None
            else torch.zeros(self.logits.shape[:-1], dtype=torch.long, device=self.logits.device)
        )
        self.stats = logit_statistics(self.logits, tgt, batch.ignore_index)
        self.probs = self.stats.probs  # (M, C) float64
        self.mask = self.stats.mask.to(torch.float64)  # (M,)
        self._rows_per_sample = self.probs.shape[0] // self.N  # 1, or T
        self.labels_sampled: torch.Tensor | None = None
        if kind == "sf":
            self.labels_sampled = sampled = self._sample_labels(n_samples, labels_sampled, generator)
            M = self.probs.shape[0]
            ar = torch.arange(M, device=self.probs.device)
            R = self.probs.unsqueeze(0).repeat(sampled.shape[0], 1, 1)  # (K, M, C)
            for k in range(R.shape[0]):
                R[k, ar, sampled[k]] -= 1.0
            self._R = R * self.mask[None, :, None]
        self.products = 0

    def _sample_labels(
        self, n_samples: object, labels_sampled: object, generator: torch.Generator | None
    ) -> torch.Tensor:
        M = self.probs.shape[0]
        if labels_sampled is not None:
            if (
                not isinstance(labels_sampled, torch.Tensor)
                or labels_sampled.dtype.is_floating_point
                or labels_sampled.dim() != 2
                or labels_sampled.shape[1] != M
            ):
                raise ValueError(f"labels_sampled must be an integer tensor of shape (K, {M})")
            if int(labels_sampled.min()) < 0 or int(labels_sampled.max()) >= self.C:
                raise ValueError(f"labels_sampled must lie in 0..{self.C - 1}")
            return labels_sampled.to(self.probs.device, torch.long)
        count = positive_int(n_samples)
        if count is None:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        draws = torch.multinomial(self.probs, count, replacement=True, generator=generator)
        return draws.T.contiguous()

    # ---- the curvature in logit space --------------------------------------------------
    def _curvature(self, u: torch.Tensor, rows: slice) -> torch.Tensor:
        """H u (exact) or (1/K) Σ_k r_k r_kᵀ u (sf) on logit rows ``rows`` (a slice), float64, masked."""
        m = self.mask[rows, None]
        if self.kind == "exact":
            p = self.probs[rows]
            return m * (p * u - p * (p * u).sum(1, keepdim=True))
        R = self._R[:, rows]  # (K, rows, C)
        return (R * (R * u.unsqueeze(0)).sum(2, keepdim=True)).mean(0)

    # ---- products ---------------------------------------------------------------------
    def _vjp_fn(self, a: int, args: tuple[torch.Tensor, ...]) -> Callable[..., tuple[torch.Tensor, ...]]:
        if self._cache:
            return self._vjps[a]
        return torch.func.vjp(lambda *ps: self._batch.call(ps, args), *self._primals)[1]

    def _jvp(self, a: int, args: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.mode in ("auto", "jvp"):
            try:
                return torch.func.jvp(lambda *ps: self._batch.call(ps, args), self._primals, tangents)[1]
            except (NotImplementedError, RuntimeError) as exc:
                if self.mode == "jvp" or "forward" not in str(exc).lower() and not isinstance(exc, NotImplementedError):
                    raise
                self.mode = "vjp"  # an op without a forward-mode derivative: reverse-over-reverse
        fn = self._vjp_fn(a, args)
        ref = self.logits[a : a + 1]
        zeros = torch.zeros((min(self._chunk, self.N - a), *ref.shape[1:]), dtype=ref.dtype, device=ref.device)
        return torch.func.vjp(fn, zeros)[1](tangents)[0]

    def _apply(
        self, v64: torch.Tensor, curvature: Callable[[torch.Tensor, slice], torch.Tensor] | None = None
    ) -> torch.Tensor:
        lay = self.layout
        tangents = tuple(t.to(lay.dtype) for t in lay.unflatten(v64))
        out = torch.zeros(self.P, dtype=torch.float64, device=lay.device)
        T = self._rows_per_sample
        for a, b, args, _ in self._batch.chunks(self._chunk):
            jv = self._jvp(a, args, tangents)
            rows = slice(a * T, b * T)
            u = (curvature or self._curvature)(jv.reshape(-1, self.C).to(torch.float64), rows)
            grads = self._vjp_fn(a, args)(u.reshape(jv.shape).to(jv.dtype))
            for g, o0, o1 in zip(grads, lay.offsets[:-1], lay.offsets[1:]):
                out[o0:o1] += g.reshape(-1)
        self.products += 1
        return out

    def matvec(self, v: _Vector) -> _Vector:
        """F v (undamped), float64; ``v`` a (P,) torch tensor or NumPy array."""
        if isinstance(v, np.ndarray):
            t = from_numpy(np.ascontiguousarray(v, dtype=np.float64).ravel())
            return self._apply(self._checked_vector(t)).cpu().numpy()
        return self._apply(self._checked_vector(v))

    def _checked_vector(self, t: object) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != self.P:
            raise ValueError(f"v must be a vector of length P={self.P}")
        return t.to(device=self.layout.device, dtype=torch.float64)

    __matmul__ = matvec

    def gradient(self) -> torch.Tensor:
        r""":math:`\nabla L=\sum_n J_n^\top(p_n-e_{y_n})` (float64 (P,)), one reverse-mode product; needs targets."""
        if self._batch.targets is None:
            raise ValueError("gradient() needs the targets the operator was built with")
        st = self.stats
        r = st.probs.clone()
        r[torch.arange(r.shape[0], device=r.device), st.labels] -= 1.0
        r *= self.mask[:, None]
        lay = self.layout
        out = torch.zeros(self.P, dtype=torch.float64, device=lay.device)
        T = self._rows_per_sample
        for a, b, args, _ in self._batch.chunks(self._chunk):
            ref = self.logits[a:b]
            grads = self._vjp_fn(a, args)(r[a * T : b * T].reshape(ref.shape).to(ref.dtype))
            for g, o0, o1 in zip(grads, lay.offsets[:-1], lay.offsets[1:]):
                out[o0:o1] += g.reshape(-1)
        return out

    def loss(self) -> float:
        """The summed cross-entropy of the batch (needs targets)."""
        if self._batch.targets is None:
            raise ValueError("loss() needs the targets the operator was built with")
        return float(self.stats.losses.sum())

    def as_linear_operator(self) -> LinearOperator:
        """A SciPy ``LinearOperator`` (P, P), float64, symmetric (matvec = rmatvec = F v)."""

        def product(v: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
            return self.matvec(np.asarray(v, dtype=np.float64).ravel())

        # scipy has no annotations, and pyright takes LinearOperator's factory for its abstract constructor.
        return LinearOperator(self.shape, matvec=product, rmatvec=product, dtype=np.float64)  # pyright: ignore[reportCallIssue]

    def solve(
        self,
        b: torch.Tensor | npt.ArrayLike,
        damping: float,
        *,
        rtol: float = DEFAULT_CG_RTOL,
        maxiter: int = DEFAULT_CG_MAXITER,
        certify: float | None = None,
        on_fail: str = "warn",
    ) -> CGResult:
        r""":math:`(F+\lambda I)^{-1}b` by :func:`conjugate_gradient` on these products; a :class:`CGResult`."""
        t = torch.as_tensor(b).to(device=self.layout.device, dtype=torch.float64)
        return conjugate_gradient(
            self._apply, t, damping=damping, rtol=rtol, maxiter=maxiter, certify=certify, on_fail=on_fail
        )

    def relative_quality(self, d: torch.Tensor | npt.ArrayLike, grad: torch.Tensor | npt.ArrayLike) -> float:
        r"""γ(d)/γ(∇L) with this F (two products): γ(v) = √(vᵀFv)/\|vᵀ∇L\|; below 1 beats plain SGD."""
        d = torch.as_tensor(d).to(device=self.layout.device, dtype=torch.float64)
        g = torch.as_tensor(grad).to(device=self.layout.device, dtype=torch.float64)

        def gamma(v: torch.Tensor) -> float:
            vFv = max(float(v @ self._apply(v)), 0.0)
            vg = abs(float(v @ g))
            return math.inf if vg == 0.0 else math.sqrt(vFv) / vg

        gg = gamma(g)
        return gamma(d) / gg if gg > 0 else math.nan

    def __repr__(self) -> str:
        return f"FisherOperator(kind={self.kind!r}, N={self.N}, C={self.C}, P={self.P}, mode={self.mode!r})"


def operator_ngd_direction(
    F: LinearOperator,
    *,
    damping: float,
    G: npt.NDArray[np.floating[Any]] | None = None,
    grad: npt.NDArray[np.floating[Any]] | None = None,
    rtol: float = 1e-10,
    maxiter: int | None = None,
    certify: float | None = 1e-6,
    on_fail: str = "raise",
) -> npt.NDArray[np.floating[Any]]:
    r"""The exact natural-gradient direction :math:`(F+\lambda I)^{-1}\nabla L` from an operator (NumPy).

    The hook proposed for ``fisheropt.fisher.ngd_direction("exact", G=G, F=F, damping=λ)`` (``F`` in
    place of ``J`` and ``probs``): ``F`` a SciPy ``LinearOperator`` of shape (P, P) — or any object
    with ``matvec`` and ``shape`` — applying the undamped exact Fisher, e.g.
    ``fisheropt.torch.FisherOperator(...).as_linear_operator()`` or ``fisheropt.fisher.exact_operator(J,
    probs)``; ∇L = Gᵀ1 (``G`` (N, P)) or ``grad`` (P,) directly. Solved by :func:`conjugate_gradient`
    with the contract of ``exact_method="cg"`` (spec/fisher.md §3): relative residual ≤ ``rtol`` and a
    certified relative error ≤ ``certify`` (``‖x − x*‖ ≤ ‖r‖/λ``), at most ``maxiter`` (default 10·P)
    iterations; when that cannot be certified it raises :class:`fisheropt.fisher.DampingTooSmall`
    (``on_fail="raise"``) or warns. Returns float64 (P,) (G's dtype when G is given).
    """
    from fisheropt._checks import check_array_type, check_float_dtype, check_real
    from fisheropt.fisher import DampingTooSmall

    if (G is None) == (grad is None):
        raise ValueError("pass exactly one of G (N, P) and grad (P,)")
    damping = check_real("damping", damping, low=0.0, low_open=True)
    a, name, ndim = (G, "G", 2) if G is not None else (grad, "grad", 1)
    check_array_type(a, name)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array here (the operator solve runs on the host)")
    check_float_dtype(a.dtype, name)
    if a.ndim != ndim or a.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-dimensional array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    b = a.sum(axis=0, dtype=np.float64) if ndim == 2 else a.astype(np.float64)
    P = b.shape[0]
    if not callable(getattr(F, "matvec", None)) or tuple(getattr(F, "shape", ())) != (P, P):
        raise ValueError(f"F must be a linear operator of shape ({P}, {P}) with a matvec method")

    def mv(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(F.matvec(v), dtype=np.float64).ravel()  # pyright: ignore[reportUnknownMemberType]  # scipy

    try:
        res = conjugate_gradient(
            mv,
            b,
            damping=damping,
            rtol=rtol,
            maxiter=10 * P if maxiter is None else maxiter,
            certify=certify,
            on_fail=on_fail,
        )
    except CGNotConverged as exc:
        raise DampingTooSmall(
            f"{exc} (damping={damping:.3g} may be too small for this operator; spec/fisher.md §3, Accuracy)"
        ) from None
    x = res.x
    assert isinstance(x, np.ndarray)  # as b
    if not np.isfinite(x).all():
        raise ValueError("the direction overflows (a larger damping shrinks it)")
    return x.astype(G.dtype) if G is not None else x


_ = ParamLayout  # re-exported name used in the docs


def _in_unit_interval(value: object) -> bool:
    return isinstance(value, numbers.Real) and 0.0 < float(value) < 1.0
