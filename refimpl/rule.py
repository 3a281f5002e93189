"""The descriptor of an update rule: the one place for its name, hyperparameters, state and cost.

Each ``refimpl/<rule>.py`` exports ``RULE``, a :class:`Rule`. Everything that
needs to know the rules (the optimizer classes and their validation, the
framework adapters, state dicts, the spec vectors, the benchmarks, the tests)
reads :data:`fisheropt.refimpl.RULES`, which collects them; nothing else lists
the rules. Adding a rule is one reference file (plus its spec page, vectors and
a kernel module per fused backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ._multi_tensor import rule_step


@dataclass(frozen=True)
class Hyperparam:
    """A scalar hyperparameter, or a pair such as ``betas`` (``names`` gives the kernel names).

    Valid values are finite reals in [low, high] (an end is excluded where ``*_open``);
    ``normal``: must also stay a positive normal number in the parameter dtype, because
    the kernels divide by it (an eps that is 0 in float32 turns 0/0 into NaN)."""

    name: str
    default: float | tuple[float, ...]
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    normal: bool = False
    names: tuple[str, ...] = ()  # kernel keyword names of a pair's elements, e.g. ("beta1", "beta2")
    # The range where values are usually set (log-uniform for positive ranges), which the
    # property tests and benchmarks sample; None: [low, high].
    typical: tuple[float, float] | None = None

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return self.names or (self.name,)


@dataclass(frozen=True)
class StateArray:
    """One state array per parameter.

    ``per_column``: for a tensor flagged by the rule's tensor flag (Coupled Adam's
    ``coupled``) the array has one entry per column, shape (d,), instead of the
    parameter's shape. ``second_moment``: an average of squares, never negative.
    ``reduced``: its new value depends on a float64 reduction over the whole tensor
    (an RMS, a column mean), which the spec lets an implementation sum in any order:
    fused backends agree with the reference within the spec's tolerance there, and
    bit for bit on the arrays that are purely elementwise."""

    name: str
    doc: str
    second_moment: bool = False
    per_column: bool = False
    reduced: bool = False


@dataclass(frozen=True)
class TensorFlag:
    """A per-tensor boolean option (one per parameter); ``True`` requires a V×d matrix, V ≥ 1."""

    name: str
    doc: str


@dataclass(frozen=True)
class Rule:
    """An update rule, as the reference defines it and as every backend and adapter uses it."""

    title: str  # class name: "FAdam"
    summary: str  # one line, for tables and docstrings
    paper: str
    update: Callable[..., Any]  # pure single-tensor update: (theta, g, *state, t, **kernel hp) -> new arrays
    state: tuple[StateArray, ...]
    hyperparams: tuple[Hyperparam, ...]
    # Host-side scalar coefficients of step t (float64): coefficients(t, **kernel hp) -> dict.
    # Every backend rounds these to the parameter dtype instead of recomputing them.
    coefficients: Callable[..., dict[str, float]]
    # Bytes moved per element by the fused backends' schedule, in units of the itemsize.
    items_per_element: int
    tensor_flag: TensorFlag | None = None
    # Items per element for a tensor whose flag is False (Coupled Adam's AdamW tensors).
    items_per_element_unflagged: int | None = None
    # The update of a tensor whose flag is False (Coupled Adam's AdamW tensors).
    update_unflagged: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict[str, Any])
    # Module, suite and kernel-function stem ("fadam" -> fadam_step): by default the name of the
    # module that defines ``update``, refimpl/<name>.py, so it is written in one place.
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.update.__module__.rpartition(".")[2])

    @cached_property
    def step(self) -> Callable[..., Any]:
        """The reference multi-tensor in-place step, ``<name>_step`` (the backend interface)."""
        return rule_step(self)

    @property
    def reduces(self) -> bool:
        """Whether any state (hence θ) depends on a whole-tensor reduction."""
        return any(s.reduced for s in self.state)

    @property
    def step_function(self) -> str:
        return f"{self.name}_step"

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.state)

    @property
    def spec_page(self) -> str:
        return f"{self.name}.md"

    def defaults(self) -> dict[str, float | tuple[float, ...]]:
        return {h.name: h.default for h in self.hyperparams}

    def kernel_kwargs(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        """Hyperparameters as the step functions take them (pairs split: betas -> beta1, beta2)."""
        out: dict[str, Any] = {}
        for h in self.hyperparams:
            value = hyperparams[h.name]
            if h.names:
                out.update(zip(h.names, value))
            else:
                out[h.name] = value
        return out


# ---- shared pieces of the Adam family ----------------------------------------------------------
def lr_param(default: float, typical=(1e-6, 1.0)) -> Hyperparam:
    return Hyperparam("lr", default, "learning rate α", low=0.0, typical=typical)


def betas_param(default: tuple) -> Hyperparam:
    return Hyperparam(
        "betas",
        default,
        "EMA factors (β1, β2), each in [0, 1)",
        low=0.0,
        high=1.0,
        high_open=True,
        names=("beta1", "beta2"),
        typical=(0.0, 0.9999),
    )


def eps_param(default: float) -> Hyperparam:
    return Hyperparam(
        "eps", default, "ε added to the denominator", low=0.0, low_open=True, normal=True, typical=(1e-12, 1e-2)
    )


def weight_decay_param(default: float, doc: str) -> Hyperparam:
    return Hyperparam("weight_decay", default, doc, low=0.0, typical=(1e-5, 0.5))


def adam_coefficients(t, *, lr, beta1, beta2, **_):
    r"""step size α/(1-β1^t) and \sqrt{1-β2^t}, in float64 (the order torch evaluates them)."""
    return {"step_size": lr / (1 - beta1**t), "bias_correction2_sqrt": math.sqrt(1 - beta2**t)}


FIRST_MOMENT = StateArray("m", "first moment (EMA of g)")
SECOND_MOMENT = StateArray("v", "second moment (EMA of g²)", second_moment=True)
DECOUPLED_DECAY = weight_decay_param(1e-2, "decoupled decay λ: θ ← θ(1 − αλ)")  # AdamW's, Coupled Adam's


def adam_hyperparams(*rest: Hyperparam) -> tuple[Hyperparam, ...]:
    """Adam's lr = 1e-3, betas = (0.9, 0.999), eps = 1e-8, then the rule's own ``rest``, in kernel order."""
    return (lr_param(1e-3), betas_param((0.9, 0.999)), eps_param(1e-8), *rest)
