r"""Natural-gradient descent on PyTorch models: iEF, EF, SF and the exact Fisher as a ``torch.optim.Optimizer``.

::

    import fisheropt.torch as fot
    opt = fot.NaturalGradient(model, kind="ief", lr=0.1, damping=1e-3, params=lora_params)
    for inputs, targets in loader:
        loss = opt.step(inputs, targets)     # per-sample grads, the direction, the update

One step on a batch of N samples (the loss is the **sum** of the per-sample softmax cross-entropies,
spec/fisher.md; ``step`` returns it):

``"ief"``, ``"ef"``
    G (N × P) by :func:`~fisheropt.torch.per_sample_grads`, then
    :func:`fisheropt.fisher.ngd_direction` — :math:`d = G^\top(GG^\top+\lambda I)^{-1}s` (iEF, Wu et al.
    2024, Eq. 8, :math:`s_n=\lVert p_n-e_{y_n}\rVert^2`) or :math:`G^\top(GG^\top+\lambda I)^{-1}\mathbf 1`
    (EF) — solved in float64 on the N×N Gram system by the ``backend`` (``"auto"``: numba when
    installed, cupy for CUDA tensors, else numpy).
``"exact"``, ``"sf"``
    :math:`d=(F+\lambda I)^{-1}\nabla L` with the exact Fisher F (= GGN), or the sampled Fisher SF
    (``n_samples`` labels per sample drawn from the model). ``exact_method="woodbury"`` builds the
    logits Jacobians J (N·C·P numbers, :func:`~fisheropt.torch.logit_jacobians`) and calls
    :func:`fisheropt.fisher.ngd_direction`; ``"cg"`` never builds J: conjugate gradients on the
    matrix-free :class:`~fisheropt.torch.FisherOperator` (stopping rule in
    :mod:`fisheropt.torch.fisher_operator`; ``cg_rtol``, ``cg_maxiter``; a solve that does not converge
    warns with its residual, or raises with ``on_cg_fail="raise"``); ``"auto"`` picks woodbury when J
    fits in ``jacobian_budget`` bytes (default 128 MiB), else cg.

Then, per param group, b ← momentum·b + d (b = d when momentum = 0) and
θ ← θ − lr·b − lr·weight_decay·θ (decoupled weight decay).

**Damping.** ``damping_mode="relative"`` (the default): λ = ``damping`` × the mean eigenvalue of
the curvature's N×N Gram matrix, i.e. tr(M)/N — for EF and iEF :math:`\frac1N\sum_n\lVert g_n\rVert^2`
(the mean eigenvalue of :math:`GG^\top`, on which both damp), for SF tr(SF)/N, for the exact Fisher
tr(F)/N (computed from J with woodbury; with cg estimated without bias as :math:`\frac1N\sum_n\lVert\hat
g_n\rVert^2`, the per-sample gradients for labels drawn from the model, :math:`E[\hat g\hat g^\top]=F`).
Scale-free: the same ``damping`` means the same thing for any model, batch size or loss scale.
``damping_mode="absolute"``: λ = ``damping`` as passed to :func:`fisheropt.fisher.ngd_direction`
(sum loss; for a mean-loss damping λ̄ pass N·λ̄, spec/fisher.md §1). A damping too small for float64
raises :class:`fisheropt.fisher.DampingTooSmall` (a ValueError naming one that works).

**Threads.** The direction's BLAS work (the Gram product, a gemv) runs after torch's own work,
with the BLAS thread pools limited (threadpoolctl) to ``blas_threads`` (default:
``torch.get_num_threads()``), so torch's pool and BLAS's never ask for more cores between them than
torch was given; set ``blas_threads`` to change it. ``fisheropt experiment`` runs additionally limit
BLAS to one thread (``FISHEROPT_BLAS_THREADS``). On a machine whose load exceeds its cores, prefer
``torch.set_num_threads(1)``: a multi-threaded torch region waits for its slowest thread (measured on
the shared 2-core machine: a 10⁶-element ``add_`` took 16 ms with 2 threads, 0.5 ms with 1).

**Guarantees.** Everything is validated, and the direction computed, before any parameter is
written: a rejected step (bad inputs or targets, a model whose output is not logits, damping too
small, CG that does not converge with ``on_cg_fail="raise"``, a non-finite direction) leaves the
parameters and the optimizer state byte-identical. ``param_groups`` (lr, momentum, weight_decay,
damping) work with LR schedulers; ``state_dict`` holds the momentum buffers and step counts.
**Memory.** Per step: G (N×P, the parameters' dtype; kept between steps as a reusable buffer
unless ``keep_buffers=False``, since a fresh N·P allocation costs page faults at every step) plus
one chunk of per-sample gradients (``chunk_size``) for EF/iEF; J (N·C·P) plus its float64 Fisher
factor for woodbury; for cg only the model's activations, O(N·C) logits and a few float64 P-vectors.
``opt.last_stats`` describes the last step (timings, λ, CG iterations and residual, and with
``track_quality=True`` the quality γ(d)/γ(∇L) of the direction under the exact Fisher, two
matrix-free products).
"""

from __future__ import annotations

import importlib
import math
import numbers
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from .. import backends as _backends
from .. import fisher as _fisher
from .._checks import check_real, is_ndarray, is_sequence, positive_int
from ._tensors import from_numpy, row_sq_norms
from .fisher_operator import DEFAULT_CG_MAXITER, DEFAULT_CG_RTOL, FisherOperator
from .per_sample import (
    CheckedBatch,
    ParamLayout,
    check_chunk,
    check_module,
    logit_jacobians,
    logit_statistics,
    per_sample_grads,
    per_sample_sq_norms,
)

__all__ = ["NaturalGradient", "KINDS", "DEFAULT_JACOBIAN_BYTES"]

KINDS = ("ief", "ef", "sf", "exact")
DAMPING_MODES = ("relative", "absolute")
EXACT_METHODS = ("auto", "woodbury", "cg")
#: exact_method="auto": build J (woodbury) when its N·C·P entries take at most this many bytes.
DEFAULT_JACOBIAN_BYTES = 128 * 2**20


_blas_controller: Any = None  # threadpoolctl's ThreadpoolController, made at the first limit


def _blas_limit(n: int) -> AbstractContextManager[object]:
    """Limit the BLAS thread pools to ``n`` threads for the duration (threadpoolctl; no-op without it)."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController  # pyright: ignore[reportMissingTypeStubs]  # unannotated
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=int(n), user_api="blas")


def _to_array(t: torch.Tensor) -> Any:
    """A NumPy (CPU) or CuPy (CUDA) array on the tensor's memory, no copy."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    try:
        cupy = importlib.import_module("cupy")  # optional: CUDA only
    except ImportError as exc:  # pragma: no cover - GPU only
        raise RuntimeError("CUDA parameters need the cupy backend for the direction solve (pip install cupy)") from exc
    return cupy.from_dlpack(t)


def _from_array(a: Any, device: torch.device) -> torch.Tensor:
    if is_ndarray(a):
        return from_numpy(np.ascontiguousarray(a)).to(device)
    return torch.from_dlpack(a).to(device)  # pragma: no cover - GPU only


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent (iEF, EF, SF, exact Fisher) on ``model``'s parameters ``params``; module docstring.

    ``step(inputs, targets)`` computes everything from the batch itself (per-sample gradients,
    Jacobian products): it does not read ``.grad`` and needs no ``backward()``.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "ief",
        lr: float = 0.1,
        damping: float = 1e-3,
        *,
        params: ParamsT | None = None,
        damping_mode: str = "relative",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        backend: str = "auto",
        exact_method: str = "auto",
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        cg_rtol: float = DEFAULT_CG_RTOL,
        cg_maxiter: int = DEFAULT_CG_MAXITER,
        on_cg_fail: str = "warn",
        track_quality: bool = False,
        blas_threads: int | None = None,
        jacobian_budget: float = DEFAULT_JACOBIAN_BYTES,
        jvp_mode: str = "auto",
        keep_buffers: bool = True,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        check_module(model)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be 'relative' or 'absolute', got {damping_mode!r}")
        if exact_method not in EXACT_METHODS:
            raise ValueError(f"exact_method must be one of {EXACT_METHODS}, got {exact_method!r}")
        if backend != "auto" and not _backends.is_known(backend):
            raise ValueError(f"unknown backend {backend!r}; use 'auto' or one of {', '.join(_backends.KNOWN)}")
        if on_cg_fail not in ("warn", "raise"):
            raise ValueError(f"on_cg_fail must be 'warn' or 'raise', got {on_cg_fail!r}")
        if jvp_mode not in ("auto", "jvp", "vjp"):
            raise ValueError(f"jvp_mode must be 'auto', 'jvp' or 'vjp', got {jvp_mode!r}")
        samples = positive_int(n_samples)
        if samples is None:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        iterations = positive_int(cg_maxiter)
        if iterations is None:
            raise ValueError(f"cg_maxiter must be a positive integer, got {cg_maxiter!r}")
        check_real("cg_rtol", cg_rtol, low=0.0, high=1.0, low_open=True, high_open=True)
        if blas_threads is not None and positive_int(blas_threads) is None:
            raise ValueError(f"blas_threads must be a positive integer or None, got {blas_threads!r}")
        _check_generator(generator)
        _check_index(ignore_index)
        check_real("jacobian_budget", jacobian_budget, low=0.0)
        if process_group is not None and kind not in ("ief", "ef"):
            raise NotImplementedError(
                f"kind {kind!r} with a process_group: only 'ief' and 'ef' are assembled across "
                "ranks here (fisheropt.torch.distributed.ngd_direction takes A for sf/exact)"
            )
        self.process_group = process_group
        self.model = model
        self.kind = kind
        self.damping_mode = damping_mode
        self.backend = backend
        self.exact_method = exact_method
        self.n_samples = samples
        self.generator = generator
        self.chunk_size = check_chunk(chunk_size)
        self.ignore_index = int(ignore_index)
        self.cg_rtol, self.cg_maxiter, self.on_cg_fail = float(cg_rtol), iterations, on_cg_fail
        self.track_quality = bool(track_quality)
        self.blas_threads = blas_threads
        self.jacobian_budget = float(jacobian_budget)
        self.jvp_mode = jvp_mode
        self.keep_buffers = bool(keep_buffers)
        self._buffer: torch.Tensor | None = None
        self.last_stats: dict[str, Any] = {}
        defaults: dict[str, Any] = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        self._check_group(defaults, "defaults")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("the model has no parameter with requires_grad=True; pass params=...")
        elif _is_tensor(params):
            raise TypeError("params must be an iterable of tensors or param-group dicts, not a single Tensor")
        super().__init__(params, defaults)
        self._layout = self._make_layout()

    # ---- groups and layout -------------------------------------------------------------
    @staticmethod
    def _check_group(group: dict[str, Any], where: str) -> tuple[float, float, float, float]:
        try:
            lr = check_real("lr", group["lr"], low=0.0)
            momentum = check_real("momentum", group.get("momentum", 0.0), low=0.0, high=1.0, high_open=True)
            wd = check_real("weight_decay", group.get("weight_decay", 0.0), low=0.0)
            damping = check_real("damping", group["damping"], low=0.0, low_open=True)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        return lr, momentum, wd, damping

    def _make_layout(self) -> ParamLayout:
        params = [p for g in self.param_groups for p in g["params"]]
        return ParamLayout(self.model, params)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim.Optimizer.add_param_group``); its parameters must be
        parameters of the model, and its hyperparameters are checked."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
        if hasattr(self, "_layout"):  # after __init__: the new parameters must fit the model
            try:
                self._layout = self._make_layout()
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise

    def _hyper(self) -> tuple[list[tuple[float, float, float, float]], float]:
        rows = [self._check_group(g, f"param_groups[{i}]") for i, g in enumerate(self.param_groups)]
        dampings = {r[3] for r in rows}
        if len(dampings) > 1:
            raise ValueError(
                f"the param groups have different dampings {sorted(dampings)}; the direction is one "
                "solve over all parameters, so damping must be the same in every group"
            )
        current = [p for g in self.param_groups for p in g["params"]]
        if len(current) != len(self._layout.params) or any(a is not b for a, b in zip(current, self._layout.params)):
            self._layout = self._make_layout()
        return rows, rows[0][3]

    @property
    def layout(self) -> ParamLayout:
        """The flat-vector layout of the optimized parameters (param-group order)."""
        return self._layout

    # ---- the step -----------------------------------------------------------------------
    # A step takes the batch, not torch.optim's closure (it computes the gradients itself).
    def step(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, inputs: torch.Tensor | Sequence[torch.Tensor] | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One natural-gradient step on the batch (``inputs``, ``targets``); returns the summed loss (0-d tensor).

        Raises before writing anything (module docstring, Guarantees)."""
        if inputs is None or targets is None or callable(inputs):
            raise TypeError(
                "NaturalGradient.step(inputs, targets) computes per-sample gradients itself from the "
                "batch; it takes the batch, not a closure, and does not read .grad"
            )
        rows, damping = self._hyper()
        t0 = time.perf_counter()
        with torch.enable_grad():
            d, loss, stats = self._direction(inputs, targets, damping)
        t1 = time.perf_counter()
        if not bool(torch.isfinite(d).all()):
            raise ValueError(
                "the natural-gradient direction is not finite; increase the damping (the parameters are unchanged)"
            )
        self._update(d, rows)
        stats["time_update"] = time.perf_counter() - t1
        stats["time_total"] = time.perf_counter() - t0
        stats["loss"] = loss
        self.last_stats = stats
        return torch.tensor(loss, dtype=self._layout.dtype)

    def _lambda(self, damping: float, scale: float) -> float:
        return damping * scale if self.damping_mode == "relative" else damping

    def _solve_ngd(self, kind: str, **kw: Any) -> Any:
        """fisheropt.fisher.ngd_direction with BLAS limited; DampingTooSmall re-raised with the step's context."""
        n = self.blas_threads or torch.get_num_threads()
        try:
            with _blas_limit(n):
                return _fisher.ngd_direction(kind, backend=self.backend, **kw)
        except _fisher.DampingTooSmall as exc:
            raise _fisher.DampingTooSmall(
                f"NaturalGradient(kind={self.kind!r}, damping_mode={self.damping_mode!r}): "
                f"{exc}; the parameters are unchanged"
            ) from None

    def _direction(
        self, inputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor, damping: float
    ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        lay = self._layout
        kind = self.kind
        stats: dict[str, Any] = {"kind": kind, "damping_mode": self.damping_mode}
        if kind in ("ief", "ef"):
            return self._gram_direction(inputs, targets, damping, stats)
        method = self.exact_method
        batch = CheckedBatch(self.model, inputs, targets, None, self.ignore_index, lay)
        if method == "auto":
            rows = int(batch.valid.sum())
            method = (
                "woodbury" if rows * batch.C * lay.P * lay.params[0].element_size() <= self.jacobian_budget else "cg"
            )
        stats["method"] = method
        if method == "woodbury":
            return self._woodbury_direction(batch, damping, stats)
        return self._cg_direction(batch, damping, stats)

    def _finish(
        self, d64: torch.Tensor, grad: torch.Tensor, op_builder: Callable[[], FisherOperator], stats: dict[str, Any]
    ) -> dict[str, Any]:
        if self.track_quality:
            t = time.perf_counter()
            op = op_builder()
            stats["quality"] = op.relative_quality(d64, grad)
            stats["time_quality"] = time.perf_counter() - t
        return stats

    def _exact_operator(
        self, inputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | None
    ) -> FisherOperator:
        return FisherOperator(
            self.model,
            inputs,
            targets,
            kind="exact",
            layout=self._layout,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            mode=self.jvp_mode,
        )

    def _distributed_gram_direction(
        self, G: torch.Tensor, s: torch.Tensor, loss_local: float, damping: float, stats: dict[str, Any]
    ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        """EF/iEF of the group's global batch (fisheropt.torch.distributed): this rank's samples'
        gradients go in, the whole direction comes out on every rank (a replicated model)."""
        from . import distributed as _dist

        lay, group = self._layout, self.process_group
        t = time.perf_counter()
        sq = row_sq_norms(G)
        totals = torch.tensor([float(sq.sum()), float(G.shape[0]), loss_local], dtype=torch.float64)
        # A NaN on any rank reaches every rank. (torch does not annotate all_reduce.)
        torch.distributed.all_reduce(totals, group=group)  # pyright: ignore[reportUnknownMemberType]
        total_sq, N, loss = float(totals[0]), int(totals[1]), float(totals[2])
        if not math.isfinite(total_sq):
            raise ValueError("the per-sample gradients are not finite on some rank; the parameters are unchanged")
        if N == 0:
            raise ValueError(
                f"every target of the global batch equals ignore_index={self.ignore_index}: nothing to fit"
            )
        scale = total_sq / N
        lam = self._lambda(damping, scale)
        stats.update(scale=scale, damping=lam, N=N)
        stats["time_scale"] = time.perf_counter() - t
        t = time.perf_counter()
        if scale == 0.0:
            d = torch.zeros(lay.P, dtype=lay.dtype, device=lay.device)
        else:
            comm: dict[str, Any] = {}
            try:
                with _blas_limit(self.blas_threads or torch.get_num_threads()):
                    d_local = _dist.ngd_direction(
                        self.kind,
                        G=G,
                        damping=lam,
                        s=s if self.kind == "ief" else None,
                        group=group,
                        backend=self.backend,
                        stats=comm,
                    )
            except _fisher.DampingTooSmall as exc:
                raise _fisher.DampingTooSmall(
                    f"NaturalGradient(kind={self.kind!r}): {exc}; the parameters are unchanged"
                ) from None
            d = _dist.gather_columns(d_local, lay.P, group=group).to(lay.dtype)
            stats["comm"] = comm
        stats["time_solve"] = time.perf_counter() - t
        return d, loss, stats

    def _gram_direction(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        targets: torch.Tensor,
        damping: float,
        stats: dict[str, Any],
    ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        lay = self._layout
        t = time.perf_counter()
        grads, logits, _ = per_sample_grads(
            self.model,
            inputs,
            targets,
            layout=lay,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            out=self._g_buffer(inputs, lay),
        )
        st = logit_statistics(logits, targets, self.ignore_index)
        counts = torch.zeros(grads.shape[0], dtype=torch.float64, device=grads.device).index_add_(
            0, st.sample, st.mask.to(torch.float64)
        )
        keep = counts > 0
        if self.process_group is None and not bool(keep.any()):
            raise ValueError(f"every target of the batch equals ignore_index={self.ignore_index}: nothing to fit")
        # Samples with no counted token: zero rows, left out of the solve.
        G, s = (grads, st.s) if bool(keep.all()) else (grads[keep], st.s[keep])
        stats["time_grads"] = time.perf_counter() - t
        if self.process_group is not None:
            return self._distributed_gram_direction(G, s, float(st.losses.sum()), damping, stats)
        t = time.perf_counter()
        sq = row_sq_norms(G)  # diag(GGᵀ): one read of G
        if not bool(torch.isfinite(sq).all()):
            raise ValueError(
                "the per-sample gradients are not finite (NaN/Inf in the model's outputs or "
                "derivatives); the parameters are unchanged"
            )
        scale = float(sq.mean())
        lam = self._lambda(damping, scale)
        stats.update(scale=scale, damping=lam, N=int(G.shape[0]))
        loss = float(st.losses.sum())
        stats["time_scale"] = time.perf_counter() - t
        t = time.perf_counter()
        if scale == 0.0:  # every per-sample gradient is 0: so are ∇L and the direction
            d = torch.zeros(lay.P, dtype=lay.dtype, device=lay.device)
        else:
            kw: dict[str, Any] = {"G": _to_array(G), "damping": lam}
            if self.kind == "ief":
                kw["s"] = _to_array(s.to(torch.float64).contiguous())
            d = _from_array(self._solve_ngd(self.kind, **kw), lay.device)
        stats["time_solve"] = time.perf_counter() - t

        def grad() -> torch.Tensor:
            return G.sum(0, dtype=torch.float64)

        if self.track_quality:
            self._finish(d, grad(), lambda: self._exact_operator(inputs, targets), stats)
        return d, loss, stats

    def _g_buffer(self, inputs: object, lay: ParamLayout) -> torch.Tensor | None:
        """The (N, P) buffer G is written into, kept between steps of the same batch size (a fresh N·P
        allocation costs page faults at every step); None when ``keep_buffers`` is False."""
        if not self.keep_buffers:
            return None
        first = inputs[0] if is_sequence(inputs) else inputs
        if not isinstance(first, torch.Tensor) or first.dim() == 0:
            return None  # the validation in per_sample_grads says why
        shape = (first.shape[0], lay.P)
        buf = self._buffer
        if buf is None or tuple(buf.shape) != shape or buf.dtype != lay.dtype or buf.device != lay.device:
            self._buffer = buf = None  # free the old one first
            self._buffer = buf = torch.empty(shape, dtype=lay.dtype, device=lay.device)
        return buf

    def _sampled(self, probs: torch.Tensor, K: int) -> torch.Tensor:
        return torch.multinomial(probs, K, replacement=True, generator=self.generator).T.contiguous()

    def _woodbury_direction(
        self, batch: CheckedBatch, damping: float, stats: dict[str, Any]
    ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        lay = self._layout
        t = time.perf_counter()
        J = logit_jacobians(self.model, batch.inputs, layout=lay, chunk_size=self.chunk_size)
        with torch.no_grad():
            logits = self.model(*batch.inputs)
        assert batch.targets is not None  # step() requires targets
        st = logit_statistics(logits, batch.targets, self.ignore_index)
        C = batch.C
        Jr = J.reshape(-1, C, lay.P)
        mask = st.mask
        if not bool(mask.any()):
            raise ValueError(f"every target of the batch equals ignore_index={self.ignore_index}: nothing to fit")
        if not bool(mask.all()):
            Jr = Jr[mask]
        del J
        if not bool(torch.isfinite(Jr).all()):
            raise ValueError("the logits Jacobians are not finite; the parameters are unchanged")
        probs, labels = st.probs[mask], st.labels[mask]
        stats["time_grads"] = time.perf_counter() - t
        t = time.perf_counter()
        # tr(M) from the C×C blocks J_n J_nᵀ: exact H_n = diag p − p pᵀ; sf (1/K) Σ_k r r ᵀ
        JJ = torch.einsum("mcp,mdp->mcd", Jr, Jr).to(torch.float64)
        ls = None
        if self.kind == "exact":
            trace = float(
                (probs * torch.diagonal(JJ, dim1=1, dim2=2)).sum() - torch.einsum("mc,mcd,md->", probs, JJ, probs)
            )
        else:
            ls = self._sampled(probs, self.n_samples)  # (K, M)
            R = probs.unsqueeze(0).repeat(ls.shape[0], 1, 1)
            ar = torch.arange(probs.shape[0], device=probs.device)
            for k in range(ls.shape[0]):
                R[k, ar, ls[k]] -= 1.0
            trace = float(torch.einsum("kmc,mcd,kmd->", R, JJ, R)) / ls.shape[0]
        scale = max(trace, 0.0) / batch.N
        lam = self._lambda(damping, scale)
        stats.update(scale=scale, damping=lam, N=batch.N)
        r = probs.clone()
        r[torch.arange(r.shape[0], device=r.device), labels] -= 1.0
        G_tok = _to_array(torch.einsum("mcp,mc->mp", Jr, r.to(Jr.dtype)).contiguous())  # rows J_mᵀ(p_m − e_y)
        J_np = _to_array(Jr.contiguous())
        p_np = _to_array(probs.contiguous())
        loss = float(st.losses.sum())
        if scale == 0.0:
            d = torch.zeros(lay.P, dtype=lay.dtype, device=lay.device)
        else:
            kw: dict[str, Any] = {"G": G_tok, "J": J_np, "probs": p_np, "damping": lam}
            if ls is not None:
                kw["labels_sampled"] = _to_array(ls)
            d = _from_array(self._solve_ngd(self.kind, **kw), lay.device)
        stats["time_solve"] = time.perf_counter() - t
        if self.track_quality:
            grad = _from_array(G_tok.sum(axis=0, dtype=np.float64), lay.device)  # ∇L = Σ_m rows
            self._finish(d, grad, lambda: self._exact_operator(batch.inputs, batch.targets), stats)
        return d, loss, stats

    def _cg_direction(
        self, batch: CheckedBatch, damping: float, stats: dict[str, Any]
    ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        lay = self._layout
        t = time.perf_counter()
        op = FisherOperator(
            self.model,
            batch.inputs,
            batch.targets,
            kind=self.kind,
            layout=lay,
            n_samples=self.n_samples,
            generator=self.generator,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            mode=self.jvp_mode,
        )
        if not bool(op.mask.any()):
            raise ValueError(f"every target of the batch equals ignore_index={self.ignore_index}: nothing to fit")
        grad = op.gradient()
        loss = op.loss()
        if not bool(torch.isfinite(grad).all()) or not math.isfinite(loss):
            raise ValueError("the loss or its gradient is not finite; the parameters are unchanged")
        scale = 0.0
        targets = batch.targets
        assert targets is not None  # step() requires targets
        if self.damping_mode == "relative":
            # tr F (or tr SF) / N, estimated without bias from per-sample gradients at labels drawn from the model
            ls = op.labels_sampled if op.labels_sampled is not None else self._sampled(op.probs, 1)
            total = 0.0
            for k in range(ls.shape[0]):
                y = torch.where(op.stats.mask, ls[k], torch.full_like(ls[k], self.ignore_index))
                y = y.reshape(targets.shape)
                total += float(
                    per_sample_sq_norms(
                        self.model,
                        batch.inputs,
                        y,
                        layout=lay,
                        chunk_size=self.chunk_size,
                        ignore_index=self.ignore_index,
                    ).sum()
                )
            scale = total / ls.shape[0] / batch.N
        stats["time_grads"] = time.perf_counter() - t
        t = time.perf_counter()
        lam = self._lambda(damping, scale)
        stats.update(scale=scale, damping=lam, N=batch.N)
        if float(grad.abs().max()) == 0.0 or lam == 0.0:
            if lam == 0.0 and float(grad.abs().max()) != 0.0:
                raise ValueError(
                    "the relative damping's scale, the estimate of tr(F)/N, is 0 but ∇L is not: the "
                    "model's probabilities are one-hot to float64 precision (saturated), where the "
                    "Fisher vanishes; lower the learning rate, or use damping_mode='absolute'"
                )
            d64 = torch.zeros(lay.P, dtype=torch.float64, device=lay.device)
            stats.update(cg_iterations=0, cg_residual=0.0)
        else:
            res = op.solve(grad, lam, rtol=self.cg_rtol, maxiter=self.cg_maxiter, on_fail=self.on_cg_fail)
            d64 = res.x
            assert isinstance(d64, torch.Tensor)  # as grad
            stats.update(
                cg_iterations=res.iterations,
                cg_matvecs=res.matvecs,
                cg_residual=res.residual,
                cg_converged=res.converged,
            )
        stats["time_solve"] = time.perf_counter() - t
        if self.track_quality:
            self._finish(
                d64,
                grad,
                (lambda: op) if self.kind == "exact" else (lambda: self._exact_operator(batch.inputs, batch.targets)),
                stats,
            )
        return d64.to(lay.dtype), loss, stats

    @torch.no_grad()
    def _update(self, d: torch.Tensor, rows: Sequence[tuple[float, float, float, float]]) -> None:
        """θ ← θ − lr (buf) − lr·wd·θ for every group: new buffers made first, then written."""
        lay = self._layout
        pieces = dict(zip(map(id, lay.params), lay.unflatten(d)))
        plan: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor | None, float, float]] = []
        for g, (lr, mom, wd, _) in zip(self.param_groups, rows):
            for p in g["params"]:
                dp = pieces[id(p)].to(p.dtype)
                st = self.state[p]
                buf = None
                if mom > 0.0:
                    old = st.get("momentum_buffer")
                    buf = dp.clone() if old is None else old.mul(mom).add_(dp)
                plan.append((p, st, dp if buf is None else buf, buf, lr, wd))
        for p, st, upd, buf, lr, wd in plan:
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(upd, alpha=-lr)
            if buf is not None:
                st["momentum_buffer"] = buf
            st["step"] = st.get("step", torch.tensor(0.0)) + 1


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_index(ignore_index: object) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)
