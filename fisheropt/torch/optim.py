"""fisheropt's update rules as ``torch.optim.Optimizer`` subclasses.

One class per rule of the registry (:data:`fisheropt.refimpl.RULES`), made by
:func:`optimizer_class`: ``fisheropt.torch.AdamW`` and ``fisheropt.AdamW`` run the
same kernels on the same numbers; this class adds the torch semantics:

* ``param_groups`` with their own hyperparameters (read at every step, so LR
  schedulers and manual changes take effect at the next step; validated when they
  change), ``add_param_group``, ``zero_grad``, ``step(closure)``, the step hooks;
* per-parameter state ``state[p]`` with its own ``"step"`` (a 0-d tensor, as in
  torch.optim); a parameter whose ``.grad`` is None is skipped entirely;
* ``state_dict()``/``load_state_dict()`` as plain tensors (``torch.load(...,
  weights_only=True)`` reads them); Adam, AdamW and Coupled Adam use torch's state
  keys (``exp_avg``, ``exp_avg_sq``), so checkpoints move between
  ``torch.optim.AdamW`` and ``fisheropt.torch.AdamW`` in both directions.

Zero copy: the kernels update the tensors' own memory through NumPy views (CPU)
or DLPack CuPy views (CUDA). The views of parameters and state are made once per
parameter and kept (the numba backend caches its plans on their identity);
gradient views are made at each step. All parameters of a device, across all
param groups and dtypes, are updated by ONE backend call, with per-tensor
hyperparameters and step counts: the number of groups does not slow a step.

A step checks everything first (gradients, hyperparameters, finiteness, memory
overlap) and raises before writing anything; the backend call is all or nothing,
and Ctrl-C waits until it returns (README, "Guarantees"). With parameters on several
devices there is one call per device, each all or nothing.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast, overload

import numpy as np
import numpy.typing as npt
import torch
from torch.optim.optimizer import ParamsT

from .. import _checks
from .. import backends as _backends
from .._atomic import deferred_interrupts
from .._memory import Layout, MemoryOverlap, check_disjoint, data_pointers
from ..optim import bind_constructor, check_hyperparams, check_tensor_flags, constructor_signature
from ..refimpl import RULES
from ..refimpl.rule import Rule, StateArray
from . import _tensors as T
from . import sharded as S

try:  # float32 (float64 when that is torch's default dtype), as torch.optim stores "step"
    # torch's own rule (private and unannotated)
    from torch.optim.optimizer import _get_scalar_dtype  # pyright: ignore[reportPrivateUsage, reportUnknownVariableType]
except ImportError:  # pragma: no cover - older or newer torch

    def _get_scalar_dtype() -> torch.dtype:
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


__all__ = [
    "Optimizer",
    "optimizer_class",
    "CLASSES",
    "COMMON_OPTIONS",
    "TorchCounterpart",
    "COUNTERPARTS",
    "STATE_KEYS",
    "COMPILE_MESSAGE",
]

#: Why ``step`` is not traced by torch.compile (the text of the graph break).
COMPILE_MESSAGE = (
    "fisheropt.torch optimizers run their update outside torch.compile: the step hands the tensors' memory to "
    "NumPy/Numba (or CuPy) kernels, which TorchDynamo cannot trace. Compile the model (torch.compile(model)) "
    "and call opt.step() outside the compiled function, or let the graph break here (fullgraph=False)."
)


@dataclass(frozen=True)
class Option:
    """A torch.optim option: its default and the values fisheropt accepts (others: ``why``)."""

    default: object
    accepted: tuple[object, ...]
    why: str = ""
    in_signature: bool = True
    positional: bool = False


#: Options of every torch.optim optimizer. foreach/fused choose among torch's implementations;
#: fisheropt always runs its own fused multi-tensor kernel, so any value is accepted (and kept,
#: so that checkpoints round-trip).
COMMON_OPTIONS = {
    "maximize": Option(
        False, (False,), "maximize=True (gradient ascent) is not supported; minimize the negated objective instead"
    ),
    "foreach": Option(None, (None, False, True)),
    "capturable": Option(
        False,
        (False,),
        "capturable=True (CUDA-graph capture) is not supported: a step "
        "runs host code (hyperparameters, step counts, checks)",
    ),
    "differentiable": Option(
        False, (False,), "differentiable=True is not supported: the update runs outside autograd, in place"
    ),
    "fused": Option(None, (None, False, True)),
}


@dataclass(frozen=True)
class TorchCounterpart:
    """A rule that torch.optim implements too: its class and the options of that class."""

    name: str
    options: Mapping[str, Option] = field(default_factory=dict[str, Option])


_AMSGRAD = Option(False, (False,), "amsgrad=True (AMSGrad) is not supported", positional=True)
COUNTERPARTS = {
    "adam": TorchCounterpart(
        "Adam",
        {
            "amsgrad": _AMSGRAD,
            "decoupled_weight_decay": Option(
                False, (False,), "decoupled_weight_decay=True is AdamW: use fisheropt.torch.AdamW"
            ),
        },
    ),
    "adamw": TorchCounterpart(
        "AdamW",
        {
            "amsgrad": _AMSGRAD,
            "decoupled_weight_decay": Option(
                True,
                (True,),
                "AdamW always decouples its weight decay (L2 decay added to the gradient is fisheropt.torch.Adam)",
                in_signature=False,
            ),
        },
    ),
}

#: torch state keys of the rules' state arrays, where torch (or the rule's usual torch
#: implementation: over torch.optim.AdamW for Coupled Adam, lion-pytorch for Lion) has names for them.
#: Other rules use the descriptor's names (e.g. FAdam: "m", "f").
_ADAM_KEYS = {"m": "exp_avg", "v": "exp_avg_sq"}
STATE_KEYS = {
    "adam": _ADAM_KEYS,
    "adamw": _ADAM_KEYS,
    "coupled_adam": _ADAM_KEYS,
    "lion": {"m": "exp_avg"},
}  # as the Lion implementations for torch (lion-pytorch, pytorch_optimizer)

# Options of other torch optimizers and hyperparameters of other rules: a group that
# turns one of them on is refused instead of being silently ignored.
_TORCH_FOREIGN = (
    "amsgrad",
    "nesterov",
    "momentum",
    "dampening",
    "centered",
    "decoupled_weight_decay",
    "lr_decay",
    "rho",
    "alpha",
    "lambd",
    "momentum_decay",
    "initial_accumulator_value",
    "etas",
    "step_sizes",
)

_MISSING = object()
DeviceKey = T.DeviceKey


_tensor_numpy = torch.Tensor.numpy


class _Resync(Exception):
    """param_groups were changed outside add_param_group: rebuild the records, then collect again."""


class _Record:
    """What the optimizer keeps for one parameter: its views, its state and where it is."""

    param: torch.Tensor
    label: str
    dev: DeviceKey
    fast: bool  # a C-contiguous CPU tensor: its gradient's view is checked on the fast path
    order: tuple[int, ...] | None  # T.memory_order
    view: Any  # the NumPy (CPU) or CuPy (CUDA) array on the parameter's memory
    shape: tuple[int, ...]
    np_dtype: np.dtype[Any]
    ptr: int
    tdtype: torch.dtype
    tshape: torch.Size
    tstride: tuple[int, ...]
    flag: bool
    st: dict[str, torch.Tensor] | None  # its entry of Optimizer.state, None before its first step
    state_views: tuple[Any, ...] | None  # views of st's tensors, in rule.state order
    step_np: npt.NDArray[Any] | None  # the view of st["step"]

    __slots__ = (
        "param",
        "label",
        "dev",
        "fast",
        "order",
        "view",
        "shape",
        "np_dtype",
        "ptr",
        "tdtype",
        "tshape",
        "tstride",
        "flag",
        "st",
        "state_views",
        "step_np",
    )

    def state_shape(self, spec: StateArray) -> tuple[int, ...]:
        if spec.per_column and self.flag:
            return (self.param.shape[1],)
        return tuple(self.param.shape)


class _Group:
    __slots__ = ("group", "params", "records", "raw", "kernel_kw", "flag", "dtypes", "sharded")

    group: dict[str, Any]  # the entry of param_groups
    params: list[torch.Tensor]
    records: list[_Record]
    raw: tuple[Any, ...] | None  # the option values last validated (None: validate at the next step)
    kernel_kw: dict[str, Any]
    flag: bool
    dtypes: tuple[np.dtype[Any], ...]
    sharded: bool  # a parameter is a DTensor (a group is rebuilt whenever its parameters change)


class _Batch:
    """The tensors of one device that take part in a step, in kernel order."""

    __slots__ = ("backend", "dev", "grads", "new", "params", "records", "runs", "state_rows", "states", "steps")

    def __init__(self, dev: DeviceKey, backend: ModuleType) -> None:
        self.dev, self.backend = dev, backend
        self.records: list[_Record] = []
        self.grads: list[Any] = []
        self.steps: list[int] = []
        self.state_rows: list[Sequence[Any]] = []
        # (record, its new state entry, views of the entry's tensors, view of its step): made
        # by the step, visible in Optimizer.state once the step has run.
        self.new: list[tuple[_Record, dict[str, torch.Tensor], list[Any], npt.NDArray[Any]]] = []
        self.params: list[Any] = []  # made by _prepare
        self.states: list[list[Any]] = []  # made by _prepare
        self.runs: list[tuple[_Group, int]] = []  # (_Group, count): consecutive tensors of one param group


class Optimizer(torch.optim.Optimizer):
    """The ``torch.optim.Optimizer`` of one update rule (``rule``); see the module docstring.

    Subclasses are made by :func:`optimizer_class`; ``fisheropt.torch.FAdam`` etc."""

    rule: Rule
    options: dict[str, Option]  # torch option name -> Option (COMMON_OPTIONS and the counterpart's)
    state_keys: tuple[str, ...]  # torch state key of each of rule.state
    _check_finite: bool

    def __init__(
        self, params: ParamsT, defaults: dict[str, Any], *, backend: str = "auto", check_finite: bool = True
    ) -> None:
        if backend != "auto" and not _backends.is_known(backend):
            raise ValueError(f"unknown backend {backend!r}; use 'auto' or one of {', '.join(_backends.KNOWN)}")
        self._backend_name = backend
        self.check_finite = check_finite
        self._init_private()
        self._validate_group(dict(defaults), (), "defaults")
        super().__init__(params, defaults)
        flag = self.rule.tensor_flag
        if flag is not None and not any(g.flag for g in self._groups):
            warnings.warn(
                f"{type(self).__name__}: no parameter has {flag.name}=True, so every tensor is updated by "
                f"AdamW; flag the embedding matrices ({{'params': [...], '{flag.name}': True}} or "
                "fisheropt.torch.coupled_param_groups(model))",
                UserWarning,
                stacklevel=3,
            )

    def _init_private(self) -> None:
        self._records: dict[torch.Tensor, _Record] = {}  # parameter tensor -> _Record
        self._groups: list[_Group] = []  # one _Group per entry of param_groups
        # device key -> Layout of every parameter and state view (None: stale)
        self._layouts: dict[DeviceKey, Layout | None] = {}
        self._backends: dict[DeviceKey, ModuleType] = {}  # device key -> backend module
        self._scalar_dtype = _get_scalar_dtype()
        self._flag_name = self.rule.tensor_flag.name if self.rule.tensor_flag is not None else None
        self._group_keys = (
            tuple(h.name for h in self.rule.hyperparams)
            + tuple(self.options)
            + ((self._flag_name,) if self._flag_name else ())
        )
        own = set(self._group_keys)
        others = {h.name for r in RULES.values() for h in r.hyperparams}
        others |= {r.tensor_flag.name for r in RULES.values() if r.tensor_flag is not None}
        self._foreign = tuple(k for k in (*_TORCH_FOREIGN, *sorted(others)) if k not in own)
        self._foreign_set = frozenset(self._foreign)
        self._raw_keys = self._group_keys + self._foreign

    # ---- options -------------------------------------------------------------
    check_finite = _checks.bool_property(
        "check_finite", "Refuse a step whose gradients hold NaN or Inf (one read of the gradients), as fisheropt.*."
    )

    @property
    def backends(self) -> dict[str, str]:
        """Device ('cpu', 'cuda:0', ...) -> name of the backend that updates its tensors."""
        return {("cpu" if k == "cpu" else f"cuda:{k}"): b.NAME for k, b in self._backends.items()}

    def _validate_group(
        self, group: Mapping[str, Any], dtypes: Iterable[np.dtype[Any]], where: str
    ) -> tuple[dict[str, Any], bool]:
        """(kernel keyword hyperparameters, tensor flag) of a param group, or a clear error."""
        rule = self.rule
        for k in self._foreign_set.intersection(group):
            value = group[k]
            if value is not None and value is not False and not _checks.is_zero_number(value):
                raise ValueError(
                    f"{where}: {k}={value!r} is not an option of {type(self).__name__} (it would be ignored)"
                )
        for name, opt in self.options.items():
            value = group.get(name, opt.default)
            if value is opt.default:
                continue
            if not any(value is a or (type(value) is bool and value == a) for a in opt.accepted):
                raise ValueError(
                    f"{where}: {name}={value!r} is not supported by {type(self).__name__}"
                    + (f": {opt.why}" if opt.why else f" (accepted: {opt.accepted})")
                )
        hp: dict[str, Any] = {}
        for h in rule.hyperparams:
            if h.name not in group:
                raise ValueError(f"{where}: missing hyperparameter {h.name!r} of {type(self).__name__}")
            value = group[h.name]
            if isinstance(value, torch.Tensor) or (
                _checks.is_sequence(value) and any(isinstance(x, torch.Tensor) for x in value)
            ):
                raise TypeError(
                    f"{where}: {h.name} is a Tensor; fisheropt.torch takes Python numbers (a Tensor "
                    "hyperparameter, which torch.optim uses for capturable CUDA graphs, is not supported)"
                )
            hp[h.name] = value
        try:
            checked = check_hyperparams(rule, hp, dtypes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        flag = False
        if self._flag_name is not None:
            flag = _checks.check_bool(f"{where}: {self._flag_name}", group.get(self._flag_name, False))
        return rule.kernel_kwargs(checked), flag

    # ---- parameters and groups --------------------------------------------------
    # torch's private decorator, as torch.optim.Optimizer.add_param_group
    @torch._disable_dynamo  # pyright: ignore[reportPrivateUsage, reportPrivateImportUsage]
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``{"params": [...], "lr": ...}``), as torch.optim; checked in full first."""
        if not _checks.is_dict(param_group):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a param group needs a 'params' entry (a list of tensors)")
        params, names = _split_names(param_group["params"])
        group = dict(param_group)
        group["params"] = params
        if names is not None:
            group["param_names"] = names
        gi = len(self.param_groups)
        for existing in self.param_groups:
            if ("param_names" in existing) != (names is not None):
                raise ValueError(
                    "all optimizer param groups should be with/without names; cannot add a group "
                    f"{'with' if names is not None else 'without'} names to this optimizer"
                )
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        taken = {p: (gj, j) for gj, g in enumerate(self._groups) for j, p in enumerate(g.params)}
        info = self._build_group(group, gi, taken, self._records)
        devices = {r.dev for r in info.records}
        for dev in devices:
            self._check_disjoint(dev, list(self._records.values()) + info.records)
        # Everything checked: commit (the caller's dict becomes the group, as in torch.optim).
        param_group.clear()
        param_group.update(group)
        info.group = param_group
        self.param_groups.append(param_group)
        self._groups.append(info)
        for r in info.records:
            self._records[r.param] = r
        for dev in devices:
            self._layouts[dev] = None

    def _build_group(
        self,
        group: dict[str, Any],
        gi: int,
        taken: Mapping[torch.Tensor, tuple[int, int]],
        reuse: Mapping[torch.Tensor, _Record],
    ) -> _Group:
        """Validate one (normalized) group and make the records of its parameters; changes nothing."""
        params = group["params"]
        names = group.get("param_names")
        where = f"param_groups[{gi}]"
        labels = [
            f"{where}['params'][{i}]" + (f" ({names[i]!r})" if names and i < len(names) else "")
            for i in range(len(params))
        ]
        seen: dict[torch.Tensor, int] = {}
        for i, p in enumerate(params):
            T.check_param(p, labels[i])
            if not (p.is_leaf or p.retains_grad):
                raise ValueError(f"{labels[i]}: can't optimize a non-leaf Tensor")
            if p in seen:
                raise ValueError(f"{labels[seen[p]]} and {labels[i]} are the same tensor; pass each parameter once")
            seen[p] = i
            if p in taken:
                gj, j = taken[p]
                raise ValueError(
                    f"{labels[i]} is already in param_groups[{gj}] (as its parameter {j}); "
                    "a parameter may appear in one group only"
                )
        dtypes = tuple({T.SUPPORTED_DTYPES[p.dtype]: None for p in params})
        kernel_kw, flag = self._validate_group(group, dtypes, where)
        records: list[_Record] = []
        for i, p in enumerate(params):
            old = reuse.get(p)
            if (
                old is not None
                and old.ptr == p.data_ptr()
                and old.tdtype == p.dtype
                and old.tshape == p.size()
                and old.tstride == tuple(p.stride())
            ):
                rec = copy.copy(old)
                rec.label = labels[i]
                if rec.flag != flag:
                    rec.flag, rec.st, rec.state_views, rec.step_np = flag, None, None, None
            else:
                rec = self._new_record(p, labels[i], flag)
            records.append(rec)
        if flag:
            views = [r.view for r in records]
            try:
                check_tensor_flags(self.rule, [True] * len(views), views)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {exc} (params[i] is {where}['params'][i])") from None
            for r in records:
                if r.order is not None:
                    raise ValueError(
                        f"{r.label} has {self._flag_name}=True but is not C-contiguous (strides "
                        f"{tuple(r.param.stride())}); its rows must be the vocabulary items"
                    )
        info = _Group()
        info.group, info.params, info.records, info.flag, info.dtypes = group, list(params), records, flag, dtypes
        info.kernel_kw = kernel_kw
        info.raw = self._raw(group)
        info.sharded = any(S.is_sharded(p) for p in params)
        return info

    def _new_record(self, p: torch.Tensor, label: str, flag: bool) -> _Record:
        order = T.memory_order(p, label)
        dev = T.device_key(p)
        rec = _Record()
        rec.param, rec.label, rec.dev, rec.order, rec.flag = p, label, dev, order, flag
        rec.ptr, rec.tdtype, rec.tshape, rec.tstride = p.data_ptr(), p.dtype, p.size(), tuple(p.stride())
        backend = self._backend_for(dev, p, label)
        if dev == "cpu":
            rec.view = T.host_view(S.local(p), order)  # a DTensor: its local shard
        else:
            with self._device_context(dev):
                rec.view = T.cupy_views(backend, [p], lambda i: order)[0]
        rec.shape, rec.np_dtype = rec.view.shape, rec.view.dtype
        rec.fast = dev == "cpu" and order is None and not S.is_sharded(p)
        rec.st = rec.state_views = rec.step_np = None
        return rec

    def _backend_for(self, dev: DeviceKey, p: torch.Tensor, label: str) -> ModuleType:
        backend = self._backends.get(dev)
        if backend is not None:
            return backend
        function = self.rule.step_function
        if dev == "cpu":
            probe = [np.zeros(1, dtype=T.SUPPORTED_DTYPES[p.dtype])]
            backend = _backends.select(self._backend_name, probe, function=function)
        else:
            if self._backend_name not in ("auto", "cupy"):
                raise TypeError(
                    f"{label} is on {p.device} but backend={self._backend_name!r} runs on CPU memory; "
                    "use backend='auto' or 'cupy' for CUDA tensors"
                )
            backend = _backends.get("cupy", function)
        self._backends[dev] = backend
        return backend

    def _check_disjoint(self, dev: DeviceKey, records: Iterable[_Record]) -> None:
        named = [(r.label, r.view) for r in records if r.dev == dev]
        check_disjoint(named)

    def _raw(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        """The group's option values as last validated (lists as tuples: a list edited in place differs)."""
        return tuple(tuple(cast("list[Any]", v)) if isinstance(v, list) else v for v in map(group.get, self._raw_keys))

    def _resync(self) -> None:
        """Rebuild the records from ``param_groups`` (changed without add_param_group, or unpickled)."""
        groups: list[_Group] = []
        records: dict[torch.Tensor, _Record] = {}
        taken: dict[torch.Tensor, tuple[int, int]] = {}
        for gi, group in enumerate(self.param_groups):
            if not _checks.is_dict(group) or "params" not in group:
                raise ValueError(f"param_groups[{gi}] is not a param group (a dict with 'params')")
            params, names = _split_names(group["params"])
            norm = dict(group)
            norm["params"] = params
            if names is not None:
                norm["param_names"] = names
            for name, default in self.defaults.items():
                norm.setdefault(name, default)
            info = self._build_group(norm, gi, taken, self._records)
            info.group = group
            groups.append(info)
            for j, r in enumerate(info.records):
                taken[r.param] = (gi, j)
                records[r.param] = r
        for dev in {r.dev for r in records.values()}:
            self._check_disjoint(dev, list(records.values()))
        for group, info in zip(self.param_groups, groups):
            group["params"] = info.params
            if "param_names" in info.group and info.group is not group:
                group["param_names"] = info.group["param_names"]
            for name, default in self.defaults.items():
                group.setdefault(name, default)
            info.raw = self._raw(group)
        self._groups, self._records = groups, records
        self._layouts = {dev: None for dev in {r.dev for r in records.values()}}

    # ---- stepping ------------------------------------------------------------------
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient (``closure``: re-evaluates the loss,
        as in torch.optim). Parameters whose ``.grad`` is None are left alone. A step that raises
        has changed nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    # torch.compiler.disable is not annotated
    @torch.compiler.disable(reason=COMPILE_MESSAGE)  # pyright: ignore[reportUntypedFunctionDecorator, reportUnknownMemberType]
    def _update(self) -> None:
        # numba's OpenMP threading layer and torch share libgomp in one process, and a numba
        # launch sets OpenMP's thread count: torch's intra-op thread count is put back after it
        # (else a 1-thread torch run continues with numba's count, oversubscribing the cores).
        threads = torch.get_num_threads()
        try:
            self._update_all()
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _update_all(self) -> None:
        try:
            batches = self._collect()
        except _Resync:
            self._resync()
            batches = self._collect()
        if not batches:
            return
        # The finiteness check is fused into the step where the backend offers <rule>_step_checked
        # (it returns False having written nothing); with several devices it runs first on all of them.
        function = self.rule.step_function
        fused = self._check_finite and len(batches) == 1 and hasattr(batches[0].backend, function + "_checked")
        # DTensor shards: the ranks agree on finiteness in the step's collective (S.step), never alone.
        # Groups without DTensors (every group, outside FSDP) cost no per-parameter look.
        sharded = any(g.sharded for g in self._groups) and any(
            S.is_sharded(r.param) for b in batches for r in b.records
        )
        calls = [self._prepare(b, separate_check=self._check_finite and not fused and not sharded) for b in batches]
        with deferred_interrupts():
            for b, (steps, kwargs) in zip(batches, calls):
                with self._device_context(b.dev):
                    if sharded:
                        S.step(self, b, steps, kwargs)
                    elif fused:
                        done = getattr(b.backend, function + "_checked")(
                            b.params, b.grads, *b.states, step=steps, **kwargs
                        )
                        if not done:
                            self._refuse_non_finite(b)
                    else:
                        getattr(b.backend, function)(b.params, b.grads, *b.states, step=steps, **kwargs)
                self._commit(b)

    def _collect(self) -> list[_Batch]:
        """Every parameter with a gradient, checked, with its views, grouped by device (nothing written)."""
        if len(self._groups) != len(self.param_groups):
            raise _Resync
        batches: dict[DeviceKey, _Batch] = {}
        state_get = self.state.get
        numpy_of = _tensor_numpy
        # The device and batch of the previous parameter (set at the first one: no device is _MISSING).
        dev: object = _MISSING
        b = cast(_Batch, None)
        for gi, group in enumerate(self.param_groups):
            info = self._groups[gi]
            params = group["params"] if info.group is group else None
            if params is None or len(params) != len(info.records):
                raise _Resync
            raw = self._raw(group)
            try:  # equal values of the same types (a Tensor lr equal to the old float is not the same)
                same = (
                    info.raw is not None and raw == info.raw and all(type(x) is type(y) for x, y in zip(raw, info.raw))
                )
            except Exception:  # e.g. a Tensor hyperparameter: validation says what is wrong
                same = False
            if not same:
                kernel_kw, flag = self._validate_group(group, info.dtypes, f"param_groups[{gi}]")
                if flag != info.flag:
                    raise ValueError(
                        f"param_groups[{gi}]: {self._flag_name} changed from {info.flag} to {flag}; "
                        "it decides the shape of the state, so it cannot change after the group is "
                        "added (add the tensors as a new group of a new optimizer)"
                    )
                info.kernel_kw, info.raw = kernel_kw, raw
            starts = {key: len(x.records) for key, x in batches.items()}
            for p, rec in zip(params, info.records):
                if p is not rec.param:
                    raise _Resync
                g = p.grad
                if g is None:
                    continue
                if rec.dev is not dev:
                    dev = rec.dev
                    b = batches.get(dev)
                    if b is None:
                        b = batches[dev] = _Batch(dev, self._backends[dev])
                if rec.fast:
                    try:
                        gv = numpy_of(g)
                    except Exception:
                        gv = None
                    # p itself: the same memory, still C-contiguous, so its view is still right (a new
                    # shape shows in the gradient's shape); anything else takes the detailed path.
                    if (
                        gv is None
                        or gv.shape != rec.shape
                        or gv.dtype is not rec.np_dtype
                        or not g.is_contiguous()
                        or p.data_ptr() != rec.ptr
                        or not p.is_contiguous()
                    ):
                        gv = self._grad_view(rec, p, g)
                else:
                    gv = self._grad_view(rec, p, g)
                st = state_get(p)
                if st is not rec.st or st is None:
                    if st:
                        self._adopt(rec, st)
                    else:
                        self._new_state(rec, b)
                        b.records.append(rec)
                        b.grads.append(gv)
                        b.steps.append(1)
                        continue
                # rec.st is set, so are its views (set together); no check in this per-parameter loop.
                b.records.append(rec)
                b.grads.append(gv)
                b.state_rows.append(rec.state_views)  # pyright: ignore[reportArgumentType]
                b.steps.append(int(rec.step_np) + 1)  # pyright: ignore[reportArgumentType]
            for key, x in batches.items():
                n = len(x.records) - starts.get(key, 0)
                if n:
                    x.runs.append((info, n))
        return list(batches.values())

    def _grad_view(self, rec: _Record, p: torch.Tensor, g: torch.Tensor) -> Any:
        """The gradient of ``p`` as an array laid out like ``rec.view``, or the error that says why not."""
        if (
            p.data_ptr() != rec.ptr
            or p.dtype != rec.tdtype
            or p.size() != rec.tshape
            or tuple(p.stride()) != rec.tstride
        ):
            raise ValueError(
                f"{rec.label} was replaced or changed since it was added to the optimizer (now "
                f"{p.dtype}, shape {tuple(p.shape)}, on {p.device}; it was {rec.tdtype}, shape "
                f"{tuple(rec.tshape)}): assigning p.data, model.to(...) or resize_() gives it other memory. "
                "Build the optimizer after moving or converting the model."
            )
        gt = T.grad_tensor(S.local(g), S.local(p), rec.label, rec.order)
        if rec.dev == "cpu":
            return gt.numpy()
        return gt  # CUDA: made a CuPy view on torch's stream in _prepare

    def _new_state(self, rec: _Record, batch: _Batch) -> None:
        """Allocate the zero state of ``rec`` (made visible in ``self.state`` by _commit, if the step runs)."""
        p = rec.param.detach()
        tensors: dict[str, torch.Tensor] = {}
        views: list[Any] = []
        for spec, key in zip(self.rule.state, self.state_keys):
            if spec.per_column and rec.flag:
                t = S.column_state(p)
                order = None
            else:
                t = torch.zeros_like(p, memory_format=torch.preserve_format)
                order = rec.order
            tensors[key] = t
            views.append(T.host_view(S.local(t), order) if rec.dev == "cpu" else (t, order))
        step_t = torch.zeros((), dtype=self._scalar_dtype)
        st = {"step": step_t, **tensors}
        batch.new.append((rec, st, views, step_t.numpy()))
        batch.state_rows.append(views)

    def _adopt(self, rec: _Record, st: object) -> None:
        """Use the state dict ``st`` found in ``self.state`` for ``rec`` (unpickled, or set by hand)."""
        where = f"state of {rec.label}"
        expected = {"step", *self.state_keys}
        if not _checks.is_dict(st) or set(st) != expected:
            got = sorted(st) if _checks.is_dict(st) else type(st).__name__
            raise ValueError(f"{where}: expected the entries {sorted(expected)}, got {got}")
        step = _checked_step(st["step"], where)
        views: list[Any] = []
        for spec, key in zip(self.rule.state, self.state_keys):
            shape = rec.state_shape(spec)
            t = _check_state_tensor(st[key], rec, shape, f"{where}[{key!r}]", second_moment=spec.second_moment)
            if t.device != rec.param.device:
                raise ValueError(f"{where}[{key!r}] is on {t.device}; the parameter is on {rec.param.device}")
            order = rec.order if t.size() == rec.tshape and not (spec.per_column and rec.flag) else None
            if (t.permute(order) if order is not None else t).is_contiguous() is False:
                raise ValueError(f"{where}[{key!r}] is not laid out like its parameter (strides {tuple(t.stride())})")
            views.append(T.host_view(S.local(t), order) if rec.dev == "cpu" else (t, order))
        step_t = st["step"]
        if not (
            isinstance(step_t, torch.Tensor)
            and step_t.device.type == "cpu"
            and step_t.dim() == 0
            and step_t.dtype == self._scalar_dtype
        ):
            step_t = st["step"] = torch.tensor(float(step), dtype=self._scalar_dtype)
        if rec.dev != "cpu":
            views = self._cupy_state(rec.dev, views)
        rec.st, rec.state_views, rec.step_np = st, tuple(views), step_t.numpy()
        self._layouts[rec.dev] = None

    def _cupy_state(self, dev: DeviceKey, pairs: Sequence[tuple[torch.Tensor, tuple[int, ...] | None]]) -> list[Any]:
        backend = self._backends[dev]
        with self._device_context(dev):
            return T.cupy_views(backend, [t for t, _ in pairs], lambda i: pairs[i][1])

    def _device_context(self, dev: DeviceKey) -> AbstractContextManager[object]:
        """CuPy on torch's current stream of the CUDA device ``dev`` (nothing for the CPU)."""
        if dev == "cpu":
            return nullcontext()
        cupy = self._backends[dev].array_module
        stack = ExitStack()
        stack.enter_context(cupy.cuda.Device(dev))
        stream = torch.cuda.current_stream(dev)
        stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, dev))
        return stack

    def _refuse_non_finite(self, b: _Batch) -> None:
        with self._device_context(b.dev):
            bad = [r.label for r, g in zip(b.records, b.grads) if not b.backend.all_finite([g])]
        raise FloatingPointError(
            f"non-finite values (NaN or Inf) in the gradient of {', '.join(bad)}; nothing was updated "
            "(check_finite=False skips this check; with torch.amp.GradScaler, scaler.step(opt) skips "
            "such steps by itself)"
        )

    def _prepare(self, b: _Batch, *, separate_check: bool) -> tuple[int | list[int], dict[str, Any]]:
        """Checks that read the gradients (overlap, finiteness) and the kernel arguments; writes nothing."""
        if b.dev != "cpu":
            with self._device_context(b.dev):
                b.grads = T.cupy_views(b.backend, list(b.grads), lambda i: None)
                for k, (rec, st, views, step_np) in enumerate(b.new):
                    b.new[k] = (rec, st, self._cupy_state(b.dev, views), step_np)
                new_views = {id(rec): views for rec, _, views, _ in b.new}
                # Every record has views: the new ones in b.new, the others their own.
                b.state_rows = cast(
                    "list[Sequence[Any]]", [new_views.get(id(rec), rec.state_views) for rec in b.records]
                )
        b.params = [r.view for r in b.records]
        b.states = [list(col) for col in zip(*b.state_rows)] if b.state_rows else [[] for _ in self.state_keys]
        layout = self._layouts.get(b.dev)
        if layout is None:
            recs = [r for r in self._records.values() if r.dev == b.dev]
            named = [(r.label, r.view) for r in recs]
            named += [
                (f"state of {r.label}[{k!r}]", a)
                for r in recs
                if r.state_views is not None
                for k, a in zip(self.state_keys, r.state_views)
            ]
            layout = self._layouts[b.dev] = Layout(named)
            layout.tagged_ranges = [(start, end, 0, name) for start, end, name in layout.ranges]
        _check_grad_overlap(layout, b)
        if separate_check:
            with self._device_context(b.dev):
                finite = b.backend.all_finite(b.grads)
            if not finite:
                self._refuse_non_finite(b)
        steps = b.steps
        step = steps[0] if min(steps) == max(steps) else list(steps)
        kwargs: dict[str, Any] = {}
        runs = b.runs
        for name in runs[0][0].kernel_kw:
            values = [info.kernel_kw[name] for info, _ in runs]
            if all(v == values[0] for v in values):
                kwargs[name] = values[0]
            else:
                kwargs[name] = [v for (_, n), v in zip(runs, values) for _ in range(n)]
        if self._flag_name is not None:
            kwargs[self._flag_name] = [r.flag for r in b.records]
        return step, kwargs

    def _commit(self, b: _Batch) -> None:
        """After the backend call: new state becomes visible, step counts advance."""
        for rec, st, views, step_np in b.new:
            self.state[rec.param] = st
            rec.st, rec.state_views, rec.step_np = st, tuple(views), step_np
        if b.new:
            self._layouts[b.dev] = None
        for rec, t in zip(b.records, b.steps):
            rec.step_np[()] = t  # pyright: ignore[reportOptionalSubscript]  # every record of the step has its state

    # ---- state ---------------------------------------------------------------------
    # torch's private decorator, as torch.optim.Optimizer.load_state_dict
    @torch._disable_dynamo  # pyright: ignore[reportPrivateUsage, reportPrivateImportUsage]
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of its torch.optim counterpart (same keys).

        Everything is checked before anything changes: the number of groups and of
        parameters per group, parameter names where both sides have them (a swap is
        refused), hyperparameters and options, every state entry's keys, shape, dtype,
        finiteness and sign (second moments are >= 0), and step counts. State is then
        copied into this optimizer's own tensors (their memory does not move)."""
        if not _checks.is_dict(state_dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if len(self._groups) != len(self.param_groups) or any(
            info.group is not g for info, g in zip(self._groups, self.param_groups)
        ):
            self._resync()
        if not _checks.is_dict(state_dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state dict (it needs 'state' and 'param_groups')")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if not _checks.is_sequence(saved_groups) or not _checks.is_dict(saved_state):
            raise ValueError("state dict: 'param_groups' must be a list and 'state' a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups; this optimizer has {len(self.param_groups)}"
            )
        id_map: dict[object, _Record] = {}
        new_groups: list[dict[str, Any]] = []
        for gi, (group, saved, info) in enumerate(zip(self.param_groups, saved_groups, self._groups)):
            where = f"param_groups[{gi}]"
            if not _checks.is_dict(saved) or not _checks.is_sequence(saved.get("params")):
                raise ValueError(f"state dict {where} is not a param group (a dict with a 'params' list)")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state dict {where} has {len(saved['params'])} parameters; this optimizer's has "
                    f"{len(group['params'])}"
                )
            ours, theirs = group.get("param_names"), saved.get("param_names")
            if ours is not None and theirs is not None:
                for i, (a, b) in enumerate(zip(ours, theirs)):
                    if a != b:
                        raise ValueError(
                            f"{where}['params'][{i}] is {a!r} here but {b!r} in the state dict "
                            "(parameters in another order?); nothing was loaded"
                        )
            for pid, rec in zip(saved["params"], info.records):
                # ids: ints (torch.optim), or parameter names (torch.distributed.checkpoint.state_dict)
                if isinstance(pid, bool) or not isinstance(pid, (numbers.Integral, str)) or pid in id_map:
                    raise ValueError(f"state dict {where} has an invalid or repeated parameter id {pid!r}")
                id_map[pid] = rec
            new = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            for name, opt in self.options.items():
                new.setdefault(name, opt.default)
            if self._flag_name is not None:
                new.setdefault(self._flag_name, False)
            _, flag = self._validate_group(new, info.dtypes, f"state dict {where}")
            if flag != info.flag:
                raise ValueError(
                    f"state dict {where} has {self._flag_name}={flag} but this optimizer's group has "
                    f"{self._flag_name}={info.flag}"
                )
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in new:
                new["param_names"] = group["param_names"]
            new_groups.append(new)
        incoming: dict[torch.Tensor, tuple[_Record, tuple[int, list[torch.Tensor]]]] = {}
        for pid, entry in saved_state.items():
            if _checks.is_dict(entry) and not entry:
                continue  # an empty entry (defaultdict access) is no state, as in torch.optim
            rec = id_map.get(pid)
            if rec is None:
                raise ValueError(
                    f"the state dict has state for parameter id {pid!r}, which none of its param_groups lists"
                )
            incoming[rec.param] = (rec, self._checked_entry(entry, rec, f"state[{pid!r}] ({rec.label})"))
        # Everything checked. Allocate what is missing, then copy in place.
        fresh: dict[torch.Tensor, tuple[_Record, dict[str, torch.Tensor], list[Any], npt.NDArray[Any]]] = {}
        for p, (rec, _) in incoming.items():
            if rec.st is None or self.state.get(p) is not rec.st:
                batch = _Batch(rec.dev, self._backends[rec.dev])
                self._new_state(rec, batch)
                fresh[p] = batch.new[0]
        with deferred_interrupts():
            for p, (rec, (step, tensors)) in incoming.items():
                if p in fresh:
                    _, st, views, step_np = fresh[p]
                    if rec.dev != "cpu":
                        views = self._cupy_state(rec.dev, views)
                    self.state[p] = st
                    rec.st, rec.state_views, rec.step_np = st, tuple(views), step_np
                    self._layouts[rec.dev] = None
                assert rec.st is not None and rec.step_np is not None  # allocated above if it was not
                for key, t in zip(self.state_keys, tensors):
                    rec.st[key].copy_(t)
                rec.step_np[()] = step
            for p in [p for p in self.state if p not in incoming]:  # torch: the loaded state replaces all
                del self.state[p]
                rec = self._records.get(p)
                if rec is not None:
                    rec.st = rec.state_views = rec.step_np = None
                    self._layouts[rec.dev] = None
            for gi, (new, info) in enumerate(zip(new_groups, self._groups)):
                self.param_groups[gi] = new
                info.group = new
                info.raw = None  # validated again at the next step
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checked_entry(self, entry: object, rec: _Record, where: str) -> tuple[int, list[torch.Tensor]]:
        expected = {"step", *self.state_keys}
        if not _checks.is_dict(entry) or set(entry) != expected:
            got = sorted(map(str, entry)) if _checks.is_dict(entry) else type(entry).__name__
            extra = (
                " (amsgrad state: AMSGrad is not supported)"
                if _checks.is_dict(entry) and "max_exp_avg_sq" in entry
                else ""
            )
            raise ValueError(f"{where}: expected the entries {sorted(expected)}, got {got}{extra}")
        step = _checked_step(entry["step"], where)
        tensors: list[torch.Tensor] = []
        for spec, key in zip(self.rule.state, self.state_keys):
            shape = rec.state_shape(spec)
            tensors.append(
                _check_state_tensor(entry[key], rec, shape, f"{where}[{key!r}]", second_moment=spec.second_moment)
            )
        return step, tensors

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_backend_name"] = self._backend_name
        state["_check_finite"] = self._check_finite
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        backend, check = state.pop("_backend_name", "auto"), state.pop("_check_finite", True)
        super().__setstate__(state)
        self._backend_name, self._check_finite = backend, check
        self._init_private()
        self._resync()

    def __repr__(self) -> str:
        text = super().__repr__()
        return text[:-1] + f"backends: {self.backends or self._backend_name}\n)"


def _check_grad_overlap(layout: Layout, b: _Batch) -> None:
    """No gradient may share memory with a parameter, optimizer state or another gradient
    (the kernels run in parallel and would race); names the two tensors. One sort of byte ranges."""
    grads = b.grads
    extra = [(ptr, ptr + g.nbytes, 1, i) for i, (ptr, g) in enumerate(zip(data_pointers(grads), grads)) if g.nbytes]
    ranges = sorted(layout.tagged_ranges + extra)
    for (_, e0, _, x), (s1, _, _, y) in zip(ranges, ranges[1:]):
        if s1 < e0:
            # A parameter's or state's range has its name (tag 0), a gradient's its index (tag 1).
            names = [
                x if isinstance(x, str) else f"the gradient of {b.records[x].label}",
                y if isinstance(y, str) else f"the gradient of {b.records[y].label}",
            ]
            names.sort(key=lambda name: name.startswith("the gradient"))
            raise MemoryOverlap(
                f"{names[0]} and {names[1]} share memory; a gradient must be its own tensor, not a "
                "view of a parameter, of optimizer state or of another gradient (the update runs in "
                "parallel and would race); nothing was updated"
            )


def _split_names(params: Any) -> tuple[list[Any], list[Any] | None]:
    """(list of tensors, list of names or None) from what add_param_group accepts."""
    if isinstance(params, torch.Tensor):
        return [params], None
    if isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering "
            "of tensors in sets will change between runs. Please use a list instead."
        )
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(
            f"params must be an iterable of Tensors (or of (name, Tensor) pairs), got {type(params).__name__}"
        )
    items = list(params)
    named = [isinstance(x, tuple) for x in items]
    if any(named) and not all(named):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    if items and all(named):
        if any(len(x) != 2 for x in items):
            raise ValueError("named parameters must be (name, Tensor) pairs")
        return [x[1] for x in items], [x[0] for x in items]
    return items, None


def _checked_step(value: object, where: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{where}['step'] must be one real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}['step'] must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{where}['step'] must be a non-negative whole number, got {value}")
    return int(value)


def _check_state_tensor(
    t: object, rec: _Record, shape: Sequence[int], where: str, *, second_moment: bool
) -> torch.Tensor:
    """``t``, if it can be the state entry ``where`` of ``rec``'s parameter; else a ValueError that says why."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where} must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{where} has layout {t.layout}; expected a dense tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where} has shape {tuple(t.shape)}; the parameter needs {tuple(shape)}")
    if t.dtype != rec.tdtype:
        raise ValueError(f"{where} has dtype {t.dtype}; the parameter is {rec.tdtype}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where} holds NaN or Inf; a moment estimate is always finite")
    if second_moment and t.numel() and bool((t < 0).any()):
        raise ValueError(f"{where} has negative entries; it is an average of squares (>= 0)")
    return t


# ---- one class per rule --------------------------------------------------------------
def optimizer_class(rule: Rule) -> type[Optimizer]:
    """The torch.optim.Optimizer subclass of ``rule``, called as::

        Cls(params, <hyperparameters with fisheropt's defaults>, [amsgrad=False], *, [<tensor flag>=False],
            <torch options: maximize, foreach, capturable, differentiable, fused, ...>,
            backend="auto", check_finite=True)

    (``[...]``: only where the rule or its torch counterpart has that argument.)
    """
    counterpart = COUNTERPARTS.get(rule.name)
    options = dict(COMMON_OPTIONS)
    if counterpart is not None:
        options.update(counterpart.options)
    keys = STATE_KEYS.get(rule.name, {})
    state_keys = tuple(keys.get(s.name, s.name) for s in rule.state)
    if len(set(state_keys)) != len(state_keys) or "step" in state_keys:
        raise ValueError(f"{rule.title}: state keys {state_keys} collide")

    P = inspect.Parameter
    middle = [
        P(n, P.POSITIONAL_OR_KEYWORD, default=o.default) for n, o in options.items() if o.positional and o.in_signature
    ]
    if rule.tensor_flag is not None:
        middle.append(P(rule.tensor_flag.name, P.KEYWORD_ONLY, default=False))
    middle += [
        P(n, P.KEYWORD_ONLY, default=o.default) for n, o in options.items() if not o.positional and o.in_signature
    ]
    signature = constructor_signature(rule, middle)

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        params, defaults, backend, check_finite = bind_constructor(signature, self, args, kwargs)
        for name, opt in options.items():
            defaults.setdefault(name, opt.default)
        Optimizer.__init__(self, params, defaults, backend=backend, check_finite=check_finite)

    __init__.__signature__ = signature
    namespace = {
        "rule": rule,
        "options": options,
        "state_keys": state_keys,
        "counterpart": counterpart,
        "__init__": __init__,
        "__doc__": _docstring(rule, counterpart, state_keys),
        "__module__": "fisheropt.torch",
        "__qualname__": rule.title,
    }
    return cast("type[Optimizer]", type(rule.title, (Optimizer,), namespace))


def _docstring(rule: Rule, counterpart: TorchCounterpart | None, state_keys: Sequence[str]) -> str:
    lines = [
        f"{rule.summary} ({rule.paper}), as a torch.optim.Optimizer. Spec: spec/{rule.spec_page}.",
        "",
        f"Same update as fisheropt.{rule.title} (same kernels); torch semantics: param groups, per-parameter",
        "state and step counts, parameters without .grad skipped, state_dict of tensors.",
        "",
        "Hyperparameters (per param group):",
        "",
    ]
    lines += [f"* ``{h.name}`` = ``{h.default!r}``: {h.doc}" for h in rule.hyperparams]
    if rule.tensor_flag is not None:
        lines += [
            f"* ``{rule.tensor_flag.name}`` = ``False``: per param group, {rule.tensor_flag.doc}",
            "  (``fisheropt.torch.coupled_param_groups(model)`` builds the groups)",
        ]
    lines += [
        "",
        "State per parameter (state[p]): step (0-d tensor), "
        + ", ".join(f"{k} ({s.doc})" for k, s in zip(state_keys, rule.state)),
        "",
    ]
    if counterpart is not None:
        lines += [f"Checkpoints are interchangeable with torch.optim.{counterpart.name} (same keys).", ""]
    lines += [
        "torch options: maximize, capturable, differentiable must stay off (an error otherwise);",
        "foreach and fused are accepted and change nothing (the step is always one fused call per device).",
        "backend: 'auto' (CPU: numba when installed, else numpy; CUDA: cupy) or a backend name;",
        "check_finite: refuse a step whose gradients hold NaN or Inf.",
        "opt.step() runs outside torch.compile (a graph break; compile the model, not the step).",
    ]
    return "\n".join(lines)


if TYPE_CHECKING:

    class RuleOptimizer(Optimizer):
        """For type checkers only: a class of :data:`CLASSES`, whose signature is made from its rule
        at import (:func:`optimizer_class`)."""

        def __init__(self, params: ParamsT, *args: Any, **kwargs: Any) -> None: ...


#: Rule name -> torch optimizer class, one per rule of the registry.
CLASSES = cast("dict[str, type[RuleOptimizer]]", {name: optimizer_class(rule) for name, rule in RULES.items()})
