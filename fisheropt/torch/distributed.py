r"""fisheropt under ``torch.distributed``: data-parallel natural-gradient directions and the
all-or-nothing step across a process group (spec/distributed.md).

**Element-wise rules under DDP / ZeroRedundancyOptimizer.** ``fot.Adam``, ``AdamW``, ``FAdam``,
``CoupledAdam`` and ``Lion`` need nothing from this module under DDP (every rank holds the whole
tensors and DDP's averaged gradient: each rank runs the single-process step, bit for bit) or as the
``optimizer_class`` of ``torch.distributed.optim.ZeroRedundancyOptimizer`` (each rank steps whole
tensors of its partition; ZeRO broadcasts them). A non-finite gradient on one rank reaches every
rank through DDP's average, so every rank refuses the step (``FloatingPointError``, nothing
written). Where gradients are *not* averaged before the step, :func:`all_finite` agrees on
finiteness across the group first (one 1-element all-reduce).

**Distributed EF / iEF / SF / exact directions** (:func:`ngd_direction`). With data parallelism
rank r holds the per-sample gradients :math:`G_r` (:math:`N_r\times P`) of its own samples. The direction
:math:`d = G^\top(GG^\top+\lambda I)^{-1}\mathrm{rhs}` (EF: rhs = 1, iEF: rhs = s) is assembled without
gathering G whole:

1. the row counts :math:`N_r` are all-gathered (R integers);
2. G is re-partitioned by parameter columns with one ``all_to_all_single``: rank r receives
   :math:`G_{:,C_r}` (N × P_r, all samples, its columns; N·P/R numbers per rank);
3. each rank forms the float64 Gram partial :math:`G_{:,C_r}G_{:,C_r}^\top` (N × N, the backend's
   ``fisher_gram``) and the partials are summed by one ``all_reduce`` (iEF's s travels in the same
   buffer); ``ordered=True`` all-gathers the partials instead and sums them in rank order, a
   reduction order that does not depend on the collective's algorithm (R times the bytes);
4. the N × N system is solved on every rank (replicated, float64, through fisheropt.fisher's
   checked Cholesky solve: ``DampingTooSmall`` and the non-finite-G guard trip on every rank alike);
5. rank r returns its slice :math:`d_{C_r} = G_{:,C_r}^\top a`, the columns a parameter-sharded model
   owns; :func:`gather_columns` assembles the whole d for a replicated (DDP) model.

SF and exact use the Woodbury form of spec/fisher.md §3 with the local rows of their factor A
(Ĝ rows, or the Fisher factor's rows :math:`B_nJ_n`): the same two collectives with an m × m Gram
and :math:`A\nabla L` partials, :math:`d_{C_r} = (\nabla L_{C_r} - A_{:,C_r}^\top a)/\lambda`.

Transport is ``torch.distributed`` only (gloo on CPU, NCCL on CUDA), on ``group`` (default: the
world group). Every rank of the group must call these functions collectively.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _ngd
from .. import backends as _backends
from .._checks import array_module

__all__ = ["ngd_direction", "column_split", "shard_columns", "gather_columns", "all_finite", "Columns", "KINDS"]

KINDS = ("ef", "ief", "sf", "exact")


# ---- column partitions ----------------------------------------------------------------------
def column_split(P: int, world_size: int) -> list[int]:
    """Balanced contiguous split of P columns over R ranks: the first P mod R ranks get one more."""
    q, rem = divmod(int(P), int(world_size))
    return [q + (r < rem) for r in range(int(world_size))]


def shard_columns(shapes, world_size: int) -> list[torch.Tensor]:
    """The flat columns (C-order, parameters concatenated in order, as :class:`~fisheropt.torch.ParamLayout`)
    that each rank holds when every parameter is sharded on dim 0 as FSDP2's ``fully_shard``
    (``Shard(0)``, ``torch.chunk`` semantics: chunks of ceil(n/R) rows, trailing ranks possibly empty).
    Pass the result as ``columns=`` to get d in exactly each rank's local-shard order."""
    R = int(world_size)
    cols = [[] for _ in range(R)]
    offset = 0
    for shape in shapes:
        shape = tuple(int(x) for x in shape)
        numel = math.prod(shape)
        if not shape:  # a 0-d parameter: FSDP2 keeps it whole on rank 0
            cols[0].append(torch.arange(offset, offset + 1))
            offset += 1
            continue
        rows, inner = shape[0], numel // shape[0] if shape[0] else 0
        chunk = -(-rows // R) if rows else 0
        for r in range(R):
            lo, hi = min(r * chunk, rows), min((r + 1) * chunk, rows)
            if hi > lo:
                cols[r].append(torch.arange(offset + lo * inner, offset + hi * inner))
        offset += numel
    return [torch.cat(c) if c else torch.zeros(0, dtype=torch.int64) for c in cols]


class Columns:
    """A partition of the P columns over the R ranks of a group: contiguous blocks (``sizes``) or
    explicit index sets (``index``, one LongTensor per rank, disjoint, covering 0..P-1)."""

    def __init__(self, P: int, R: int, columns=None):
        self.P, self.R = int(P), int(R)
        self.index = None
        if columns is None:
            self.sizes = column_split(P, R)
        elif isinstance(columns, (list, tuple)) and all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in columns
        ):
            self.sizes = [int(c) for c in columns]
            if len(self.sizes) != R or min(self.sizes, default=0) < 0 or sum(self.sizes) != P:
                raise ValueError(f"columns: {R} non-negative block sizes summing to P={P} expected, got {columns}")
        elif isinstance(columns, (list, tuple)) and all(isinstance(c, torch.Tensor) for c in columns):
            if len(columns) != R:
                raise ValueError(f"columns: one index tensor per rank ({R}) expected, got {len(columns)}")
            index = [c.to(torch.int64).reshape(-1).cpu() for c in columns]
            every = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
            if every.numel() != P or (P and not torch.equal(torch.sort(every).values, torch.arange(P))):
                raise ValueError(f"columns: the index sets must partition 0..{P - 1} (disjoint, covering)")
            self.index = index
            self.sizes = [int(c.numel()) for c in index]
        else:
            raise TypeError("columns must be None, a list of R block sizes, or a list of R index tensors")
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)

    def block(self, G: torch.Tensor, r: int) -> torch.Tensor:
        """The columns of rank r of G (rows, P), contiguous."""
        if self.index is None:
            return G[:, self.offsets[r] : self.offsets[r + 1]].contiguous()
        return G.index_select(1, self.index[r].to(G.device))


# ---- helpers --------------------------------------------------------------------------------
def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized (dist.init_process_group(...) first)")
    return dist.get_world_size(group), dist.get_rank(group)


def _to_array(t: torch.Tensor):
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    import cupy  # pragma: no cover - GPU only

    return cupy.from_dlpack(t)


def _from_array(a, device) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return torch.from_dlpack(a).to(device)  # pragma: no cover - GPU only


def all_finite(tensors, group=None) -> bool:
    """True on every rank iff every tensor on every rank of ``group`` is finite (one all-reduce of one
    number). Call it before ``opt.step()`` when gradients are not averaged across ranks (DDP already
    spreads a NaN to every rank), so that all ranks skip the same step."""
    ok = all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.numel())
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _repartition(blocks_of, rows_per_rank, width, cols: Columns, group, dtype, device):
    """all_to_all_single: rank r sends ``blocks_of(j)`` (its rows × P_j) to rank j and receives the
    rows of every rank in its own columns: (sum(rows_per_rank), P_r)."""
    R = cols.R
    send = [blocks_of(j).reshape(-1) for j in range(R)]
    in_splits = [int(b.numel()) for b in send]
    send = torch.cat(send) if send else torch.zeros(0, dtype=dtype, device=device)
    out_splits = [int(n) * width for n in rows_per_rank]
    recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    return recv.reshape(sum(int(n) for n in rows_per_rank), width)


# all_gather_into_tensor's new name (torch >= 2.12 warns on the old one).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce(buf: torch.Tensor, group, ordered: bool) -> torch.Tensor:
    """Sum of ``buf`` over the group: one all_reduce, or (ordered) an all-gather summed in rank order."""
    if not ordered:
        dist.all_reduce(buf, group=group)
        return buf
    R, _ = _group_info(group)
    out = torch.empty(R * buf.numel(), dtype=buf.dtype, device=buf.device)
    _all_gather(out, buf.reshape(-1).contiguous(), group=group)
    out = out.reshape((R,) + tuple(buf.shape))
    total = out[0].clone()
    for k in range(1, R):
        total += out[k]
    return total


def _check_tensor(t, name, ndim, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")
    if floating and t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


# ---- the direction --------------------------------------------------------------------------
def ngd_direction(
    kind: str,
    *,
    G: torch.Tensor,
    damping: float,
    s: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    columns: Sequence[int] | Sequence[torch.Tensor] | None = None,
    ordered: bool = False,
    backend: str = "auto",
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    r"""This rank's slice :math:`d_{C_r}` of the natural-gradient direction of the *global* batch.

    ``G`` (N_r, P): the per-sample gradients (sum loss) of this rank's samples, float32/float64, every
    rank the same P, dtype and device; N_r may differ between ranks (0 allowed, not on all).
    ``s`` (N_r,) for ``"ief"``; ``A`` (m_r, P) for ``"sf"`` (Ĝ rows :math:`\hat g_{kn}/\sqrt K` of this rank's
    samples) and ``"exact"`` (the Fisher factor's rows :math:`B_nJ_n`): float64 recommended (the Woodbury
    form cancels). ``damping`` λ > 0 as in :func:`fisheropt.fisher.ngd_direction` (sum loss).
    ``columns``: None (balanced contiguous blocks, :func:`column_split`), R block sizes, or R index
    tensors (e.g. :func:`shard_columns` for FSDP2's Shard(0)); the result follows rank r's columns
    in that order. ``ordered``: sum the Gram partials in rank order (all-gather) instead of an
    all-reduce. ``stats``: a dict to receive the bytes and collectives of the call.

    Equals ``fisheropt.fisher.ngd_direction(kind, ...)`` on the gathered arrays, restricted to the
    rank's columns, to the float64 summation tolerance of spec/distributed.md §3 (the Gram's sums
    run in another order). EF/iEF always solve the N × N system (the single-process function
    switches to the P × P one when P < N); SF/exact need P > m = Σ m_r (the Woodbury branch).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    if (
        isinstance(damping, bool)
        or not isinstance(damping, numbers.Real)
        or not math.isfinite(float(damping))
        or float(damping) <= 0.0
    ):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    damping = float(damping)
    _check_tensor(G, "G", 2)
    if kind == "ief":
        if s is None:
            raise ValueError("kind 'ief' needs s")
        _check_tensor(s, "s", 1)
        if s.shape[0] != G.shape[0]:
            raise ValueError(f"s has shape {tuple(s.shape)} but G has {G.shape[0]} rows")
        if s.numel() and not bool((s >= 0).all()):
            raise ValueError("s must be >= 0 (squared norms)")
    elif s is not None:
        raise ValueError(f"kind {kind!r} does not use s; leave it out")
    if kind in ("sf", "exact"):
        if A is None:
            raise ValueError(f"kind {kind!r} needs A, the local rows of its factor (Ĝ for sf, B_n J_n for exact)")
        _check_tensor(A, "A", 2)
        if A.shape[1] != G.shape[1] or A.device != G.device:
            raise ValueError(f"A has shape {tuple(A.shape)} on {A.device}; G has {tuple(G.shape)} on {G.device}")
    elif A is not None:
        raise ValueError(f"kind {kind!r} does not use A; leave it out")
    R, rank = _group_info(group)
    device, dtype = G.device, G.dtype
    P = int(G.shape[1])
    comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    if comm_device != device:
        raise ValueError(f"the group's backend is gloo but G is on {device}; use NCCL for CUDA tensors")
    cols = Columns(P, R, columns)
    # bytes: a ring all-reduce's 2(R-1)/R share of the buffer is a fraction
    info: dict[str, float] = {"collectives": 0, "bytes_sent": 0, "bytes_received": 0}

    # 1. the shapes of every rank: (N_r, m_r, P, dtype code)
    m_local = int(A.shape[0]) if A is not None else 0
    shape = torch.tensor(
        [int(G.shape[0]), m_local, P, 1 if dtype == torch.float64 else 0], dtype=torch.int64, device=comm_device
    )
    shapes = torch.empty(R * 4, dtype=torch.int64, device=comm_device)
    _all_gather(shapes, shape, group=group)
    shapes = shapes.reshape(R, 4)
    info["collectives"] += 1
    info["bytes_sent"] += 32
    info["bytes_received"] += 32 * R
    shapes = shapes.cpu().tolist()
    if any(row[2] != P for row in shapes) or any(row[3] != shapes[0][3] for row in shapes):
        raise ValueError(
            f"every rank must pass G with the same number of columns and dtype; got (P, float64?) "
            f"{[(row[2], bool(row[3])) for row in shapes]}"
        )
    rows = [row[0] for row in shapes]
    mrows = [row[1] for row in shapes]
    N, m = sum(rows), sum(mrows)
    if N == 0:
        raise ValueError("G has no rows on any rank")
    factor = A is not None  # sf, exact: checked above, A comes with those kinds only
    if factor:
        if m == 0:
            raise ValueError("A has no rows on any rank")
        if P <= m:
            raise ValueError(
                f"P={P} <= m={m} factor rows: the parameter-space system is the smaller one; gather G "
                "and A and call fisheropt.fisher.ngd_direction (the distributed solve is the Woodbury "
                "branch, P > m)"
            )

    # 2. re-partition by columns: one all_to_all of [G rows; A rows] per destination
    width = cols.sizes[rank]
    woodbury = None  # sf, exact: (A_{:,C_r}, ∇L_{C_r}), the factor's rows and the gradient in my columns
    if factor:
        A64 = A.to(torch.float64)
        G64 = G.to(torch.float64)
        both = torch.cat([G64, A64], dim=0)
        local = _repartition(
            lambda j: cols.block(both, j),
            [n + k for n, k in zip(rows, mrows)],
            width,
            cols,
            group,
            torch.float64,
            device,
        )
        # received row blocks: for each source i, N_i rows of G then m_i rows of A
        starts = np.cumsum([0] + [n + k for n, k in zip(rows, mrows)])
        G_cols = torch.cat([local[starts[i] : starts[i] + rows[i]] for i in range(R)])
        A_cols = torch.cat([local[starts[i] + rows[i] : starts[i + 1]] for i in range(R)])
        woodbury = (A_cols, G_cols.sum(0, dtype=torch.float64))
        itemsize = 8
        sent_rows = int(G.shape[0]) + m_local
    else:
        G_cols = _repartition(lambda j: cols.block(G, j), rows, width, cols, group, dtype, device)
        itemsize = G.element_size()
        sent_rows = int(G.shape[0])
    info["collectives"] += 1
    info["bytes_sent"] += sent_rows * (P - width) * itemsize
    info["bytes_received"] += (sum(rows) + (m if factor else 0) - sent_rows) * width * itemsize

    # 3. float64 Gram partials (+ the right-hand side's partials) in one buffer, summed over the group
    size, mat = (m, woodbury[0]) if woodbury is not None else (N, G_cols)
    buf = torch.zeros(size * size + size, dtype=torch.float64, device=device)
    if width:
        arr = _to_array(mat)
        module = _backends.select(backend, [arr])
        gram = module.fisher_gram(arr)
        buf[: size * size] = _from_array(gram, device).reshape(-1)
    if woodbury is not None:
        if width:
            A_cols, grad_cols = woodbury
            buf[size * size :] = A_cols @ grad_cols  # (A ∇L) partial over my columns
    elif s is not None:  # ief: checked above, s comes with it only
        off = sum(rows[:rank])
        buf[size * size + off : size * size + off + rows[rank]] = s.to(torch.float64)
    buf = _reduce(buf, group, ordered)
    info["collectives"] += 1
    nbytes = buf.numel() * 8
    info["bytes_sent"] += nbytes * (1 if ordered else 2 * (R - 1) / R)
    info["bytes_received"] += nbytes * ((R - 1) if ordered else 2 * (R - 1) / R)
    info.update(N=N, m=m, P=P, columns=width, ordered=bool(ordered))

    # 4. the replicated N × N (or m × m) solve, through fisheropt.fisher's checked solver
    gram = _to_array(buf[: size * size].reshape(size, size))
    xp = array_module(gram)
    _ngd.reference.check_gram(gram, np.float64 if factor or dtype == torch.float64 else np.float32, xp)
    solve = _ngd.parameter_space_solve(xp)
    if woodbury is not None:
        A_cols, grad_cols = woodbury
        rhs = _to_array(buf[size * size :])
        a = _from_array(solve(gram, rhs, damping, singular=True), device)
        d = (grad_cols - A_cols.T @ a) / damping
        d = d.to(dtype)
    else:
        rhs = xp.ones(N, dtype=xp.float64) if kind == "ef" else _to_array(buf[size * size :])
        top = float(xp.abs(rhs).max()) if rhs.size else 0.0
        shift = math.frexp(top)[1] - 1 if 0.0 < top < math.inf else 0
        if shift:
            rhs = xp.ldexp(rhs, -shift)
        a = _from_array(solve(gram, rhs, damping), device).to(dtype)
        # 5. this rank's slice d_{C_r} = G_{:,C_r}ᵀ a
        d = G_cols.T @ a if width else torch.zeros(0, dtype=dtype, device=device)
        if shift:
            d = torch.ldexp(d, torch.tensor(shift, dtype=torch.int32, device=device)) if d.numel() else d
    if not bool(torch.isfinite(d).all()):
        raise ValueError("the direction overflows its dtype (|d| beyond the float range; a larger damping shrinks it)")
    if stats is not None:
        stats.update(info)
    return d


def gather_columns(
    d_local: torch.Tensor,
    P: int,
    group: dist.ProcessGroup | None = None,
    columns: Sequence[int] | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The whole d (P,) on every rank from the ranks' slices (one all-gather of P numbers): what a
    replicated (DDP) model applies. ``columns`` as given to :func:`ngd_direction`."""
    R, _ = _group_info(group)
    cols = Columns(P, R, columns)
    width = max(cols.sizes) if cols.sizes else 0
    padded = torch.zeros(width, dtype=d_local.dtype, device=d_local.device)
    padded[: d_local.numel()] = d_local
    out = torch.empty(R * width, dtype=d_local.dtype, device=d_local.device)
    _all_gather(out, padded, group=group)
    out = out.reshape(R, width)
    d = torch.empty(P, dtype=d_local.dtype, device=d_local.device)
    for j in range(R):
        piece = out[j, : cols.sizes[j]]
        if cols.index is None:
            d[cols.offsets[j] : cols.offsets[j + 1]] = piece
        else:
            d[cols.index[j].to(d.device)] = piece
    return d
