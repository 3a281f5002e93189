r"""Per-sample quantities of a PyTorch classifier, with ``torch.func``.

The conventions are spec/fisher.md's: softmax cross-entropy, the **sum** loss
:math:`L=\sum_n l_n`, and a flat parameter vector θ of P entries.

* :class:`ParamLayout` fixes which parameters are differentiated and in which order: the
  order of ``params`` as given (default: ``model.named_parameters()`` order, trainable ones only,
  tied weights once), each flattened in C (row-major) order. Column j of G (and of J) is entry j
  of that vector; :meth:`ParamLayout.unflatten` maps a flat direction back onto the parameters.
* :func:`per_sample_grads` — ``G`` (N, P): row n is :math:`\nabla_\theta l_n`, in the parameters'
  dtype, computed in chunks of samples (``torch.func.vmap`` over ``torch.func.grad`` of a
  ``torch.func.functional_call``) so that peak memory is one chunk's gradients and activations
  on top of G.
* :func:`logit_jacobians` — ``J`` (N, C, P): :math:`\partial z_n/\partial\theta`
  (``vmap`` over ``jacrev``), for the J-based directions of :mod:`fisheropt.fisher` at small P.
* :func:`logit_statistics` — probabilities, the token mask, :math:`s_n` and the per-sample losses.

**What a sample is.** The model maps a batch of N inputs to logits of shape (N, C) — one
classification per sample, targets (N,) — or (N, T, C) — a sequence model, targets (N, T). For a
sequence, sample n is the whole sequence: :math:`l_n=\sum_t \mathrm{CE}(z_{nt}, y_{nt})` over the
tokens whose target is not ``ignore_index`` (padding, prompt tokens), so row n of G is the gradient
of the sequence's summed token loss and :math:`s_n=\sum_t\lVert p_{nt}-e_{y_{nt}}\rVert^2`
(the squared norm of :math:`\nabla_{z_n}l_n`, as in the iEF paper). A classification target equal
to ``ignore_index`` drops that sample from the loss (its row of G is 0).

Samples must not interact inside the model: per-sample gradients are evaluated one sample at a
time (``vmap``), so a layer that mixes the batch (BatchNorm in training mode) is refused; put such
a model in ``eval()`` mode. Dropout draws an independent mask per sample (``randomness="different"``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from .._checks import is_dict, is_named_pair, is_sequence, positive_int
from ._tensors import row_sq_norms

__all__ = [
    "ParamLayout",
    "PerSampleGrads",
    "LogitStatistics",
    "per_sample_grads",
    "logit_jacobians",
    "logit_statistics",
    "batch_gradient",
    "per_sample_sq_norms",
    "DEFAULT_CHUNK_BYTES",
]

#: Default per-chunk budget of per-sample gradients (or Jacobians): chunk_size=None takes as many
#: samples per chunk as fit in this many bytes (at least 1, at most N).
DEFAULT_CHUNK_BYTES = 256 * 2**20

_FLOATS = (torch.float32, torch.float64)


class ParamLayout:
    """The differentiated parameters of ``model`` in a fixed order and their place in a flat vector.

    ``params``: None (every parameter with ``requires_grad``, in ``model.named_parameters()`` order,
    tied weights once), or an iterable of parameters of ``model`` (tensors, ``(name, tensor)`` pairs
    or torch param-group dicts ``{"params": [...]}``), in the order given. Each must be a parameter
    of ``model`` (by identity), appear once, and all must share one float dtype (float32 or float64)
    and one device. Entries ``offsets[i]:offsets[i] + numels[i]`` of the flat vector are parameter i
    flattened in C order.
    """

    def __init__(self, model: nn.Module, params: Iterable[Any] | None = None) -> None:
        check_module(model)
        named = list(model.named_parameters())  # tied weights once, under their first name
        name_of = {id(p): n for n, p in named}
        if params is None:
            chosen = [(n, p) for n, p in named if p.requires_grad]
            if not chosen:
                raise ValueError("the model has no parameter with requires_grad=True; pass params=...")
        else:
            chosen: list[tuple[str, nn.Parameter]] = []
            for i, item in enumerate(_flatten_params(params)):
                if not isinstance(item, torch.Tensor):
                    raise TypeError(f"params[{i}] is a {type(item).__name__}, not a tensor")
                name = name_of.get(id(item))
                if name is None:
                    raise ValueError(
                        f"params[{i}] (shape {tuple(item.shape)}) is not a parameter of the model "
                        "(pass tensors from model.parameters(), e.g. the LoRA adapters)"
                    )
                chosen.append((name, cast(nn.Parameter, item)))  # a parameter of the model, by identity
            if not chosen:
                raise ValueError("params is empty")
        seen: dict[int, int] = {}
        for i, (name, p) in enumerate(chosen):
            if id(p) in seen:
                raise ValueError(f"parameter {name!r} is listed twice (params[{seen[id(p)]}] and params[{i}])")
            seen[id(p)] = i
        dtypes = {p.dtype for _, p in chosen}
        bad = [(n, p.dtype) for n, p in chosen if p.dtype not in _FLOATS]
        if bad:
            raise TypeError(
                f"parameter {bad[0][0]!r} has dtype {bad[0][1]}; natural-gradient directions need "
                "float32 or float64 parameters"
            )
        if len(dtypes) > 1:
            raise TypeError(
                f"the parameters mix dtypes {sorted(map(str, dtypes))}; G holds one dtype, so all "
                "differentiated parameters must share it"
            )
        devices = {p.device for _, p in chosen}
        if len(devices) > 1:
            raise ValueError(f"the parameters are on several devices ({sorted(map(str, devices))}); put them on one")
        self.model = model
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        self.P = self.offsets[-1]
        self.dtype = next(iter(dtypes))
        self.device = next(iter(devices))
        if self.P == 0:
            raise ValueError("the selected parameters have no entries (P = 0)")

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.params)} tensors, P={self.P}, {self.dtype})"

    def primals(self) -> tuple[torch.Tensor, ...]:
        """The parameters, detached (the point at which torch.func differentiates)."""
        return tuple(p.detach() for p in self.params)

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat (P,) tensor shaped like the parameters (same dtype as ``vec``)."""
        vec = torch.as_tensor(vec)
        if vec.dim() != 1 or vec.shape[0] != self.P:
            raise ValueError(f"a flat vector of this layout has shape ({self.P},), got {tuple(vec.shape)}")
        return [vec[a:b].view(s) for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def unflatten_dict(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of a flat (P,) tensor, for ``torch.func.functional_call``."""
        return dict(zip(self.names, self.unflatten(vec)))

    def flatten(self, tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """One (P,) tensor from tensors shaped like the parameters (e.g. their ``.grad``)."""
        tensors = list(tensors)
        if len(tensors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])

    def get_flat(self) -> torch.Tensor:
        """The current parameter values as one (P,) tensor (a copy)."""
        return self.flatten([p.detach() for p in self.params])


def _flatten_params(params: Any) -> list[object]:
    if isinstance(params, torch.Tensor):
        return [params]
    out: list[object] = []
    for item in params:
        if is_dict(item):
            out.extend(_flatten_params(item.get("params", [])))
        elif is_named_pair(item):
            out.append(item[1])
        else:
            out.append(item)
    return out


# ---- checks -----------------------------------------------------------------------
def _check_batchnorm(model: nn.Module) -> None:
    modules = cast("Iterator[tuple[str, nn.Module]]", model.named_modules())  # torch does not annotate it
    for name, mod in modules:
        # _BatchNorm: torch's base of every batch-norm layer (it has no public name)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:  # pyright: ignore[reportPrivateUsage]
            raise ValueError(
                f"{name or type(mod).__name__} is a BatchNorm layer in training mode: it mixes the "
                "samples of the batch, so per-sample gradients and the per-sample Fisher are not "
                "defined; call model.eval() (or use LayerNorm/GroupNorm)"
            )


def _as_inputs(inputs: object) -> tuple[tuple[torch.Tensor, ...], int]:
    """A tuple of tensors with a common leading batch dimension N, and N."""
    items: tuple[object, ...] = tuple(inputs) if is_sequence(inputs) else (inputs,)
    if not items:
        raise ValueError("inputs is empty")
    tensors: list[torch.Tensor] = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"inputs{'' if len(items) == 1 else f'[{i}]'} must be a torch.Tensor, got "
                f"{type(t).__module__}.{type(t).__name__}"
            )
        if t.dim() == 0:
            raise ValueError("inputs must have a leading batch dimension N")
        tensors.append(t)
    N = tensors[0].shape[0]
    if any(t.shape[0] != N for t in tensors):
        raise ValueError(f"the input tensors have different batch sizes {[t.shape[0] for t in tensors]}")
    if N == 0:
        raise ValueError("the batch is empty (N = 0)")
    return tuple(tensors), N


def _check_targets(targets: object, N: int, device: torch.device) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of class indices, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must hold integer class indices (int64), got dtype {targets.dtype}; soft labels are not supported"
        )
    if targets.dim() not in (1, 2) or targets.shape[0] != N:
        raise ValueError(f"targets must have shape (N,) or (N, T) with N={N}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the parameters are on {device}")
    return targets


def check_output(out: object, N: int, targets: torch.Tensor | None, where: str = "the model") -> torch.Tensor:
    """The logits (N, C) or (N, T, C) of a model output, with a clear error otherwise."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{where} returned a {type(out).__name__}; natural-gradient methods need a model that "
            "returns a logits tensor of shape (N, C) (or (N, T, C) for sequences): wrap it in an "
            "nn.Module whose forward returns them (e.g. model(x).logits)"
        )
    if not out.dtype.is_floating_point:
        raise TypeError(f"{where} returned a {out.dtype} tensor; expected float logits")
    if out.dim() not in (2, 3) or out.shape[0] != N:
        raise ValueError(
            f"{where} returned shape {tuple(out.shape)}; expected logits (N, C) = ({N}, C) or (N, T, C) for sequences"
        )
    C = out.shape[-1]
    if C < 2:
        raise ValueError(f"{where} returned {C} logit(s) per sample; softmax cross-entropy needs C >= 2 classes")
    if targets is not None:
        if tuple(targets.shape) != tuple(out.shape[:-1]):
            raise ValueError(
                f"targets have shape {tuple(targets.shape)} but the logits have shape "
                f"{tuple(out.shape)}; targets must be {tuple(out.shape[:-1])}"
            )
    return out


def _check_target_values(targets: torch.Tensor, C: int, ignore_index: int) -> torch.Tensor:
    valid = targets != ignore_index
    if bool(valid.any()):
        v = targets[valid]
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi >= C:
            raise ValueError(
                f"targets must lie in 0..{C - 1} (or equal ignore_index={ignore_index}), got values in {lo}..{hi}"
            )
    return valid


def check_chunk(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    size = positive_int(chunk_size)
    if size is None:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return size


def _chunk_len(chunk_size: int | None, N: int, bytes_per_sample: int) -> int:
    if chunk_size is not None:
        return min(chunk_size, N)
    return max(1, min(N, DEFAULT_CHUNK_BYTES // max(1, bytes_per_sample)))


class CheckedBatch:
    """A validated (model, layout, inputs, targets) with the model's output checked once."""

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        targets: torch.Tensor | None,
        params: Iterable[Any] | None,
        ignore_index: object,
        layout: ParamLayout | None = None,
    ) -> None:
        self.layout = layout if layout is not None else ParamLayout(model, params)
        _check_batchnorm(model)
        self.inputs, self.N = _as_inputs(inputs)
        for t in self.inputs:
            if t.device != self.layout.device:
                raise ValueError(f"inputs are on {t.device} but the parameters are on {self.layout.device}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)
        self.targets = None if targets is None else _check_targets(targets, self.N, self.layout.device)
        self.model = model
        # One sample through the model: the output's type and shape, before anything is vmapped.
        with torch.no_grad():
            probe = model(*(t[:1] for t in self.inputs))
        check_output(probe, 1, None if self.targets is None else self.targets[:1])
        self.C = probe.shape[-1]
        self.seq = probe.dim() == 3
        self.out_dtype = probe.dtype
        if self.targets is not None:
            if self.targets.dim() != (2 if self.seq else 1):
                raise ValueError(
                    f"targets have shape {tuple(self.targets.shape)} but the model returns "
                    f"{'(N, T, C)' if self.seq else '(N, C)'} logits"
                )
            self.valid = _check_target_values(self.targets, self.C, self.ignore_index)

    def call(self, ptensors: Sequence[torch.Tensor], args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The model's logits at parameters ``ptensors`` (a tuple in layout order) for a batch ``args``."""
        return torch.func.functional_call(self.model, dict(zip(self.layout.names, ptensors)), args)

    def chunks(self, size: int) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...], torch.Tensor | None]]:
        for a in range(0, self.N, size):
            b = min(self.N, a + size)
            yield a, b, tuple(t[a:b] for t in self.inputs), (None if self.targets is None else self.targets[a:b])


def _ce_sum(logits: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    C = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, C), y.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


class PerSampleGrads(NamedTuple):
    """``G`` (N, P), ``logits`` (N, C) or (N, T, C), both detached; ``layout`` maps columns to parameters."""

    G: torch.Tensor
    logits: torch.Tensor
    layout: ParamLayout


def per_sample_grads(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    params: Iterable[Any] | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    layout: ParamLayout | None = None,
    out: torch.Tensor | None = None,
) -> PerSampleGrads:
    r"""Per-sample gradients of the summed softmax cross-entropy: ``(G, logits, layout)``.

    ``G`` (N, P), row n = :math:`\nabla_\theta l_n` (the sum-loss convention of spec/fisher.md; for the
    mean loss divide by N), in the parameters' dtype, columns in ``layout`` order (see
    :class:`ParamLayout`); ``logits`` the model's output on the batch, detached. ``inputs`` is a tensor
    (or a tuple of tensors) with leading dimension N; ``targets`` (N,) class indices for (N, C) logits,
    (N, T) for (N, T, C) logits (a sample is then a sequence, module docstring); entries equal to
    ``ignore_index`` are left out of the loss.

    Memory: ``chunk_size`` samples at a time (None: as many as fit in :data:`DEFAULT_CHUNK_BYTES` of
    gradients), so the peak is G plus one chunk's gradients and activations. ``out``: a C-contiguous
    (N, P) tensor of the parameters' dtype and device to write G into (reusing one buffer across
    steps saves the page faults of a fresh N·P allocation, which on some machines cost more than
    the gradients themselves).
    """
    chunk_size = check_chunk(chunk_size)
    batch = CheckedBatch(model, inputs, targets, params, ignore_index, layout)
    if batch.targets is None:
        raise ValueError("per_sample_grads needs targets")
    lay = batch.layout
    ii = batch.ignore_index
    itemsize = torch.empty((), dtype=lay.dtype).element_size()

    def sample_loss(
        ptensors: tuple[torch.Tensor, ...], args: tuple[torch.Tensor, ...], y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = batch.call(ptensors, tuple(a.unsqueeze(0) for a in args))[0]
        return _ce_sum(out, y, ii), out

    per_sample = torch.func.vmap(
        torch.func.grad(sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different"
    )
    G = (
        torch.empty((batch.N, lay.P), dtype=lay.dtype, device=lay.device)
        if out is None
        else _checked_out(out, (batch.N, lay.P), lay)
    )
    logits = None
    primals = lay.primals()
    for a, b, args, y in batch.chunks(_chunk_len(chunk_size, batch.N, lay.P * itemsize)):
        assert y is not None  # batch.targets is (checked above)
        grads, z = per_sample(primals, args, y)
        for g, o0, o1 in zip(grads, lay.offsets[:-1], lay.offsets[1:]):
            G[a:b, o0:o1] = g.reshape(b - a, -1)
        if logits is None:
            logits = torch.empty((batch.N, *z.shape[1:]), dtype=z.dtype, device=z.device)
        logits[a:b] = z.detach()
        del grads, z
    assert logits is not None  # N >= 1 (_as_inputs)
    return PerSampleGrads(G, logits, lay)


def _checked_out(out: object, shape: tuple[int, int], lay: ParamLayout) -> torch.Tensor:
    """``out`` if it can hold G: a C-contiguous tensor of ``shape`` with the parameters' dtype and device."""
    if (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != shape
        or out.dtype != lay.dtype
        or out.device != lay.device
        or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous ({shape[0]}, {shape[1]}) {lay.dtype} tensor on {lay.device}")
    return out


def logit_jacobians(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    params: Iterable[Any] | None = None,
    chunk_size: int | None = None,
    layout: ParamLayout | None = None,
) -> torch.Tensor:
    r"""Logits Jacobians ``J`` (N, C, P) — or (N, T, C, P) for sequence models — in the parameters'
    dtype: :math:`J_n = \partial z_n/\partial\theta` (``vmap`` over ``jacrev``: C backward passes per
    sample). N·C·P numbers: for small P and tests; the matrix-free
    :class:`fisheropt.torch.FisherOperator` never builds it."""
    chunk_size = check_chunk(chunk_size)
    batch = CheckedBatch(model, inputs, None, params, -100, layout)
    lay = batch.layout

    def sample_logits(ptensors: tuple[torch.Tensor, ...], args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return batch.call(ptensors, tuple(a.unsqueeze(0) for a in args))[0]

    jac = torch.func.vmap(torch.func.jacrev(sample_logits), in_dims=(None, 0), randomness="different")
    jacobians: torch.Tensor | None = None  # J, allocated when the first chunk gives its shape
    itemsize = torch.empty((), dtype=lay.dtype).element_size()
    primals = lay.primals()
    rows = torch.Size()
    for a, b, args, _ in batch.chunks(_chunk_len(chunk_size, batch.N, lay.P * itemsize * batch.C * 8)):
        parts = jac(primals, args)
        if jacobians is None:
            rows = parts[0].shape[1 : parts[0].dim() - len(lay.shapes[0])]  # (C,) or (T, C)
            jacobians = torch.empty((batch.N, *rows, lay.P), dtype=lay.dtype, device=lay.device)
        for g, o0, o1 in zip(parts, lay.offsets[:-1], lay.offsets[1:]):
            jacobians[a:b, ..., o0:o1] = g.reshape(b - a, *rows, -1)
        del parts
    assert jacobians is not None  # N >= 1 (_as_inputs)
    return jacobians


class LogitStatistics(NamedTuple):
    r"""Softmax statistics of a batch in float64 (tokens flattened for sequence models):

    ``probs`` (M, C) with M = N (classification) or N·T (sequences); ``mask`` (M,) bool, False where
    the target is ``ignore_index``; ``sample`` (M,) the sample each row belongs to; ``labels`` (M,)
    (0 where masked); ``s`` (N,) :math:`s_n=\sum_t\lVert p_{nt}-e_{y_{nt}}\rVert^2`; ``losses`` (N,)
    the per-sample summed cross-entropies."""

    probs: torch.Tensor
    mask: torch.Tensor
    sample: torch.Tensor
    labels: torch.Tensor
    s: torch.Tensor
    losses: torch.Tensor


def logit_statistics(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> LogitStatistics:
    """:class:`LogitStatistics` of ``logits`` (N, C) or (N, T, C) and integer ``targets``."""
    N, C = logits.shape[0], logits.shape[-1]
    z = logits.detach().reshape(-1, C).to(torch.float64)
    y = targets.reshape(-1)
    mask = y != ignore_index
    labels = torch.where(mask, y, torch.zeros_like(y))
    logp = torch.log_softmax(z, dim=1)
    probs = logp.exp()
    T = z.shape[0] // N
    sample = torch.arange(N, device=z.device).repeat_interleave(T)
    r = probs.clone()
    r[torch.arange(z.shape[0], device=z.device), labels] -= 1.0
    m = mask.to(torch.float64)
    s = torch.zeros(N, dtype=torch.float64, device=z.device).index_add_(0, sample, r.square().sum(1) * m)
    nll = -logp.gather(1, labels[:, None])[:, 0] * m
    losses = torch.zeros(N, dtype=torch.float64, device=z.device).index_add_(0, sample, nll)
    return LogitStatistics(probs, mask, sample, labels, s, losses)


def batch_gradient(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    params: Iterable[Any] | None = None,
    ignore_index: int = -100,
    layout: ParamLayout | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    r"""(∇L as a float64 (P,) tensor, the summed loss, the logits) with one ordinary batch backward
    (``torch.func.grad`` of the summed cross-entropy; no per-sample gradients)."""
    batch = CheckedBatch(model, inputs, targets, params, ignore_index, layout)
    lay, y = batch.layout, batch.targets
    if y is None:
        raise ValueError("batch_gradient needs targets")

    def total(ptensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        out = batch.call(ptensors, batch.inputs)
        check_output(out, batch.N, y)
        return _ce_sum(out, y, batch.ignore_index), out

    grads, out = torch.func.grad(total, has_aux=True)(lay.primals())
    g = torch.cat([t.reshape(-1).to(torch.float64) for t in grads])
    stats = logit_statistics(out, y, batch.ignore_index)
    return g, float(stats.losses.sum()), out.detach()


def per_sample_sq_norms(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    params: Iterable[Any] | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    layout: ParamLayout | None = None,
) -> torch.Tensor:
    r""":math:`\lVert\nabla_\theta l_n\rVert^2` (N,) float64, chunk by chunk, without storing G."""
    chunk_size = check_chunk(chunk_size)
    batch = CheckedBatch(model, inputs, targets, params, ignore_index, layout)
    if batch.targets is None:
        raise ValueError("per_sample_sq_norms needs targets")
    lay = batch.layout
    ii = batch.ignore_index

    def sample_loss(
        ptensors: tuple[torch.Tensor, ...], args: tuple[torch.Tensor, ...], y: torch.Tensor
    ) -> torch.Tensor:
        return _ce_sum(batch.call(ptensors, tuple(a.unsqueeze(0) for a in args))[0], y, ii)

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    out = torch.zeros(batch.N, dtype=torch.float64, device=lay.device)
    itemsize = torch.empty((), dtype=lay.dtype).element_size()
    primals = lay.primals()
    for a, b, args, y in batch.chunks(_chunk_len(chunk_size, batch.N, lay.P * itemsize)):
        assert y is not None  # batch.targets is (checked above)
        for g in per_sample(primals, args, y):
            out[a:b] += row_sq_norms(g.reshape(b - a, -1))
    return out


def check_module(model: object) -> None:
    """Refuse a ``model`` that is not a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
