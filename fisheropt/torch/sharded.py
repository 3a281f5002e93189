r"""fisheropt.torch optimizers on ``DTensor`` parameters: FSDP2's ``fully_shard`` (``Shard(0)``, uneven,
trailing shards possibly empty) and ``distribute_tensor`` (``Shard(k)``, ``Replicate``). spec/distributed.md §5.

The kernels run on each rank's local shard (``to_local()``: the same memory, updated in place); the state
is allocated as DTensors with the parameter's placement, so ``torch.distributed.checkpoint`` saves and
reshards it. What a rule needs from the whole tensor is completed across the shard group by ONE collective
per step (an ``all_gather_into_tensor`` of float64 partial sums, added in rank order, so every rank and
every run gets the same bits), which also carries every rank's finiteness flag (all or nothing: one
rank's NaN makes every rank refuse the step, having written nothing):

* **FAdam**: per tensor (Σg², Σḡ², Σw̄²) over the local elements, ḡ and w̄ formed with the guessed
  :math:`\epsilon_t = \epsilon^{2p}`; where the global Σg² shows the guess wrong (RMS(g) < ε/ε₂), a second
  collective of those tensors' (Σḡ², Σw̄²) with the true ε_t; then each rank updates its shard.
* **Coupled Adam**: per coupled matrix sharded by rows, the column sums Σ_i g²_ij of its local rows
  (length d), divided by the global V. A matrix sharded by columns (``Shard(1)``) has all its rows
  locally: no communication.
* **Adam, AdamW, Lion** (element-wise): no communication but the finiteness flag (one int), and none at
  all with ``check_finite=False``.

All DTensor parameters of one optimizer must be sharded over one process group (one mesh dimension;
the others ``Replicate``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import torch
import torch.distributed as dist

from .. import backends as _backends
from ..refimpl.fadam import adaptive_epsilon, rms_of_sum
from .distributed import _reduce

if TYPE_CHECKING:  # fisheropt.torch.optim imports this module
    import fisheropt.torch.optim

__all__ = ["is_sharded", "local", "column_state", "Sharding", "step", "true_epsilons", "Stats", "STATS"]

# torch.distributed.tensor: torch >= 2.4 (DTensor's public home). Without it no tensor is a DTensor, and
# the three names are only used on a tensor that is_sharded found to be one: typed as the real ones.
if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = Replicate = Shard = None


def is_sharded(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (a parameter of FSDP2 or of ``distribute_tensor``)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the local shard of a DTensor (the same memory, detached)."""
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


class Sharding:
    """How a DTensor parameter is laid out: its process group (None: whole on every rank), the tensor
    dimension split across it, and the whole tensor's size and rows."""

    __slots__ = ("group", "dim", "count", "rows", "mesh", "placements")

    def __init__(self, p, label: str):
        self.count, self.rows = p.numel(), (p.shape[0] if p.dim() else 1)
        self.group = self.dim = self.mesh = self.placements = None
        if not is_sharded(p):
            return
        self.mesh, self.placements = p.device_mesh, tuple(p.placements)
        shards = [(i, pl) for i, pl in enumerate(self.placements) if type(pl) is Shard]
        others = [pl for pl in self.placements if type(pl) is not Shard and not isinstance(pl, Replicate)]
        if others or len(shards) > 1:
            raise ValueError(
                f"{label} is a DTensor with placements {self.placements}; fisheropt.torch supports one Shard(dim) "
                "mesh dimension (FSDP2's fully_shard, distribute_tensor) with Replicate on the others"
            )
        if shards:
            mesh_dim, placement = shards[0]
            self.group, self.dim = self.mesh.get_group(mesh_dim), placement.dim


def column_state(p: torch.Tensor) -> torch.Tensor:
    """Zeros of shape (d,) for a V×d matrix's per-column state: a plain tensor, or a DTensor on ``p``'s
    mesh that is replicated where ``p`` is split by rows and split like ``p``'s columns where it is."""
    if not is_sharded(p):
        return p.new_zeros(p.shape[1])
    placements = [Shard(0) if isinstance(pl, Shard) and pl.dim == 1 else Replicate() for pl in p.placements]
    local_columns = local(p).shape[1]
    zeros = torch.zeros(local_columns, dtype=p.dtype, device=local(p).device)
    return DTensor.from_local(
        zeros, p.device_mesh, placements, run_check=False, shape=torch.Size([p.shape[1]]), stride=(1,)
    )


class Stats:
    """What the sharded steps of this process sent: collectives issued and float64 values contributed."""

    def __init__(self):
        self.collectives = 0
        self.values = 0


#: This process's counts since import (read the difference around a step).
STATS = Stats()


def step(
    opt: fisheropt.torch.optim.Optimizer,
    b: fisheropt.torch.optim._Batch,
    steps: int | list[int],
    kwargs: dict[str, Any],
) -> None:
    """One step of the batch ``b`` of ``opt`` (fisheropt.torch.optim) whose parameters include DTensors.
    Every rank of the shard group must call it (``opt.step()``) with the same parameters."""
    labels = [r.label for r in b.records]
    layouts = [Sharding(r.param, r.label) for r in b.records]
    groups = {id(s.group): s.group for s in layouts if s.group is not None}
    if len(groups) > 1:
        raise ValueError(
            "the DTensor parameters of this optimizer are sharded over different process groups; "
            "use one optimizer per mesh"
        )
    group = next(iter(groups.values()), None)
    name = opt.rule.name
    if opt.rule.reduces:  # the backend's two passes, or the error that names the missing one
        _backends.get(b.backend.NAME, f"{name}_partials")
    if name == "fadam":
        _fadam(b, steps, kwargs, layouts, group, opt.check_finite, labels)
    elif name == "coupled_adam":
        _coupled(b, steps, kwargs, layouts, group, opt.check_finite, labels)
    elif opt.rule.reduces:
        raise NotImplementedError(f"{opt.rule.title} has no sharded step (spec/distributed.md §5)")
    else:  # element-wise: the local shards are the whole story; only finiteness is agreed on
        if opt.check_finite:
            _agree(torch.zeros(0, dtype=torch.float64), _finite(b.backend, b.grads), group, labels, b)
        getattr(b.backend, opt.rule.step_function)(b.params, b.grads, *b.states, step=steps, **kwargs)


def _finite(backend, grads, suspects=None) -> bool:
    """This rank's gradients are finite (``suspects``: only those need a look, the rest summed finite)."""
    if suspects is None:
        suspects = grads
    return bool(backend.all_finite(list(suspects))) if len(suspects) else True


def _agree(values: torch.Tensor, ok: bool, group, labels, b) -> torch.Tensor:
    """The sum of ``values`` (float64) over the group, in rank order, with this rank's finiteness flag in
    the same collective; raises FloatingPointError on every rank if any rank's flag is down."""
    buf = torch.cat([values, torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)])
    if group is not None:
        STATS.collectives += 1
        STATS.values += buf.numel()
        # gloo reduces host memory; NCCL the parameters' device
        device = "cpu" if dist.get_backend(group) == "gloo" else local(b.records[0].param).device
        buf = _reduce(buf.to(device), group, ordered=True).cpu()
    if buf[-1] != 0:
        here = "" if ok else " (on this rank: " + ", ".join(_bad(b, labels)) + ")"
        raise FloatingPointError(
            f"non-finite values (NaN or Inf) in the gradients of {int(buf[-1])} rank(s){here}; nothing was "
            "updated on any rank (check_finite=False skips this check)"
        )
    return buf[:-1]


def _bad(b, labels):
    return [label for label, g in zip(labels, b.grads) if not b.backend.all_finite([g])]


def _pick(values, idx):
    return [values[i] for i in idx] if isinstance(values, (list, tuple)) else values


def _subset(kwargs, idx):
    return {k: _pick(v, idx) for k, v in kwargs.items()}


def true_epsilons(sums, counts, params, hyperparams):
    """FAdam's ε_t of each whole tensor from its Σg² (``sums[:, 0]``) and size: (the tensors whose ε_t is
    not the guess ε^{2p} that pass 1 used, their ε_t). ``hyperparams``: one value or one per tensor."""
    redo, eps_t = [], []
    for i, x in enumerate(params):
        h = {
            k: hyperparams[k][i] if isinstance(hyperparams[k], (list, tuple)) else hyperparams[k]
            for k in ("eps", "eps2", "p")
        }
        true = adaptive_epsilon(rms_of_sum(sums[i, 0], counts[i]), **h, dtype=x.dtype)
        if true != adaptive_epsilon(math.inf, **h, dtype=x.dtype):
            redo.append(i)
            eps_t.append(float(true))
    return redo, eps_t


def _fadam(b, steps, kwargs, layouts, group, check, labels) -> None:
    backend, state = b.backend, (b.params, b.grads, *b.states)
    counts = [s.count for s in layouts]
    split = [i for i, s in enumerate(layouts) if s.group is not None]
    sums = backend.fadam_partials(*state, step=steps, **kwargs)
    ok = not check or bool(np.isfinite(sums[:, 0]).all()) or _finite(backend, b.grads)
    reduced = _agree(torch.from_numpy(sums[split].reshape(-1)), ok, group, labels, b)
    sums[split] = reduced.numpy().reshape(-1, 3)
    # Where the whole tensor's ε_t is not the guess, Σḡ², Σw̄² again with it (the same decision on every
    # rank, made from the same reduced bits).
    redo, eps_t = true_epsilons(sums, counts, b.params, kwargs)
    if redo:
        sub = _subset(dict(kwargs, step=steps), redo)
        again = backend.fadam_partials(*([x[i] for i in redo] for x in state), **sub, eps_t=eps_t)
        sums[redo, 1:] = again[:, 1:]
        split_redo = [k for k, i in enumerate(redo) if layouts[i].group is not None]
        if split_redo:
            values = torch.from_numpy(np.ascontiguousarray(again[split_redo, 1:]).reshape(-1))
            total = _agree(values, True, group, labels, b).numpy().reshape(-1, 2)
            sums[[redo[k] for k in split_redo], 1:] = total
    backend.fadam_apply(*state, step=steps, **kwargs, sums=sums, counts=counts)


def _coupled(b, steps, kwargs, layouts, group, check, labels) -> None:
    backend, state = b.backend, (b.params, b.grads, *b.states)
    flags = kwargs["coupled"]
    coupled = [i for i, c in enumerate(flags) if c]
    sums = backend.coupled_adam_partials(*state, step=steps, **kwargs)
    by_rows = [k for k, i in enumerate(coupled) if layouts[i].group is not None and layouts[i].dim == 0]
    ok = True
    if check:
        suspects = [b.grads[i] for k, i in enumerate(coupled) if not np.isfinite(sums[k]).all()]
        ok = _finite(backend, [g for g, c in zip(b.grads, flags) if not c] + suspects)
    values = [torch.from_numpy(sums[k]) for k in by_rows]
    reduced = _agree(torch.cat(values) if values else torch.zeros(0, dtype=torch.float64), ok, group, labels, b)
    offset = 0
    for k in by_rows:
        d = sums[k].size
        sums[k] = reduced[offset : offset + d].numpy()
        offset += d
    rows = [layouts[i].rows for i in coupled]
    backend.coupled_adam_apply(*state, step=steps, **kwargs, column_sums=sums, rows=rows)
