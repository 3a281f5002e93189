r"""Every update rule of the registry as an optax ``GradientTransformation``.

The registry (:data:`fisheropt.refimpl.RULES`) gives each rule's name, hyperparameters
(names, defaults, valid ranges), state arrays and tensor flag; this module gives only the
JAX math of each rule (:data:`MATH`, one entry per rule, written in the order of
operations of its spec page) and builds from the two:

* ``<rule.name>(learning_rate=..., <hyperparameters>, [<tensor flag>], *, state_dtype=None)``:
  the whole rule (``adam``, ``adamw``, ``fadam``, ``coupled_adam``, ``lion`` once the
  registry has it). ``apply_updates(params, updates)`` gives the reference's parameters.
* building blocks without the learning rate, the optax way (``scale_by_adam``,
  ``scale_by_coupled_adam``, ``scale_by_fadam``, ``scale_by_lion``), which chain with
  ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``: see :data:`FACTORISATIONS`.

Conventions (spec/conventions.md): optax's ``count`` is the number of updates applied, the
spec's step is t = count + 1; a schedule is called with ``count`` (optax's convention), so
step t uses ``learning_rate(t - 1)``. Scalars and reductions: ``fisheropt/optax/_numerics.py``.

Parameters of any float dtype: the state (and the arithmetic) is in the parameter dtype for
float32/float64 parameters and in float32 for others (bfloat16, float16), or in
``state_dtype`` when given; the new parameters are rounded to the parameter dtype.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from fisheropt.optim import check_hyperparams, check_tensor_flags
from fisheropt.refimpl import RULES
from fisheropt.refimpl.rule import Hyperparam, Rule

from .._types import PyTree
from . import _numerics as nu
from ._numerics import Numbers, Scalar

__all__ = [
    "MATH",
    "FACTORISATIONS",
    "BLOCKS",
    "rule_transform",
    "transformation",
    "block",
    "state_class",
    "compute_dtype",
    "MissingRule",
]


class MissingRule(AttributeError):
    """A transformation whose rule is not in this installation's registry."""


# ---- the math of each rule (per tensor, in the compute dtype) --------------------------------
# A leaf function gets theta (None when the rule does not need it), g and the state arrays,
# all in the compute dtype dt, the step's scalars rounded to dt (``sc``), the hyperparameters
# (Python floats, rounded here with _c as the reference rounds them), the tensor flag, and N
# (the scalar arithmetic, for reductions). It returns (form, value, new_state):
#   form "delta": theta_new = theta - value (exactly: the update is -value);
#   form "theta": value is theta_new itself.
#: A tensor flag (Coupled Adam's ``coupled``): a pytree of bools like the params, or a function
#: params -> such a pytree.
Flags = PyTree | Callable[[PyTree], PyTree]
#: The kernel hyperparameters of a rule (Python floats), as Rule.kernel_kwargs gives them.
KernelHP = Mapping[str, float]
#: The step's scalars rounded to the compute dtype, by name.
StepScalars = Mapping[str, jax.Array]
Arrays = Sequence[Array]
#: (form, value, new state) of a leaf function, see above.
LeafResult = tuple[str, jax.Array, tuple[jax.Array, ...]]


def _c(x: ArrayLike, dt: DTypeLike) -> jax.Array:
    return jnp.asarray(x, dt)


def _adam_scalars(N: Numbers, count: jax.Array, lr: ArrayLike, hp: KernelHP) -> dict[str, Scalar]:
    """α/(1−β₁ᵗ), √(1−β₂ᵗ) (refimpl.rule.adam_coefficients), and AdamW's 1 − αλ."""
    t = count + 1
    lr_n = N.of(lr)
    out: dict[str, Scalar] = {
        "step_size": lr_n / N.one_minus_pow(hp["beta1"], t),
        "bias_correction2_sqrt": N.one_minus_pow(hp["beta2"], t).sqrt(),
    }
    wd = hp.get("weight_decay", 0.0)
    # host float64 when α is a constant (exactly the reference's 1 - lr*weight_decay)
    out["decay"] = N.const(1.0 - lr * wd) if isinstance(lr, float) else 1.0 - lr_n * N.const(wd)
    return out


def _adam_direction(m: jax.Array, v: jax.Array, sc: StepScalars, hp: KernelHP, dt: DTypeLike) -> jax.Array:
    denom = jnp.sqrt(v) / sc["bias_correction2_sqrt"] + _c(hp["eps"], dt)
    return sc["step_size"] * (m / denom)


def _moments(g: jax.Array, m: jax.Array, v: jax.Array, hp: KernelHP, dt: DTypeLike) -> tuple[jax.Array, jax.Array]:
    m = _c(hp["beta1"], dt) * m + _c(1 - hp["beta1"], dt) * g
    v = _c(hp["beta2"], dt) * v + _c(1 - hp["beta2"], dt) * (g * g)
    return m, v


def _adam_leaf(
    theta: Any, g: Array, state: Arrays, sc: StepScalars, hp: KernelHP, dt: DTypeLike, flagged: bool, N: Numbers
) -> LeafResult:
    m, v = state
    if hp["weight_decay"] != 0:
        g = g + _c(hp["weight_decay"], dt) * theta
    m, v = _moments(g, m, v, hp, dt)
    return "delta", _adam_direction(m, v, sc, hp, dt), (m, v)


def _adamw_leaf(
    theta: Any, g: Array, state: Arrays, sc: StepScalars, hp: KernelHP, dt: DTypeLike, flagged: bool, N: Numbers
) -> LeafResult:
    m, v = state
    m, v = _moments(g, m, v, hp, dt)
    step = _adam_direction(m, v, sc, hp, dt)
    if hp["weight_decay"] == 0:
        return "delta", step, (m, v)
    return "theta", theta * sc["decay"] - step, (m, v)


def _coupled_adam_leaf(
    theta: Any, g: Array, state: Arrays, sc: StepScalars, hp: KernelHP, dt: DTypeLike, flagged: bool, N: Numbers
) -> LeafResult:
    if not flagged:
        return _adamw_leaf(theta, g, state, sc, hp, dt, flagged, N)
    m, v_col = state
    m = _c(hp["beta1"], dt) * m + _c(1 - hp["beta1"], dt) * g
    v_col = _c(hp["beta2"], dt) * v_col + _c(1 - hp["beta2"], dt) * nu.column_mean_of_squares(g, dt, N)
    step = _adam_direction(m, v_col, sc, hp, dt)  # (d,) broadcasts over the V rows
    if hp["weight_decay"] == 0:
        return "delta", step, (m, v_col)
    return "theta", theta * sc["decay"] - step, (m, v_col)


def _fadam_scalars(N: Numbers, count: jax.Array, lr: ArrayLike, hp: KernelHP) -> dict[str, Scalar]:
    r"""β̂₂ = β₂(1−β₂^{t−1})/(1−β₂ᵗ) and 1 − β̂₂ (refimpl.fadam.debiased_beta2), and α."""
    beta2 = hp["beta2"]
    b2h = (N.const(beta2) * N.one_minus_pow(beta2, count)) / N.one_minus_pow(beta2, count + 1)
    return {"beta2_hat": b2h, "one_minus_beta2_hat": 1.0 - b2h, "lr": N.of(lr)}


def _unshared(g: jax.Array) -> tuple[jax.Array]:
    # (rms_of squares a copy of g behind a barrier: XLA would otherwise merge its g·g with the
    # Fisher update's (CSE) and materialise the shared g² for the reduction)
    return (g,)


@functools.cache
def _preconditioned(p: float, decay: bool) -> nu.Reduced:
    """make(g, θ, f, ε_t) -> (ḡ, w̄) = (g, θ)/(f^p + ε_t) unclipped (w̄ only with weight decay);
    one function object per (p, decay), so that the jitted reduction is compiled once."""

    def make(g: jax.Array, theta: jax.Array, f: jax.Array, eps_t: jax.Array) -> tuple[jax.Array, ...]:
        denom = nu.power(f, p, f.dtype) + eps_t
        return (g / denom, theta / denom) if decay else (g / denom,)

    return make


def _fadam_leaf(
    theta: Any, g: Array, state: Arrays, sc: StepScalars, hp: KernelHP, dt: DTypeLike, flagged: bool, N: Numbers
) -> LeafResult:
    m, f = state
    p, decay = hp["p"], hp["weight_decay"] != 0
    f = sc["beta2_hat"] * f + sc["one_minus_beta2_hat"] * (g * g)
    (rms_g,) = nu.rms_of(_unshared, (g,), N)
    eps_t = nu.adaptive_epsilon(rms_g, eps=hp["eps"], eps2=hp["eps2"], p=p, dtype=dt, N=N)
    theta_r = theta if decay else jnp.zeros((), dt)
    rms_bars = nu.rms_of(_preconditioned(p, decay), (g, theta_r, f, eps_t), N)  # RMS(ḡ), RMS(w̄)
    s_g = nu.clip_scale(rms_bars[0], hp["clip"], dt, N)

    # The update passes recompute f^p + ε_t instead of sharing it: behind the barrier XLA sees
    # other values, so it neither merges them with the reduction's nor materialises a shared one.
    g2, f2 = lax.optimization_barrier((g, f))
    g_bar = g2 / (nu.power(f2, p, dt) + eps_t)
    m = _c(hp["beta1"], dt) * m + _c(1 - hp["beta1"], dt) * (g_bar / s_g)
    if not decay:  # λ·w̄ = 0 for finite θ: w̄ (and θ) not needed
        return "delta", sc["lr"] * m, (m, f)
    s_w = nu.clip_scale(rms_bars[1], hp["clip"], dt, N)
    theta3, f3, m3 = lax.optimization_barrier((theta, f, m))
    w_bar = theta3 / (nu.power(f3, p, dt) + eps_t)
    return "delta", sc["lr"] * (m3 + _c(hp["weight_decay"], dt) * (w_bar / s_w)), (m, f)


def _lion_scalars(N: Numbers, count: jax.Array, lr: ArrayLike, hp: KernelHP) -> dict[str, Scalar]:
    return {"lr": N.of(lr)}


def _lion_leaf(
    theta: Any, g: Array, state: Arrays, sc: StepScalars, hp: KernelHP, dt: DTypeLike, flagged: bool, N: Numbers
) -> LeafResult:
    r"""Chen et al. 2023: c = β₁m + (1−β₁)g; θ ← θ − α(sign c + λθ); m ← β₂m + (1−β₂)g (sign 0 = 0)."""
    (m,) = state
    c = _c(hp["beta1"], dt) * m + _c(1 - hp["beta1"], dt) * g
    direction = jnp.sign(c)
    if hp["weight_decay"] != 0:
        direction = direction + _c(hp["weight_decay"], dt) * theta
    m = _c(hp["beta2"], dt) * m + _c(1 - hp["beta2"], dt) * g
    return "delta", sc["lr"] * direction, (m,)


@dataclass(frozen=True)
class Math:
    """The JAX math of one rule: step scalars, per-tensor update, and whether θ is needed."""

    scalars: Callable[[Numbers, jax.Array, ArrayLike, KernelHP], dict[str, Scalar]]  # the step's scalars
    leaf: Callable[..., LeafResult]  # see above
    needs_theta: Callable[[KernelHP], bool]
    state_names: tuple[str, ...]  # the registry's state names this math expects, in order


#: Rule name -> its ``Math`` (the JAX math of the rule, in the order of its spec page).
MATH = {
    "adam": Math(_adam_scalars, _adam_leaf, lambda hp: hp["weight_decay"] != 0, ("m", "v")),
    "adamw": Math(_adam_scalars, _adamw_leaf, lambda hp: hp["weight_decay"] != 0, ("m", "v")),
    "coupled_adam": Math(_adam_scalars, _coupled_adam_leaf, lambda hp: hp["weight_decay"] != 0, ("m", "v")),
    "fadam": Math(_fadam_scalars, _fadam_leaf, lambda hp: hp["weight_decay"] != 0, ("m", "f")),
    "lion": Math(_lion_scalars, _lion_leaf, lambda hp: hp["weight_decay"] != 0, ("m",)),
}

#: Building blocks: name -> (rule, hyperparameters fixed in the block). Everything else of the
#: rule's hyperparameters except the learning rate is an argument of the block.
BLOCKS = {
    "scale_by_adam": ("adam", {"weight_decay": 0.0}),
    "scale_by_coupled_adam": ("coupled_adam", {"weight_decay": 0.0}),
    "scale_by_fadam": ("fadam", {}),
    "scale_by_lion": ("lion", {"weight_decay": 0.0}),
}

#: How each whole rule factorises into blocks (documentation and tests; "exact": bit-identical
#: to the whole rule, else within a few ulp of the step).
FACTORISATIONS = {
    "adam": (
        "chain(add_decayed_weights(weight_decay), scale_by_adam(betas, eps), scale_by_learning_rate(learning_rate))",
        False,
    ),
    "adamw": (
        "chain(scale_by_adam(betas, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))",
        False,
    ),
    "coupled_adam": (
        "chain(scale_by_coupled_adam(betas, eps, coupled), add_decayed_weights(weight_decay), "
        "scale_by_learning_rate(learning_rate))",
        False,
    ),
    "fadam": (
        "chain(scale_by_fadam(betas, eps, eps2, clip, p, weight_decay), scale_by_learning_rate(learning_rate))",
        True,
    ),
    "lion": (
        "chain(scale_by_lion(betas), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))",
        True,
    ),
}


# ---- state -------------------------------------------------------------------------------------
_STATE_CLASSES: dict[str, type[Any]] = {}


def state_class(name: str, fields: tuple[str, ...]) -> type[Any]:
    """A NamedTuple ``name`` with ``count`` and the state arrays (a pytree; picklable: it is
    registered as an attribute of this module)."""
    cls = _STATE_CLASSES.get(name)
    if cls is None:
        cls = NamedTuple(name, [("count", Any)] + [(f, Any) for f in fields])
        cls.__module__ = __name__
        cls.__doc__ = f"optax state: ``count`` (updates applied so far, int32) and {', '.join(fields)} (pytrees)."
        _STATE_CLASSES[name] = cls
        globals()[name] = cls
    return cls


def compute_dtype(param_dtype: DTypeLike, state_dtype: DTypeLike | None = None) -> np.dtype[Any]:
    """The dtype of the state and of the arithmetic for a parameter of ``param_dtype``."""
    pdt = np.dtype(param_dtype)
    if not jnp.issubdtype(pdt, jnp.floating):
        raise TypeError(f"parameters must be floating point, got {pdt}")
    if state_dtype is not None:
        dt = np.dtype(state_dtype)
    elif pdt in (np.dtype(np.float32), np.dtype(np.float64)):
        dt = pdt
    else:
        dt = np.dtype(np.float32)  # bfloat16/float16 parameters: float32 state and arithmetic
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"state_dtype must be float32 or float64 (the spec's dtypes), got {dt}")
    if dt == np.float64 and not nu.x64_enabled():
        raise ValueError(
            "float64 state needs 64-bit JAX: jax.config.update('jax_enable_x64', True) or `with jax.enable_x64(True):`"
        )
    return dt


# ---- the transformation ----------------------------------------------------------------------
def _resolve_flags(
    rule: Rule, flags: Flags | None, params: PyTree, leaves: Sequence[jax.Array], treedef: Any
) -> list[bool] | None:
    flag = rule.tensor_flag
    if flag is None:
        return None
    if flags is None:
        raise ValueError(
            f"{flag.name} is required: a pytree of bools like the params, or a function "
            f"params -> such a pytree ({flag.doc})"
        )
    if callable(flags):
        flags = flags(params)
    try:
        flat = treedef.flatten_up_to(flags)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{flag.name} must have the structure of the params (one bool per array): {exc}") from None
    return list(check_tensor_flags(rule, flat, leaves) or ())


def transformation(
    rule: Rule,
    hp: Mapping[str, Any],
    learning_rate: float | optax.Schedule,
    *,
    flags: Flags | None = None,
    state_dtype: DTypeLike | None = None,
    direction: bool = False,
    state_name: str | None = None,
) -> optax.GradientTransformation:
    """The optax transformation of ``rule`` with kernel hyperparameters ``hp`` (validated).

    ``direction``: a building block: return the descent direction (the step for α = 1,
    positive), with ``learning_rate`` fixed to 1."""
    math = MATH[rule.name]
    if tuple(rule.state_names) != math.state_names:
        raise RuntimeError(
            f"the registry's {rule.name} state is {rule.state_names}; the JAX math expects {math.state_names}"
        )
    names = rule.state_names
    per_column = tuple(s.per_column for s in rule.state)
    State = state_class(state_name or f"{rule.title}State", names)
    validated = {h.name: hp[h.name] for h in rule.hyperparams}
    kernel_hp = rule.kernel_kwargs(validated)
    check_dtypes_hp = dict(validated)
    if callable(learning_rate):
        check_dtypes_hp["lr"] = rule.defaults()["lr"]

    def init_fn(params: PyTree) -> Any:
        leaves, treedef = jax.tree.flatten(params)
        dts = [compute_dtype(p.dtype, state_dtype) for p in leaves]
        check_hyperparams(rule, check_dtypes_hp, sorted(set(dts), key=str))
        fl = _resolve_flags(rule, flags, params, leaves, treedef)
        arrays: dict[str, PyTree] = {}
        for name, col in zip(names, per_column):
            arrays[name] = treedef.unflatten(
                [
                    jnp.zeros((p.shape[1],) if (col and fl is not None and fl[i]) else p.shape, dts[i])
                    for i, p in enumerate(leaves)
                ]
            )
        return State(jnp.zeros([], jnp.int32), **arrays)

    def update_fn(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, Any]:
        N = nu.numbers()
        count = state.count
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        scalars = math.scalars(N, count, lr, kernel_hp)
        rounded: dict[np.dtype[Any], dict[str, jax.Array]] = {}

        def sc_for(dt: np.dtype[Any]) -> dict[str, jax.Array]:
            if dt not in rounded:
                rounded[dt] = {k: v.round(dt) for k, v in scalars.items()}
            return rounded[dt]

        g_leaves, treedef = jax.tree.flatten(updates)
        s_leaves = [treedef.flatten_up_to(getattr(state, name)) for name in names]
        p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
        out_u: list[jax.Array] = []
        out_s: list[list[jax.Array]] = [[] for _ in names]
        for i, g in enumerate(g_leaves):
            theta = p_leaves[i]
            st = tuple(s[i] for s in s_leaves)
            dt = st[0].dtype
            pdt = theta.dtype if theta is not None else g.dtype
            needs_theta = math.needs_theta(kernel_hp) or (not direction and pdt != dt)
            if theta is None and needs_theta:
                raise ValueError(
                    f"{rule.name}: this transformation needs the params here (weight decay, or "
                    f"parameters of dtype {pdt} with {dt} state): tx.update(grads, state, params)"
                )
            flagged = any(col and s.ndim != g.ndim for col, s in zip(per_column, st))
            theta_c = theta.astype(dt) if theta is not None else None
            form, value, new_state = math.leaf(theta_c, g.astype(dt), st, sc_for(dt), kernel_hp, dt, flagged, N)
            if direction:
                if form != "delta":
                    raise RuntimeError(f"{rule.name}: a building block must be in delta form")
                u = value.astype(pdt)
            elif form == "delta" and pdt == dt:
                u = -value  # θ + (−x) == θ − x exactly
            else:
                assert theta is not None and theta_c is not None  # needs_theta: checked above
                new_theta = (theta_c - value if form == "delta" else value).astype(pdt)
                # θ_new − θ is exact when they are within a factor 2 (Sterbenz), so apply_updates
                # gives θ_new; where θ_new == θ (also ±Inf) the update is 0, not Inf − Inf.
                u = jnp.where(new_theta == theta, jnp.zeros((), pdt), new_theta - theta)
            out_u.append(u)
            for k, a in enumerate(new_state):
                out_s[k].append(a)
        new = State(optax.safe_increment(count), **{name: treedef.unflatten(out_s[k]) for k, name in enumerate(names)})
        return treedef.unflatten(out_u), new

    return optax.GradientTransformation(init_fn, update_fn)


# ---- public constructors, from the registry ----------------------------------------------------
_P = inspect.Parameter


def _hp_doc(h: Hyperparam) -> str:
    rng = []
    if h.low is not None:
        rng.append(f"{'>' if h.low_open else '>='} {h.low:g}")
    if h.high is not None:
        rng.append(f"{'<' if h.high_open else '<='} {h.high:g}")
    name = "learning_rate" if h.name == "lr" else h.name
    extra = " (a float or an optax schedule count -> value)" if h.name == "lr" else ""
    return f"    {name}: {h.doc}{extra}; default {h.default!r}; {' and '.join(rng) or 'any real'}."


def _validated(rule: Rule, values: Mapping[str, Any], learning_rate: object) -> dict[str, Any]:
    hp = dict(values)
    if callable(learning_rate):
        hp["lr"] = rule.defaults()["lr"]  # a schedule is checked for being callable only
    elif learning_rate is not None:
        hp["lr"] = learning_rate
    out: dict[str, Any] = dict(check_hyperparams(rule, hp, ()))
    if callable(learning_rate):
        out["lr"] = learning_rate
    return out


def rule_transform(rule: Rule) -> Callable[..., optax.GradientTransformation]:
    """``<rule>(learning_rate, <hyperparameters>, [<flag>], *, state_dtype=None)`` for ``rule``."""
    params: list[inspect.Parameter] = []
    for h in rule.hyperparams:
        params.append(_P("learning_rate" if h.name == "lr" else h.name, _P.POSITIONAL_OR_KEYWORD, default=h.default))
    if rule.tensor_flag is not None:
        params.append(_P(rule.tensor_flag.name, _P.POSITIONAL_OR_KEYWORD, default=None))
    params.append(_P("state_dtype", _P.KEYWORD_ONLY, default=None))
    sig = inspect.Signature(params)

    def constructor(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        lr = a.pop("learning_rate")
        flags = a.pop(rule.tensor_flag.name) if rule.tensor_flag is not None else None
        state_dtype = a.pop("state_dtype")
        if not callable(lr) and not isinstance(lr, (int, float)) or isinstance(lr, bool):
            raise TypeError(f"learning_rate must be a float or a schedule (a callable count -> value), got {lr!r}")
        hp = _validated(rule, a, lr)
        lr_value = cast("optax.Schedule", hp["lr"]) if callable(hp["lr"]) else float(hp["lr"])
        return transformation(rule, hp, lr_value, flags=flags, state_dtype=state_dtype)

    constructor.__signature__ = sig
    constructor.__name__ = constructor.__qualname__ = rule.name
    constructor.__module__ = "fisheropt.optax"
    flag_doc = (
        f"    {rule.tensor_flag.name}: required; a pytree of bools with the params' structure, or a "
        f"function params -> one. {rule.tensor_flag.doc}.\n"
        if rule.tensor_flag
        else ""
    )
    fact, exact = FACTORISATIONS.get(rule.name, ("", False))
    constructor.__doc__ = (
        f"{rule.title} ({rule.paper}) as an optax GradientTransformation: {rule.summary}.\n\n"
        f"Spec: spec/{rule.spec_page}; hyperparameters, defaults and ranges from fisheropt.refimpl.RULES"
        f"[{rule.name!r}] (checked here, and against the parameter dtypes at init).\n\n"
        "Args:\n"
        + "\n".join(_hp_doc(h) for h in rule.hyperparams)
        + "\n"
        + flag_doc
        + "    state_dtype: dtype of the state and the arithmetic (default: the parameter dtype for float32/"
        "float64 parameters, float32 for bfloat16/float16 ones).\n\n"
        f"State: {rule.title}State(count, {', '.join(rule.state_names)}).\n"
        + (f"Factorisation ({'bit-identical' if exact else 'within a few ulp'}): {fact}.\n" if fact else "")
    )
    return constructor


def block(name: str) -> Callable[..., optax.GradientTransformation]:
    """The building block ``name`` of :data:`BLOCKS` (no learning rate), from the registry."""
    rule_name, fixed = BLOCKS[name]
    rule = RULES[rule_name]
    params = [
        _P(h.name, _P.POSITIONAL_OR_KEYWORD, default=h.default)
        for h in rule.hyperparams
        if h.name != "lr" and h.name not in fixed
    ]
    if rule.tensor_flag is not None:
        params.append(_P(rule.tensor_flag.name, _P.POSITIONAL_OR_KEYWORD, default=None))
    params.append(_P("state_dtype", _P.KEYWORD_ONLY, default=None))
    sig = inspect.Signature(params)
    state_name = "".join(w.capitalize() for w in name.split("_")[:2]) + rule.title + "State"  # ScaleByFAdamState

    def constructor(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        flags = a.pop(rule.tensor_flag.name) if rule.tensor_flag is not None else None
        state_dtype = a.pop("state_dtype")
        hp = _validated(rule, {**a, **fixed}, 1.0)
        return transformation(
            rule, hp, 1.0, flags=flags, state_dtype=state_dtype, direction=True, state_name=state_name
        )

    constructor.__signature__ = sig
    constructor.__name__ = constructor.__qualname__ = name
    constructor.__module__ = "fisheropt.optax"
    constructor.__doc__ = (
        f"{rule.title}'s descent direction without the learning rate"
        + (
            " and without weight decay (add it with optax.add_decayed_weights)"
            if "weight_decay" in fixed
            else " (weight decay included: it does not factorise, see spec/fadam.md)"
        )
        + f"; chain with optax.scale_by_learning_rate. Spec: spec/{rule.spec_page}.\n\nArgs:\n"
        + "\n".join(_hp_doc(h) for h in rule.hyperparams if h.name != "lr" and h.name not in fixed)
    )
    return constructor
