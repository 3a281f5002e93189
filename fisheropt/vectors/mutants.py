"""Mutants: plausible implementation mistakes, each a small variant of the reference.

The vectors are only as good as the mistakes they catch. Every suite has a set of
mutants here, each one a namespace with the suite's function(s), built from the
reference's own building blocks (fisheropt.refimpl) with one thing changed: the
step index off by one, the bias correction missing, a square formed in float32,
subnormals flushed to zero, ... tests/test_vector_mutants.py runs every suite
against every mutant of its rule and requires that each mutant fails at least one
case (mutation score 100 %), that the reference passes every case, and that every
case kills the mutants listed in its ``kills`` field.

Every update rule of the registry (fisheropt.refimpl.RULES) has the **shared**
mutants that apply to it, derived from its descriptor by
:func:`shared_optimizer_mutants` (θ never written, β₁/β₂ swapped, state doubled,
flush-to-zero, and the step index off by one only where the step index enters the
rule); these wrap the reference itself. A rule's **own** mutants are one entry in
:data:`RULE_MUTANTS` (rule name -> a function returning {name: (description,
namespace)}; an own mutant may replace a shared one of the same name), and its
re-implementation with every switch off one entry in :data:`RULE_UNMUTATED` (default:
the reference). The Adam family, FAdam and Lion are re-implemented here, following
the spec's order of operations, with switches for the mistakes (:class:`AdamKnobs`,
:class:`FAdamKnobs`, :class:`LionKnobs`); with every switch off they give the
reference's bits (tested). The other suites (ESimCSE, Fisher) have their entries in
:data:`OTHER_MUTANTS`. :data:`REGISTRY` collects them all: suite name -> a function
returning {name: (description, namespace)}.

``python -m fisheropt.vectors --mutants`` prints, per suite, each mutant and the
cases that kill it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from fisheropt import refimpl
from fisheropt.refimpl import RULES
from fisheropt.refimpl import coupled_adam as _coupled
from fisheropt.refimpl import esimcse_momentum as _ema
from fisheropt.refimpl import fadam as _fadam
from fisheropt.refimpl import fisher_ngd as _ngd


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    namespace: object  # an object with the suite's function(s) as attributes


# =============================================================================
# Generic wrappers (any update rule of the registry)
# =============================================================================
def _step_functions() -> tuple[str, ...]:
    return tuple(rule.step_function for rule in RULES.values())


def _wrap(base, transform) -> SimpleNamespace:
    """A namespace whose step functions (every rule's) are ``transform(base_fn)``."""
    return SimpleNamespace(**{n: transform(getattr(base, n)) for n in _step_functions() if hasattr(base, n)})


def _never_update_theta(fn):
    def step(params, grads, *state, **kw):
        saved = [p.copy() for p in params]
        fn(params, grads, *state, **kw)
        for p, s in zip(params, saved):
            p[...] = s

    return step


def _step_offset(delta):
    def transform(fn):
        def step(params, grads, *state, step, **kw):
            fn(params, grads, *state, step=step + delta, **kw)

        return step

    return transform


def _betas_swapped(fn):
    def step(params, grads, *state, beta1, beta2, **kw):
        fn(params, grads, *state, beta1=beta2, beta2=beta1, **kw)

    return step


def _state_doubled(fn):
    """Keeps (or reports) every state array at twice its value."""

    def step(params, grads, *state, **kw):
        for lst in state:
            for a in lst:
                a[...] = a / 2
        fn(params, grads, *state, **kw)
        for lst in state:
            for a in lst:
                a[...] = a * 2

    return step


def flush(a) -> None:
    """Flush subnormal elements of a float array to zero, in place (FTZ/DAZ)."""
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            a[np.abs(a) < np.finfo(a.dtype).tiny] = 0


def _flush_to_zero(fn):
    """Denormals-are-zero on every input and flush-to-zero on every output of the step: what
    a build with -ffast-math (or a GPU kernel with --ftz=true) does to this rule."""

    def step(params, grads, *state, **kw):
        grads = [g.copy() for g in grads]
        for a in [*params, *grads, *(x for lst in state for x in lst)]:
            flush(a)
        fn(params, grads, *state, **kw)
        for a in [*params, *(x for lst in state for x in lst)]:
            flush(a)

    return step


def shared_optimizer_mutants(name: str, base=refimpl) -> dict[str, tuple[str, object]]:
    """The shared mutants that apply to rule ``name``, read from its descriptor and what its cases
    find (fisheropt.vectors.optim.CaseRule): the step-index ones only where the step index enters
    the rule (not Lion), β₁/β₂ swapped where it has both, the doubled state where it has state."""
    from .optim import case_rule

    rule = case_rule(name)
    out: dict[str, tuple[str, object]] = {
        "never_update_theta": ("θ is never written (state is)", _wrap(base, _never_update_theta))
    }
    if rule.step_matters:
        out["step_ahead"] = (
            "step index off by one: t + 1 (a 0-based counter incremented before use, twice)",
            _wrap(base, _step_offset(+1)),
        )
        out["step_behind"] = (
            "step index off by one: t − 1 (the count of updates done instead of t = count + 1)",
            _wrap(base, _step_offset(-1)),
        )
    if {"beta1", "beta2"} <= set(rule.hp):
        out["betas_swapped"] = ("β₁ and β₂ swapped", _wrap(base, _betas_swapped))
    if rule.state_order:
        out["state_doubled"] = ("every state array kept (reported) at twice its value", _wrap(base, _state_doubled))
    out["flush_to_zero"] = ("subnormals flushed to zero (FTZ/DAZ, e.g. -ffast-math)", _wrap(base, _flush_to_zero))
    return out


# =============================================================================
# Adam, AdamW, Coupled Adam
# =============================================================================
@dataclass(frozen=True)
class AdamKnobs:
    bias_correction: str = "once"  # "none" | "twice"
    eps_inside_sqrt: bool = False  # sqrt(v̂ + ε) instead of sqrt(v̂) + ε
    scalars_in_param_dtype: bool = False  # host scalars computed in the parameter dtype
    square_after_scaling: bool = False  # ((1 − β₂)·g)·g instead of (1 − β₂)·(g·g)
    decay: str | None = None  # None: the rule's own; "l2" | "decoupled" | "decoupled_no_lr"
    column_mean: str = "float64"  # "squares_float32" | "sum_float32" | "wrong_axis"
    couple_m: bool = False  # m shared across rows like v̄
    uncoupled_as_coupled: bool = False  # every 2-D tensor coupled, whatever its flag


class _Scalars:
    """Host scalars: computed in float64 and rounded to the parameter dtype (the spec), or,
    for the mutant, computed in the parameter dtype itself."""

    def __init__(self, dtype, in_dtype: bool):
        self.T = np.dtype(dtype).type
        self.in_dtype = in_dtype

    def one_minus(self, x):
        return self.T(1) - self.T(x) if self.in_dtype else self.T(1 - x)

    def power(self, x, t):
        return self.T(x) ** self.T(t) if self.in_dtype else x**t


def _adam_scalars(S: _Scalars, k: AdamKnobs, *, t, lr, beta1, beta2):
    """(step size α/(1−β₁ᵗ), √(1−β₂ᵗ), 1−β₂ᵗ) as parameter-dtype scalars, with the knobs."""
    T = S.T
    if S.in_dtype:
        bc1 = T(1) - T(beta1) ** T(t)
        bc2sq = T(1) - T(beta2) ** T(t)
        lr_ = T(lr)
        sqrt = np.sqrt
    else:
        bc1 = 1 - beta1**t
        bc2sq = 1 - beta2**t
        lr_ = lr
        sqrt = math.sqrt
    if k.bias_correction == "none":
        bc1, bc2sq = bc1**0, bc2sq**0
    elif k.bias_correction == "twice":
        bc1, bc2sq = bc1 * bc1, bc2sq * bc2sq
    return T(lr_ / bc1), T(sqrt(bc2sq)), T(bc2sq)


def _column_mean(g, how):
    T = g.dtype.type
    if how == "float64":
        return _coupled.column_mean_of_squares(g)
    if how == "squares_float32":  # squares in the parameter dtype, then a float64 mean
        return np.mean((g * g).astype(np.float64), axis=0).astype(g.dtype)
    if how == "sum_float32":  # squares and their sum in the parameter dtype
        return np.add.reduce(g * g, axis=0, dtype=g.dtype) / T(g.shape[0])
    if how == "wrong_axis":  # the V×d buffer read as d×V: means over a row's entries
        V, d = g.shape
        g64 = g.reshape(d, V).astype(np.float64)
        return np.mean(g64 * g64, axis=1).astype(g.dtype)
    raise ValueError(how)


def _adam_family_update(theta, g, m, v, *, t, lr, beta1, beta2, eps, weight_decay, decay, coupled, k: AdamKnobs):
    """One tensor, pure: Adam (decay "l2"), AdamW ("decoupled") or Coupled Adam (coupled=True)."""
    T = theta.dtype.type
    S = _Scalars(theta.dtype, k.scalars_in_param_dtype)
    decay = k.decay or decay
    if weight_decay != 0 and decay == "l2":
        g = g + T(weight_decay) * theta
    elif decay == "decoupled":
        factor = T(1) - T(lr) * T(weight_decay) if S.in_dtype else T(1 - lr * weight_decay)
        theta = theta * factor
    elif decay == "decoupled_no_lr":
        theta = theta * S.one_minus(weight_decay)
    b1, omb1, b2, omb2 = T(beta1), S.one_minus(beta1), T(beta2), S.one_minus(beta2)
    gm = g
    if coupled and k.couple_m:
        gm = np.broadcast_to(np.mean(g.astype(np.float64), axis=0).astype(g.dtype), g.shape)
    m = b1 * m + omb1 * gm
    if coupled:
        sq = _column_mean(g, k.column_mean)
        if v.shape == theta.shape:  # an uncoupled tensor taken for a coupled one: v̄ = row mean of v
            vbar = np.mean(v.astype(np.float64), axis=0).astype(v.dtype)
            v = np.broadcast_to(b2 * vbar + omb2 * sq, theta.shape).copy()
        else:
            v = b2 * v + omb2 * sq
    elif k.square_after_scaling:
        v = b2 * v + (omb2 * g) * g
    else:
        v = b2 * v + omb2 * (g * g)
    step_size, bc2, bc2sq = _adam_scalars(S, k, t=t, lr=lr, beta1=beta1, beta2=beta2)
    if k.eps_inside_sqrt:
        denom = np.sqrt(v / bc2sq + T(eps))
    else:
        denom = np.sqrt(v) / bc2 + T(eps)
    return theta - step_size * (m / denom), m, v


def _write(params, m, v, new):
    for i, (th, mm, vv) in enumerate(new):
        params[i][...], m[i][...], v[i][...] = th, mm, vv


def adam_family(k: AdamKnobs = AdamKnobs()) -> SimpleNamespace:
    """adam_step, adamw_step and coupled_adam_step with the knobs (none set: the reference's bits)."""

    def make(decay):
        def step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled=None):
            flags = coupled if coupled is not None else [decay == "coupled"] * len(params)
            new = []
            with np.errstate(all="ignore"):
                for th, g, mm, vv, c in zip(params, grads, m, v, flags):
                    is_coupled = bool(c) or (k.uncoupled_as_coupled and decay == "coupled" and th.ndim == 2)
                    new.append(
                        _adam_family_update(
                            th,
                            g,
                            mm,
                            vv,
                            t=step,
                            lr=lr,
                            beta1=beta1,
                            beta2=beta2,
                            eps=eps,
                            weight_decay=weight_decay,
                            decay="l2" if decay == "l2" else "decoupled",
                            coupled=is_coupled,
                            k=k,
                        )
                    )
            _write(params, m, v, new)

        return step

    return SimpleNamespace(adam_step=make("l2"), adamw_step=make("decoupled"), coupled_adam_step=make("coupled"))


def _adam_family_mutants(rule: str) -> dict[str, tuple[str, object]]:
    out = {}
    knobbed = {
        "no_bias_correction": ("no bias correction (α·m/(√v + ε))", AdamKnobs(bias_correction="none")),
        "bias_correction_twice": ("both bias corrections applied twice", AdamKnobs(bias_correction="twice")),
        "eps_inside_sqrt": ("ε inside the square root: √(v̂ + ε)", AdamKnobs(eps_inside_sqrt=True)),
        "scalars_in_param_dtype": (
            "host scalars (1 − β, bias corrections, α/(1 − β₁ᵗ)) computed in the parameter dtype, not float64",
            AdamKnobs(scalars_in_param_dtype=True),
        ),
    }
    knobbed["square_after_scaling"] = (
        "v += ((1 − β₂)·g)·g, the left-to-right reading of "
        "(1 − β₂)·g·g: no overflow where g² = +Inf" + (" (uncoupled tensors)" if rule == "coupled_adam" else ""),
        AdamKnobs(square_after_scaling=True),
    )
    if rule == "adam":
        knobbed["decay_decoupled"] = ("AdamW's decoupled decay instead of L2", AdamKnobs(decay="decoupled"))
    if rule == "adamw":
        knobbed["decay_coupled"] = ("L2 decay added to the gradient instead of decoupled", AdamKnobs(decay="l2"))
        knobbed["decay_not_scaled_by_lr"] = ("θ·(1 − λ) instead of θ·(1 − αλ)", AdamKnobs(decay="decoupled_no_lr"))
    if rule == "coupled_adam":
        knobbed.update(
            {
                "mean_over_columns": (
                    "the column mean taken over the wrong axis (the V×d buffer read as d×V)",
                    AdamKnobs(column_mean="wrong_axis"),
                ),
                "couple_m": ("m coupled too (shared across rows like v̄)", AdamKnobs(couple_m=True)),
                "uncoupled_as_coupled": (
                    "every 2-D tensor treated as coupled, whatever its flag",
                    AdamKnobs(uncoupled_as_coupled=True),
                ),
                "squares_in_float32": (
                    "squares for the column mean formed in float32 (summed in float64)",
                    AdamKnobs(column_mean="squares_float32"),
                ),
                "reduction_in_float32": (
                    "column mean of g² accumulated in float32",
                    AdamKnobs(column_mean="sum_float32"),
                ),
            }
        )
    for name, (desc, knobs) in knobbed.items():
        out[name] = (desc, adam_family(knobs))
    return out


# =============================================================================
# FAdam
# =============================================================================
@dataclass(frozen=True)
class FAdamKnobs:
    eps_guard: str = "full"  # "none" | "no_floor" | "constant"
    clip: str = "paper"  # "port" (max(1, RMS)/c) | "none"
    momentum_before_preconditioning: bool = False
    decay_preconditioned: bool = True
    beta2_debiased: bool = True
    momentum_bias_corrected: bool = False
    old_fisher: bool = False  # ḡ, w̄ from f before this step's update
    p_ignored: bool = False  # √f whatever p
    rms: str = "float64"  # "squares_float32" | "sum_float32"
    scalars_in_param_dtype: bool = False
    square_after_scaling: bool = False


def _rms(x, how) -> float:
    if how == "float64" or x.size == 0:
        return _fadam.rms(x)
    if how == "squares_float32":
        return math.sqrt(np.mean((x * x).astype(np.float64)))
    if how == "sum_float32":
        return math.sqrt(float(np.mean(x * x, dtype=x.dtype)))
    raise ValueError(how)


def _fadam_update(theta, g, m, f, *, t, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, k: FAdamKnobs):
    T = theta.dtype.type
    S = _Scalars(theta.dtype, k.scalars_in_param_dtype)
    tiny = np.finfo(theta.dtype).tiny
    if not k.beta2_debiased:
        b2h = T(beta2) if S.in_dtype else beta2
    elif S.in_dtype:
        b2 = T(beta2)
        b2h = b2 * (T(1) - b2 ** T(t - 1)) / (T(1) - b2 ** T(t))
    else:
        b2h = _fadam.debiased_beta2(beta2, t)
    omb2h = T(1) - T(b2h) if S.in_dtype else T(1 - b2h)
    f_old = f
    f = T(b2h) * f + ((omb2h * g) * g if k.square_after_scaling else omb2h * (g * g))
    rms_g = _rms(g, k.rms)
    if S.in_dtype:
        eps_t = min(T(eps), T(eps2) * T(rms_g)) ** T(2 * p)
        fallback = T(eps) ** T(2 * p)
    else:
        eps_t = T(min(eps, eps2 * rms_g) ** (2 * p))
        fallback = T(eps ** (2 * p))
    if k.eps_guard == "constant":
        eps_t = max(fallback, tiny)
    elif k.eps_guard == "no_floor":
        eps_t = fallback if eps_t == 0 else eps_t
    elif k.eps_guard == "full":
        eps_t = max(fallback if eps_t == 0 else eps_t, tiny)
    eps_t = T(eps_t)
    fp = f_old if k.old_fisher else f
    denom = (np.sqrt(fp) if k.p_ignored else fp ** T(p)) + eps_t

    def clip_scale(x):
        r = _rms(x, k.rms)
        if k.clip == "none":
            return T(1)
        if S.in_dtype:
            return max(T(1), T(r) / T(clip)) if k.clip == "paper" else max(T(1), T(r)) / T(clip)
        return T(max(1.0, r / clip) if k.clip == "paper" else max(1.0, r) / clip)

    b1, omb1 = T(beta1), S.one_minus(beta1)
    if k.momentum_before_preconditioning:
        m = b1 * m + omb1 * g
        u = m / denom
        u = u / clip_scale(u)
    else:
        g_bar = g / denom
        g_bar = g_bar / clip_scale(g_bar)
        m = b1 * m + omb1 * g_bar
        u = m
        if k.momentum_bias_corrected:
            u = m / (T(1) - T(beta1) ** T(t) if S.in_dtype else T(1 - beta1**t))
    if k.decay_preconditioned:
        w_bar = theta / denom
        w_bar = w_bar / clip_scale(w_bar)
    else:
        w_bar = theta
    theta = theta - T(lr) * (u + T(weight_decay) * w_bar)
    return theta, m, f


def fadam(k: FAdamKnobs = FAdamKnobs()) -> SimpleNamespace:
    """fadam_step with the knobs (none set: the reference's bits)."""

    def fadam_step(params, grads, m, f, *, step, **hp):
        with np.errstate(all="ignore"):
            new = [_fadam_update(th, g, mm, ff, t=step, k=k, **hp) for th, g, mm, ff in zip(params, grads, m, f)]
        _write(params, m, f, new)

    return SimpleNamespace(fadam_step=fadam_step)


def _fadam_mutants() -> dict[str, tuple[str, object]]:
    out = {}
    knobbed = {
        "eps_unguarded": (
            "ε_t = min(ε, ε₂·RMS(g))^{2p} with neither the ε^{2p} fallback nor the floor",
            FAdamKnobs(eps_guard="none"),
        ),
        "eps_no_normal_floor": (
            "ε_t not raised to the smallest normal number (a subnormal ε_t stays)",
            FAdamKnobs(eps_guard="no_floor"),
        ),
        "eps_constant": ("constant ε_t = ε^{2p} (the paper's v1), not adaptive", FAdamKnobs(eps_guard="constant")),
        "clip_form": ("clip as max(1, RMS)/c instead of max(1, RMS/c)", FAdamKnobs(clip="port")),
        "no_clip": ("ḡ and w̄ not RMS-clipped", FAdamKnobs(clip="none")),
        "momentum_before_preconditioning": (
            "m = EMA of g, preconditioned (and clipped) afterwards",
            FAdamKnobs(momentum_before_preconditioning=True),
        ),
        "decay_not_preconditioned": (
            "weight decay λθ instead of the preconditioned, clipped w̄",
            FAdamKnobs(decay_preconditioned=False),
        ),
        "beta2_not_debiased": ("f = β₂f + (1 − β₂)g² (Adam's EMA) instead of β̂₂", FAdamKnobs(beta2_debiased=False)),
        "momentum_bias_corrected": (
            "m divided by 1 − β₁ᵗ in the update (Adam's habit)",
            FAdamKnobs(momentum_bias_corrected=True),
        ),
        "old_fisher": ("ḡ and w̄ use f before this step's update", FAdamKnobs(old_fisher=True)),
        "p_ignored": ("f^p evaluated as √f whatever p", FAdamKnobs(p_ignored=True)),
        "squares_in_float32": (
            "squares for the RMS values formed in float32 (summed in float64)",
            FAdamKnobs(rms="squares_float32"),
        ),
        "reduction_in_float32": ("RMS values accumulated in float32", FAdamKnobs(rms="sum_float32")),
        "scalars_in_param_dtype": (
            "host scalars (β̂₂, 1 − β̂₂, ε_t, clip scales, ...) computed in the parameter dtype, not float64",
            FAdamKnobs(scalars_in_param_dtype=True),
        ),
        "square_after_scaling": (
            "f += ((1 − β̂₂)·g)·g: no overflow where g² = +Inf",
            FAdamKnobs(square_after_scaling=True),
        ),
    }
    for name, (desc, knobs) in knobbed.items():
        out[name] = (desc, fadam(knobs))
    return out


# =============================================================================
# Lion
# =============================================================================
@dataclass(frozen=True)
class LionKnobs:
    sign: str = "spec"  # "zero_is_one": sign(±0) = ±1 | "nan_is_zero": (c > 0) − (c < 0)
    momentum_before_sign: bool = False  # m updated first, c formed from the new m
    decay: str = "spec"  # "after_sign" | "not_scaled_by_lr" | "coupled" | "multiplicative"
    scalars_in_param_dtype: bool = False  # 1 − β computed in the parameter dtype
    lerp: bool = False  # c = m + (1 − β₁)(g − m), m += (1 − β₂)(g − m)
    ftz: bool = False  # every input, intermediate and result flushed to zero


def _lion_sign(c, how):
    T = c.dtype.type
    if how == "zero_is_one":  # copysign(1, c), or c >= 0 ? 1 : -1, for a zero c; the rest as the spec
        return np.where(c == 0, np.copysign(T(1), c), np.sign(c)).astype(c.dtype)
    if how == "nan_is_zero":  # the C idiom (c > 0) - (c < 0): sign(NaN) = 0
        return (c > 0).astype(c.dtype) - (c < 0).astype(c.dtype)
    return np.sign(c)


def _lion_update(theta, g, m, *, t, lr, beta1, beta2, weight_decay, k: LionKnobs):
    T = theta.dtype.type
    S = _Scalars(theta.dtype, k.scalars_in_param_dtype)

    def F(x):  # the result of one operation (flushed under FTZ)
        x = np.asarray(x, dtype=theta.dtype)
        if k.ftz:
            x = x.copy()
            flush(x)
        return x

    theta, g, m = F(theta), F(g), F(m)
    b1, omb1, b2, omb2 = T(beta1), S.one_minus(beta1), T(beta2), S.one_minus(beta2)
    lr_, wd = T(lr), T(weight_decay)
    if k.decay == "coupled":  # L2: λθ added to the gradient, as Adam does
        g = F(g + F(wd * theta))

    def ema(b, omb, x):
        return F(x + F(omb * F(g - x))) if k.lerp else F(F(b * x) + F(omb * g))

    m_new = ema(b2, omb2, m)
    c = ema(b1, omb1, m_new if k.momentum_before_sign else m)
    s = _lion_sign(c, k.sign)
    if k.decay == "spec":
        theta = F(theta - F(lr_ * F(s + F(wd * theta))))
    elif k.decay == "after_sign":  # θ − α·sign(c) first, then the decay of that θ
        theta = F(theta - F(lr_ * s))
        theta = F(theta - F(lr_ * F(wd * theta)))
    elif k.decay == "not_scaled_by_lr":
        theta = F(theta - F(F(lr_ * s) + F(wd * theta)))
    elif k.decay == "coupled":
        theta = F(theta - F(lr_ * s))
    elif k.decay == "multiplicative":  # θ·(1 − αλ) − α·sign(c), 1 − αλ from float64 (PyTorch ports)
        factor = T(1) - lr_ * wd if S.in_dtype else T(1 - lr * weight_decay)
        theta = F(F(theta * factor) - F(lr_ * s))
    else:
        raise ValueError(k.decay)
    return theta, m_new


def lion(k: LionKnobs = LionKnobs()) -> SimpleNamespace:
    """lion_step with the knobs (none set: the reference's bits)."""

    def lion_step(params, grads, m, *, step, **hp):
        with np.errstate(all="ignore"):
            new = [_lion_update(th, g, mm, t=step, k=k, **hp) for th, g, mm in zip(params, grads, m)]
        for i, (th, mm) in enumerate(new):
            params[i][...], m[i][...] = th, mm

    return SimpleNamespace(lion_step=lion_step)


def _lion_mutants() -> dict[str, tuple[str, object]]:
    knobbed = {
        "sign_of_zero": (
            "sign(0) = ±1 (copysign(1, c), or c ≥ 0 ? 1 : −1): θ moves by α where c = 0",
            LionKnobs(sign="zero_is_one"),
        ),
        "sign_of_nan": (
            "sign as (c > 0) − (c < 0): sign(NaN) = 0, so θ stays finite where c is NaN",
            LionKnobs(sign="nan_is_zero"),
        ),
        "momentum_before_sign": (
            "m updated before the sign: c = β₁·m_t + (1 − β₁)·g from the new m",
            LionKnobs(momentum_before_sign=True),
        ),
        "scalars_in_param_dtype": (
            "1 − β₁, 1 − β₂ computed in the parameter dtype, not float64",
            LionKnobs(scalars_in_param_dtype=True),
        ),
        "decay_after_sign": ("the decay applied after the sign step, to the updated θ", LionKnobs(decay="after_sign")),
        "decay_not_scaled_by_lr": (
            "θ − α·sign(c) − λθ: the decay not multiplied by α",
            LionKnobs(decay="not_scaled_by_lr"),
        ),
        "decay_coupled": ("L2 decay: λθ added to g (in c and m) instead of decoupled", LionKnobs(decay="coupled")),
        "lerp_form": (
            "c = m + (1 − β₁)(g − m) and m + (1 − β₂)(g − m) (PyTorch's lerp): equal in exact "
            "arithmetic, NaN where m = ±Inf and ±Inf where g − m overflows",
            LionKnobs(lerp=True),
        ),
        # replaces the shared wrapper: Lion's FTZ also flushes c, whose sign is all that matters
        "flush_to_zero": (
            "subnormals flushed to zero in every operation (FTZ/DAZ, e.g. -ffast-math): a subnormal c becomes 0",
            LionKnobs(ftz=True),
        ),
    }
    return {name: (desc, lion(knobs)) for name, (desc, knobs) in knobbed.items()}


# =============================================================================
# ESimCSE momentum encoder (ema_update)
# =============================================================================
def ema(coefficients=None, combine=None, *, compute_dtype=None, ftz=False, skip=False) -> SimpleNamespace:
    """ema_update with its pieces replaced: ``coefficients(decay, dtype) -> (a, b)``,
    ``combine(a, b, k, q) -> new k``; arithmetic in ``compute_dtype``; FTZ; or no update."""
    coefficients = coefficients or _ema.ema_coefficients
    combine = combine or (lambda a, b, k, q: a * k + b * q)

    def ema_update(targets, sources, *, decay):
        if skip:
            return
        with np.errstate(all="ignore"):
            for k, q in zip(targets, sources):
                dt = compute_dtype or k.dtype
                kk, qq = k.astype(dt), q.astype(dt)
                if ftz:
                    flush(kk)
                    flush(qq)
                a, b = coefficients(decay, dt)
                out = np.asarray(combine(a, b, kk, qq)).astype(k.dtype)
                if ftz:
                    flush(out)
                k[...] = out

    return SimpleNamespace(ema_update=ema_update)


def _ema_mutants() -> dict[str, tuple[str, object]]:
    def swapped(decay, dtype):
        a, b = _ema.ema_coefficients(decay, dtype)
        return b, a

    def in_dtype(decay, dtype):
        T = np.dtype(dtype).type
        return T(decay), T(1) - T(decay)

    return {
        "targets_unchanged": ("the targets are never written", ema(skip=True)),
        "decay_swapped": ("θ_k ← (1 − λ)·θ_k + λ·θ_q", ema(coefficients=swapped)),
        "scalars_in_param_dtype": ("1 − λ computed in the parameter dtype, not float64", ema(coefficients=in_dtype)),
        "float32_arithmetic": ("float64 tensors updated in float32 arithmetic", ema(compute_dtype=np.float32)),
        "lerp_form": (
            "θ_k + (1 − λ)·(θ_q − θ_k): equal in exact arithmetic, NaN where θ_k = ±Inf",
            ema(combine=lambda a, b, k, q: k + b * (q - k)),
        ),
        "flush_to_zero": ("subnormals flushed to zero (FTZ/DAZ)", ema(ftz=True)),
    }


# =============================================================================
# Fisher backend functions (fisher_gram, fisher_sample_space_direction)
# =============================================================================
def fisher(*, gram=None, direction=None) -> SimpleNamespace:
    return SimpleNamespace(
        fisher_gram=gram or _ngd.fisher_gram,
        fisher_sample_space_direction=direction or _ngd.fisher_sample_space_direction,
    )


def _direction_from(solve, *, rhs_map=None):
    """d = Gᵀ·solve(K, rhs, λ) in the reference's precision, with the solve or rhs replaced."""

    def direction(G, rhs, damping):
        K = _ngd.fisher_gram(G)
        r = np.asarray(rhs, dtype=np.float64)
        if rhs_map is not None:
            r = rhs_map(r)
        a = solve(K, r, float(damping))
        return G.T @ np.asarray(a).astype(G.dtype)

    return direction


def _fisher_mutants() -> dict[str, tuple[str, object]]:
    def all_entries(K, r, lam):
        return np.linalg.solve(K + lam, r)

    def mean_convention(K, r, lam):
        N = K.shape[0]
        return np.linalg.solve(K / N + lam * np.eye(N), r) / N

    def wrong_side(G, rhs, damping):
        """iEF damped in parameter space: (Gᵀ diag(rhs)⁻¹ G + λI)⁻¹ Gᵀ1 (spec/fisher.md: "not")."""
        G64 = G.astype(np.float64)
        with np.errstate(all="ignore"):
            F = G64.T @ (G64 / np.asarray(rhs, dtype=np.float64)[:, None])
            grad = G64.sum(axis=0)
            d = (
                np.linalg.solve(F + damping * np.eye(G.shape[1]), grad)
                if np.all(np.isfinite(F))
                else np.full(G.shape[1], np.nan)
            )
        return d.astype(G.dtype)

    def float32_solve(G, rhs, damping):
        K = _ngd.fisher_gram(G).astype(np.float32)
        a = np.linalg.solve(
            K + np.float32(damping) * np.eye(G.shape[0], dtype=np.float32), np.asarray(rhs, dtype=np.float32)
        )
        return G.T @ a.astype(G.dtype)

    def gram_in_param_dtype(G):
        return _ngd.fisher_gram(G).astype(G.dtype)

    def gram_mean(G):
        return _ngd.fisher_gram(G) / G.shape[0]

    return {
        "damping_all_entries": (
            "K + λ added to every entry of the Gram, not K + λI",
            fisher(direction=_direction_from(all_entries)),
        ),
        "damping_wrong_side": (
            "iEF damped in parameter space, (Gᵀdiag(s)⁻¹G + λI)⁻¹∇L, instead of on the Gram",
            fisher(direction=wrong_side),
        ),
        "mean_convention": (
            "mean-loss convention without rescaling: K/N (and d/N) with the same λ",
            fisher(gram=gram_mean, direction=_direction_from(mean_convention)),
        ),
        "s_not_squared": (
            "iEF's s_n = ‖∇_z l_n‖ instead of its square: the solve sees √rhs",
            fisher(direction=_direction_from(_ngd.solve_damped_gram, rhs_map=np.sqrt)),
        ),
        "rhs_as_ones": (
            "the right-hand side ignored (EF's 1, as if the labels/s were lost)",
            fisher(direction=_direction_from(_ngd.solve_damped_gram, rhs_map=np.ones_like)),
        ),
        "solve_in_float32": (
            "the N×N solve in float32 (a single-precision solver; the spec: float64)",
            fisher(direction=float32_solve),
        ),
        "gram_in_param_dtype": ("the Gram returned in G's dtype, not float64", fisher(gram=gram_in_param_dtype)),
    }


# =============================================================================
# Registry
# =============================================================================
# Rule name -> its own mutants, beyond (or replacing) the shared ones. A rule of
# fisheropt.refimpl.RULES without an entry has the shared mutants alone.
RULE_MUTANTS: dict[str, Callable[[], dict[str, tuple[str, object]]]] = {
    "adam": lambda: _adam_family_mutants("adam"),
    "adamw": lambda: _adam_family_mutants("adamw"),
    "coupled_adam": lambda: _adam_family_mutants("coupled_adam"),
    "fadam": _fadam_mutants,
    "lion": _lion_mutants,
}

# Rule name -> its re-implementation with every switch off (default: the reference itself).
RULE_UNMUTATED: dict[str, Callable[[], object]] = {
    "adam": lambda: adam_family(),
    "adamw": lambda: adam_family(),
    "coupled_adam": lambda: adam_family(),
    "fadam": lambda: fadam(),
    "lion": lambda: lion(),
}

OTHER_MUTANTS: dict[str, Callable[[], dict[str, tuple[str, object]]]] = {
    "esimcse": _ema_mutants,
    "fisher": _fisher_mutants,
}


def rule_mutants(name: str) -> dict[str, tuple[str, object]]:
    """The mutants of rule ``name``'s suite: the shared ones that apply, then its own."""
    return {**shared_optimizer_mutants(name), **RULE_MUTANTS.get(name, dict)()}


# suite name -> a function returning {mutant name: (description, namespace)}: every rule of
# the registry, then the other suites.
REGISTRY: dict[str, Callable[[], dict[str, tuple[str, object]]]] = {
    **{name: functools.partial(rule_mutants, name) for name in RULES},
    **OTHER_MUTANTS,
}

# The unmutated re-implementations: they must reproduce the reference's bits.
UNMUTATED = {
    **{name: RULE_UNMUTATED.get(name, lambda: refimpl) for name in RULES},
    "esimcse": lambda: ema(),
    "fisher": lambda: fisher(),
}


def mutants(suite: str) -> dict[str, Mutant]:
    """{name: Mutant} for one suite (empty for a suite without an entry)."""
    entry = REGISTRY.get(suite)
    if entry is None:
        return {}
    return {name: Mutant(name, desc, ns) for name, (desc, ns) in entry().items()}


def kills(case: dict, namespace) -> list[str]:
    """Why ``namespace`` fails ``case`` (empty: it passes). An exception is a failure."""
    from . import run_case

    try:
        with np.errstate(all="ignore"):
            return run_case(case, namespace)
    except Exception as exc:  # noqa: BLE001 (a mutant may divide by zero, index out of range, ...)
        return [f"{case['name']}: raised {type(exc).__name__}: {exc}"]


def kill_matrix(suite: str, cases=None) -> dict[str, list[str]]:
    """mutant name -> names of the cases of ``suite`` that kill it."""
    from . import load_suite

    cases = cases if cases is not None else load_suite(suite)["cases"]
    return {name: [c["name"] for c in cases if kills(c, m.namespace)] for name, m in mutants(suite).items()}


def report(suites=None) -> str:
    """A plain-text table: per suite, each mutant, its description and the cases that kill it."""
    from . import SUITES

    lines = []
    for suite in suites or SUITES:
        table = kill_matrix(suite)
        if not table:
            continue
        killed = sum(1 for v in table.values() if v)
        lines.append(f"{suite}: {killed}/{len(table)} mutants killed ({100 * killed / len(table):.0f} %)")
        descs = {n: m.description for n, m in mutants(suite).items()}
        for name, by in table.items():
            lines.append(f"  {name:32s} {len(by):2d} cases  {descs[name]}")
    return "\n".join(lines)


__all__ = [
    "Mutant",
    "REGISTRY",
    "UNMUTATED",
    "RULE_MUTANTS",
    "RULE_UNMUTATED",
    "OTHER_MUTANTS",
    "mutants",
    "rule_mutants",
    "shared_optimizer_mutants",
    "kills",
    "kill_matrix",
    "report",
    "flush",
    "AdamKnobs",
    "FAdamKnobs",
    "LionKnobs",
    "adam_family",
    "fadam",
    "lion",
    "ema",
    "fisher",
]
