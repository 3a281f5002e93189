"""Optimizer classes: validation, state and backend dispatch around the step kernels.

The math lives in fisheropt.refimpl (and, fused, in each backend); a class here
only (1) checks every input before anything is written, (2) owns the state
arrays, (3) calls its backend's multi-tensor step once per step, and
(4) saves and restores its state exactly.

There is one class per rule of the registry (:data:`fisheropt.refimpl.RULES`),
made by :func:`optimizer_class` from the rule's descriptor: its signature,
defaults, valid ranges, state and docstring all come from there.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import _checks
from . import backends as _backends
from ._atomic import deferred_interrupts
from ._memory import Layout
from ._types import FloatArray, Hyperparameter, missing_attribute
from .refimpl import RULES
from .refimpl.rule import Rule

STATE_FORMAT = "fisheropt.optimizer_state"
STATE_VERSION = 1


class Optimizer:
    """The optimizer of one update rule (``rule``, a :class:`~fisheropt.refimpl.rule.Rule`).

    Guarantees (README, "Guarantees"): a call that raises has changed nothing; a
    step is all or nothing (every check and allocation precedes the first write,
    ``_apply`` is one backend call, and Ctrl-C is deferred until it returns)."""

    rule: Rule

    def __init__(
        self,
        params: Iterable[FloatArray],
        hyperparams: Mapping[str, Any],
        *,
        flags: Iterable[bool] | None = None,
        backend: str = "auto",
        check_finite: bool = True,
    ) -> None:
        self.params = _checks.check_params(params)
        self.flags = self._checked_flags(flags)
        if self.rule.tensor_flag is not None:
            setattr(self, self.rule.tensor_flag.name, self.flags)  # e.g. opt.coupled
        self.backend = _backends.select(backend, self.params, function=self.rule.step_function)
        self.xp = self.backend.array_module
        self._dtypes: tuple[np.dtype[Any], ...] = tuple({p.dtype: None for p in self.params})
        self._hyperparams = self._checked(dict(hyperparams))
        self.check_finite = check_finite
        self.step_count = 0
        # Read-only mapping of tuples: the arrays the layout recorded are the ones stepped.
        self.state: Mapping[str, tuple[FloatArray, ...]] = types.MappingProxyType(
            {name: tuple(self._new_state(name, i, p) for i, p in enumerate(self.params)) for name in self.state_names}
        )
        self._layout = Layout(
            [(f"params[{i}]", p) for i, p in enumerate(self.params)]
            + [(f"state[{name!r}][{i}]", a) for name, arrays in self.state.items() for i, a in enumerate(arrays)]
        )

    check_finite = _checks.bool_property(
        "check_finite", "Refuse a step whose gradients hold NaN or Inf (one read of the gradients)."
    )

    # ---- hyperparameters -------------------------------------------------
    @property
    def hyperparams(self) -> dict[str, Hyperparameter]:
        """A copy; change values with :meth:`set_hyperparams` (validated)."""
        return dict(self._hyperparams)

    def set_hyperparams(self, **changes: Any) -> None:
        """Change hyperparameters (e.g. a learning-rate schedule); all or nothing."""
        unknown = set(changes) - set(self._hyperparams)
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) for {type(self).__name__}: {', '.join(sorted(unknown))}")
        self._hyperparams = self._checked({**self._hyperparams, **changes})

    @property
    def state_names(self) -> tuple[str, ...]:
        """The names of the rule's state arrays (one array of each per parameter), e.g. ("m", "v")."""
        return self.rule.state_names

    def _checked(self, hp: Mapping[str, Any]) -> dict[str, Hyperparameter]:
        return check_hyperparams(self.rule, hp, self._dtypes)

    def _checked_flags(self, flags: Iterable[bool] | None) -> tuple[bool, ...] | None:
        return check_tensor_flags(self.rule, flags, self.params)

    @property
    def lr(self) -> float:
        """The learning rate; setting it (a schedule) is checked like every hyperparameter."""
        return cast(float, self._hyperparams["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self.set_hyperparams(lr=value)

    # ---- stepping ---------------------------------------------------------
    def step(self, grads: Sequence[FloatArray]) -> None:
        """Apply one update with ``grads`` (aligned with params). Rejected input changes nothing."""
        grads = self.checked_grads(grads)
        # A backend may fuse the finiteness check into the step's own first pass
        # (<rule>_step_checked, which returns False having written nothing); else it is a pass of its own.
        fused = self.check_finite and hasattr(self.backend, self.rule.step_function + "_checked")
        if self.check_finite and not fused and not self.backend.all_finite(grads):
            self._refuse_non_finite(grads)
        with deferred_interrupts():
            if not self._apply(grads, self.step_count + 1, checked=fused):
                self._refuse_non_finite(grads)
            self.step_count += 1

    def checked_grads(self, grads: Sequence[FloatArray]) -> list[FloatArray]:
        """The checks a step makes before reading any element: gradients aligned with the
        parameters, nothing reshaped, moved or made read-only since construction, and no
        gradient that aliases a parameter, the state or another gradient. O(number of
        tensors); ``fisheropt bench --validation-cost`` measures it."""
        grads = _checks.check_grads(grads, self.params)
        self._layout.verify()
        self._layout.check_grads(grads)
        return grads

    def _refuse_non_finite(self, grads: Sequence[FloatArray]) -> None:
        bad = [i for i, g in enumerate(grads) if not self.backend.all_finite([g])]
        raise FloatingPointError(
            f"non-finite values (NaN or Inf) in grads{bad}; nothing was updated "
            "(pass check_finite=False to skip this check)"
        )

    # ---- state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A deep copy of everything needed to resume: step, hyperparameters, state arrays."""
        state = {name: [a.copy() for a in arrays] for name, arrays in self.state.items()}
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "hyperparams": self.hyperparams,
            "state": state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly; checked in full before anything changes."""
        sd = state_dict
        if not _checks.is_dict(sd) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not a fisheropt optimizer state dict")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"state dict version {sd.get('version')!r} is not supported (expected {STATE_VERSION})")
        if sd.get("optimizer") != type(self).__name__:
            raise ValueError(f"state dict is for {sd.get('optimizer')}, not {type(self).__name__}")
        step = sd.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state dict step must be a non-negative int, got {step!r}")
        hyperparams = sd.get("hyperparams")
        if not _checks.is_dict(hyperparams) or set(hyperparams) != set(self._hyperparams):
            raise ValueError("state dict hyperparameters do not match this optimizer's")
        hyperparams = self._checked(dict(hyperparams))
        state = sd.get("state")
        if not _checks.is_dict(state) or set(state) != set(self.state_names):
            raise ValueError(f"state dict state must have exactly the entries {self.state_names}")
        self._layout.verify()
        incoming = {name: self._checked_state(name, state[name]) for name in self.state_names}
        # Everything checked: now copy in place (backends hold pointers to these arrays).
        with deferred_interrupts():
            for name, arrays in incoming.items():
                for own, new in zip(self.state[name], arrays):
                    own[...] = new
            self.step_count = step
            self._hyperparams = hyperparams

    def _checked_state(self, name: str, arrays: Any) -> list[FloatArray]:
        if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__len__"):
            raise ValueError(f"state[{name!r}] must be a list of arrays")
        arrays = list(arrays)
        if len(arrays) != len(self.params):
            raise ValueError(f"state[{name!r}] has {len(arrays)} arrays for {len(self.params)} params")
        converted: list[FloatArray] = []
        for i, (new, own) in enumerate(zip(arrays, self.state[name])):
            what = f"state[{name!r}][{i}]"
            if not hasattr(new, "dtype") or getattr(new.dtype, "kind", None) != "f":
                raise ValueError(
                    f"{what} must be a float array, got {type(new).__name__}"
                    f"{' of dtype ' + str(new.dtype) if hasattr(new, 'dtype') else ''}"
                )
            new = self.xp.asarray(new)
            if new.shape != own.shape or new.dtype != own.dtype:
                raise ValueError(
                    f"{what} has shape {tuple(new.shape)} and dtype {new.dtype}; "
                    f"expected {tuple(own.shape)} and {own.dtype}"
                )
            if not self.backend.all_finite([new]):
                raise ValueError(f"{what} holds NaN or Inf; a moment estimate is always finite")
            if name in self._second_moments and new.size and bool((new < 0).any()):
                raise ValueError(f"{what} has negative entries; it is an average of squares (>= 0)")
            converted.append(new)
        return converted

    @property
    def _second_moments(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.rule.state if s.second_moment)

    def _new_state(self, name: str, index: int, param: FloatArray) -> FloatArray:
        spec = next(s for s in self.rule.state if s.name == name)
        if spec.per_column and self.flags is not None and self.flags[index]:
            return self.xp.zeros(param.shape[1], dtype=param.dtype)
        return self.xp.zeros_like(param)

    def _apply(self, grads: Sequence[FloatArray], step: int, *, checked: bool = False) -> bool:
        """Exactly one backend call: it raises (or, ``checked``, returns False) before writing
        anything, or completes and returns True."""
        flag = self.rule.tensor_flag
        extra = {flag.name: self.flags} if flag is not None else {}
        function = self.rule.step_function + ("_checked" if checked else "")
        done = getattr(self.backend, function)(
            self.params,
            grads,
            *(self.state[name] for name in self.state_names),
            step=step,
            **self.rule.kernel_kwargs(self._hyperparams),
            **extra,
        )
        return done if checked else True

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hyperparams.items())
        return f"{type(self).__name__}({len(self.params)} tensors, {hp}, backend={self.backend.NAME!r})"


def check_hyperparams(rule: Rule, hp: Mapping[str, Any], dtypes: Iterable[np.dtype[Any]]) -> dict[str, Hyperparameter]:
    """Every hyperparameter of ``rule``, validated against its descriptor (ranges, pairs,
    finite and, where the kernels divide by it, normal in each parameter dtype)."""
    missing = [h.name for h in rule.hyperparams if h.name not in hp]
    if missing:
        raise TypeError(f"{rule.title}: missing hyperparameter(s) {', '.join(missing)}")
    out: dict[str, Hyperparameter] = {}
    for h in rule.hyperparams:
        value = hp[h.name]
        if h.names:
            if not _checks.is_sequence(value) or len(value) != len(h.names):
                raise ValueError(f"{h.name} must be a pair ({', '.join(h.names)}), got {value!r}")
            out[h.name] = tuple(
                _checks.check_real(
                    f"{h.name}[{i}]", x, low=h.low, high=h.high, low_open=h.low_open, high_open=h.high_open
                )
                for i, x in enumerate(value)
            )
        else:
            out[h.name] = _checks.check_real(
                h.name, value, low=h.low, high=h.high, low_open=h.low_open, high_open=h.high_open
            )
    _checks.check_representable(out, dtypes, normal=tuple(h.name for h in rule.hyperparams if h.normal))
    return out


def check_tensor_flags(rule: Rule, flags: Iterable[bool] | None, params: Sequence[Any]) -> tuple[bool, ...] | None:
    """The rule's per-tensor flags (Coupled Adam's ``coupled``), one bool per parameter; None if it has none."""
    flag = rule.tensor_flag
    if flag is None:
        return None
    name = flag.name
    if flags is None:
        raise ValueError(f"{name} is required: one bool per parameter ({flag.doc})")
    if isinstance(flags, (str, bytes)) or not hasattr(flags, "__iter__"):
        raise TypeError(f"{name} must be a sequence of bools, one per parameter, got {type(flags).__name__}")
    given = list(flags)
    if len(given) != len(params):
        raise ValueError(f"{name} has {len(given)} entries for {len(params)} params")
    checked = tuple(_checks.check_bool(f"{name}[{i}]", c) for i, c in enumerate(given))
    for i, (c, p) in enumerate(zip(checked, params)):
        if c and (p.ndim != 2 or p.shape[0] == 0):
            raise ValueError(
                f"{name}[{i}] is True but params[{i}] has shape {tuple(p.shape)}; "
                f"a {name} tensor must be 2-D (V×d, rows = vocabulary) with V ≥ 1"
            )
    return checked


def constructor_signature(rule: Rule, middle: Sequence[inspect.Parameter] = ()) -> inspect.Signature:
    """The signature of the constructor of a class of ``rule`` (of fisheropt or fisheropt.torch):
    ``(self, params, <hyperparameters with defaults>, *middle, *, backend="auto", check_finite=True)``."""
    P = inspect.Parameter
    parameters = [P("self", P.POSITIONAL_ONLY), P("params", P.POSITIONAL_OR_KEYWORD)]
    parameters += [P(h.name, P.POSITIONAL_OR_KEYWORD, default=h.default) for h in rule.hyperparams]
    parameters += [
        *middle,
        P("backend", P.KEYWORD_ONLY, default="auto"),
        P("check_finite", P.KEYWORD_ONLY, default=True),
    ]
    return inspect.Signature(parameters)


def bind_constructor(
    signature: inspect.Signature, self: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any], Any, Any]:
    """(params, the other arguments by name, backend, check_finite) of a constructor call, bound to
    ``signature`` (:func:`constructor_signature`) with the defaults applied."""
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["self"]
    params, backend, check_finite = arguments.pop("params"), arguments.pop("backend"), arguments.pop("check_finite")
    return params, arguments, backend, check_finite


def optimizer_class(rule: Rule) -> type[Optimizer]:
    """The :class:`Optimizer` subclass of ``rule``, with an explicit signature from its descriptor:
    ``Cls(params, <hyperparameters with defaults>, [<tensor flag>], *, backend="auto", check_finite=True)``."""
    flag = rule.tensor_flag
    P = inspect.Parameter
    signature = constructor_signature(
        rule, [] if flag is None else [P(flag.name, P.POSITIONAL_OR_KEYWORD, default=None)]
    )

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        params, arguments, backend, check_finite = bind_constructor(signature, self, args, kwargs)
        flags = arguments.pop(flag.name) if flag is not None else None
        Optimizer.__init__(self, params, arguments, flags=flags, backend=backend, check_finite=check_finite)

    __init__.__signature__ = signature
    made = type(
        rule.title,
        (Optimizer,),
        {
            "rule": rule,
            "__init__": __init__,
            "__doc__": _docstring(rule),
            "__module__": __name__,
            "__qualname__": rule.title,
        },
    )
    return cast("type[Optimizer]", made)


def _docstring(rule: Rule) -> str:
    lines = [f"{rule.summary} ({rule.paper}). Spec: spec/{rule.spec_page}.", "", "Hyperparameters:", ""]
    lines += [f"* ``{h.name}`` = ``{h.default!r}``: {h.doc}" for h in rule.hyperparams]
    if rule.tensor_flag is not None:
        lines += [f"* ``{rule.tensor_flag.name}``: one bool per parameter, {rule.tensor_flag.doc}"]
    lines += ["", "State (one array per parameter):", ""]
    lines += [f"* ``{s.name}``: {s.doc}" for s in rule.state]
    lines += [
        "",
        '``backend``: ``"auto"`` (cupy for CuPy arrays, else numba, else numpy) or a backend name;',
        "``check_finite``: refuse a step whose gradients hold NaN or Inf.",
    ]
    return "\n".join(lines)


if TYPE_CHECKING:

    class RuleOptimizer(Optimizer):
        """For type checkers only: a class of :data:`CLASSES`, whose signature is made from its rule
        at import: ``(params, <hyperparameters>, [<tensor flag>], *, backend, check_finite)``."""

        def __init__(self, params: Iterable[FloatArray], *args: Any, **kwargs: Any) -> None: ...


#: Rule name -> optimizer class, one per rule of the registry.
CLASSES = cast("dict[str, type[RuleOptimizer]]", {name: optimizer_class(rule) for name, rule in RULES.items()})
globals().update({cls.__name__: cls for cls in CLASSES.values()})
__getattr__: Callable[[str], type[RuleOptimizer]] = missing_attribute(__name__)  # types the classes
__all__ = ["Optimizer", "optimizer_class", "check_hyperparams", "check_tensor_flags", "CLASSES", "STATE_FORMAT"]
# The classes' names come from the registry at import, so a type checker cannot list them.
__all__ += [c.__name__ for c in CLASSES.values()]  # pyright: ignore[reportUnsupportedDunderAll]
