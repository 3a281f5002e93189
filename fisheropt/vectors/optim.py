"""Vector cases for the update rules of the registry (fisheropt.refimpl.RULES), by the reference.

Each case runs a short trajectory (several steps) of a rule's multi-tensor
``<rule>_step`` from fisheropt.refimpl and records params and state after
every step. Inputs are drawn from fixed seeds (or built element by element where
a case needs exact magnitudes).

Every rule gets the **common cases**, derived from its descriptor
(:class:`fisheropt.refimpl.rule.Rule`: step function, default hyperparameters,
state names, second moments, per-column state and tensor flag) by
:func:`common_cases`: step 1, zero gradients, resuming mid-run (step ≫ 1,
non-zero state, and parameters small enough that a bias correction shows in θ),
tiny and subnormal gradients, huge values, squares that overflow to +Inf (for a
rule with a second moment), other hyperparameters. What a rule adds is one
:class:`RuleVectors` entry in :data:`RULE_VECTORS` (all of it optional: a rule
without an entry gets the common cases alone): other hyperparameters, the
mutants each common case is written for, and cases of its own: for Adam L2 decay
that overflows; for FAdam c ≠ 1, p ≠ 0.5 and squares that underflow in float32
but not in float64; for Coupled Adam coupled and uncoupled tensors in one call
(``coupled`` stored explicitly) and column means whose float32 squares or sums
would overflow; for Lion sign arguments that are subnormal, infinite or NaN.

Every array gets its own tolerance (see :func:`_tolerances` and spec/vectors.md),
and every case lists the mutants (fisheropt.vectors.mutants) it must kill: the
ones it was designed for, plus the rule-based ones (:func:`rule_kills`; the
step-index mutants only for a rule whose step index matters, :attr:`CaseRule.step_matters`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fisheropt.refimpl import RULES

from . import bound, encode, tolerance, ulp

# ---- tolerances -------------------------------------------------------------------
# Elementwise arithmetic is in the parameter dtype and every backend follows the spec's
# order of operations, so state arrays agree to a few ulp of each element; a few units
# of the array's scale (eps·max|x|) allow FMA contraction or PyTorch's lerp form where
# terms cancel. θ_t = θ_{t-1} − Δθ_t: an error of a few ulp in Δθ (FAdam's reciprocal
# form, pow, float64 reductions summed in another order) moves θ by a few units of
# eps·max|Δθ|, and may flip the rounding of the subtraction (1 ulp of θ per step).
STATE_ULPS = 4
STATE_SCALE_UNITS = 4
THETA_ULPS_PER_STEP = 1
THETA_STEP_UNITS = 16
# A per-column state array (Coupled Adam's v̄) comes from a float64 column mean; summed in
# another order, its float64 value may differ by ~V·2^-53 relative (V ≤ 9 rows here).
PER_COLUMN_EXTRA_ULPS = 4

GENERAL_SHAPES = [(3, 4), (7,), (), (1,), (2, 3, 5)]
# A rule with a tensor flag (Coupled Adam's ``coupled``): flagged V×d tensors and unflagged
# ones (a 2-D one too) in every call.
FLAGGED_SHAPES = [(6, 4), (1, 3), (9, 5), (5, 3), (7,)]
FLAGS = [True, True, True, False, False]

STEP_MUTANTS = ("step_ahead", "step_behind")

_SHORT = {"float64": "f64", "float32": "f32"}


def _finite_max(arrays) -> float:
    vals = [np.abs(a[np.isfinite(a)]).max() for a in arrays if np.isfinite(a).any()]
    return float(max(vals)) if vals else 0.0


def _relative_ulp(scale, dtype) -> float:
    """ulp(scale)/scale: the relative precision of an array whose largest element is ``scale``
    (dtype eps for normal numbers, more for subnormal ones)."""
    return float(ulp(scale, dtype) / scale) if scale > 0 else 0.0


def _tolerances(rule, params0, expected, dtype, steps, flags):
    """One bound per array (params[i], state[k][i]), the same for every step.

    State: STATE_ULPS ulp of each element plus STATE_SCALE_UNITS·eps·max|x|. θ: one ulp of θ
    per step plus max|Δθ|·(THETA_STEP_UNITS·eps + STATE_ULPS·ulp(M)/M), M = max|m|: Δθ is
    proportional to m, so the error the tolerance of m allows moves θ accordingly; that term
    is ≈ eps for a normal m and larger only where m is subnormal (a 1-ulp change of a subnormal
    m that PyTorch's lerp form or an FMA may make changes Δθ by percent)."""
    eps = float(np.finfo(dtype).eps)
    state_order = rule.state_order
    tol = {"params": [], "state": {k: [] for k in state_order}}
    first_moment = state_order[0]
    for i, theta0 in enumerate(params0):
        traj = [theta0] + [e["params"][i] for e in expected]
        dtheta = [(b.astype(np.float64) - a.astype(np.float64)) for a, b in zip(traj, traj[1:])]
        m_scale = _finite_max([e["state"][first_moment][i] for e in expected])
        relative = THETA_STEP_UNITS * eps + STATE_ULPS * _relative_ulp(m_scale, dtype)
        tol["params"].append(tolerance(atol=_finite_max(dtheta) * relative, ulps=THETA_ULPS_PER_STEP * steps + 1))
        for k in state_order:
            ulps = STATE_ULPS
            if k in rule.per_column and flags[i]:
                ulps += PER_COLUMN_EXTRA_ULPS
            scale = _finite_max([e["state"][k][i] for e in expected])
            tol["state"][k].append(tolerance(atol=STATE_SCALE_UNITS * eps * scale, ulps=ulps))
    return tol


def _is_subnormal(a) -> bool:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return False
    x = np.abs(a[np.isfinite(a)])
    return bool(np.any((x > 0) & (x < np.finfo(a.dtype).tiny)))


def _walk_arrays(tree):
    if isinstance(tree, np.ndarray):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _walk_arrays(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _walk_arrays(v)


def data_tags(inputs, expected) -> list[str]:
    """The tags that follow from the data: "resume" (first step > 1), "subnormal" (a subnormal
    value in an input or a result), "nonfinite" (an Inf or NaN in a result)."""
    tags = []
    if inputs.get("first_step", 1) > 1:
        tags.append("resume")
    if any(_is_subnormal(a) for a in _walk_arrays([inputs, expected])):
        tags.append("subnormal")
    if any(not np.isfinite(a).all() for a in _walk_arrays(expected) if a.dtype.kind == "f"):
        tags.append("nonfinite")
    return tags


def theta_moves(params0, expected, tol) -> bool:
    """Whether some element of θ leaves its input value by more than its tolerance (or
    becomes NaN or ±Inf)."""
    for i, theta0 in enumerate(params0):
        t0 = theta0.astype(np.float64)
        for e in expected:
            th = e["params"][i].astype(np.float64)
            if not np.array_equal(np.isfinite(th), np.isfinite(t0)):
                return True
            ok = np.isfinite(th)
            if np.any(np.abs(th[ok] - t0[ok]) > bound(th[ok], tol["params"][i], theta0.dtype)):
                return True
    return False


def rule_kills(tags, moves: bool, *, ftz="flush_to_zero", never="never_update_theta", steps=STEP_MUTANTS):
    """Mutants a case must kill because of what it is (spec/vectors.md, "Mutants"): every
    resume case the step-index mutants (``steps``: empty for a rule whose step index does not
    matter), every case with a subnormal the flush-to-zero mutant, every case in which θ moves
    the never-update mutant."""
    kills = []
    if "resume" in tags and steps:
        kills += list(steps)
    if "subnormal" in tags and ftz:
        kills.append(ftz)
    if moves and never:
        kills.append(never)
    return kills


def _case(rule, name, hyperparams, params, state, grads, first_step, *, description, tags=(), kills=()):
    """Run the reference over the trajectory and build the case."""
    dt = params[0].dtype
    state_order = rule.state_order
    inputs = {
        "params": [p.copy() for p in params],
        "state": {k: [a.copy() for a in v] for k, v in state.items()},
        "grads": grads,
        "first_step": first_step,
    }
    work = [p.copy() for p in params]
    current = [[a.copy() for a in state[k]] for k in state_order]
    expected = []
    with np.errstate(all="ignore"):  # overflow cases overflow on purpose
        for offset, g in enumerate(grads):
            rule.descriptor.step(work, [x.copy() for x in g], *current, step=first_step + offset, **hyperparams)
            expected.append(
                {
                    "params": [p.copy() for p in work],
                    "state": {k: [a.copy() for a in current[i]] for i, k in enumerate(state_order)},
                }
            )
    flags = hyperparams.get(rule.flag, [False] * len(params)) if rule.flag else [False] * len(params)
    tol = _tolerances(rule, params, expected, dt, len(grads), flags)
    all_tags = list(dict.fromkeys(list(tags) + data_tags(inputs, expected)))
    moves = theta_moves(params, expected, tol)
    if not moves:
        all_tags.append("theta_static")
    steps = STEP_MUTANTS if rule.step_matters else ()
    all_kills = list(dict.fromkeys(rule_kills(all_tags, moves, steps=steps) + list(kills)))
    return {
        "name": name,
        "kind": "optimizer",
        "function": rule.function,
        "dtype": dt.name,
        "description": description,
        "tags": all_tags,
        "kills": all_kills,
        "state_order": list(state_order),
        "hyperparams": hyperparams,
        "tolerance": tol,
        "inputs": encode(inputs),
        "expected": encode(expected),
    }


# ---- rules ------------------------------------------------------------------------
class CaseRule:
    """What the cases need to know about one update rule, all of it read from its descriptor
    (a :class:`fisheropt.refimpl.rule.Rule`): the step function, the default hyperparameters
    (pairs split as the step functions take them), the state names in signature order, which
    state arrays are second moments (non-negative, of the size of g²) or per column of a
    flagged tensor, and the tensor flag. ``shapes``/``flags``: the tensors of every call
    (default: five tensors of assorted ranks; with a tensor flag, three flagged V×d and two
    unflagged ones); ``overflow_tensors``: the tensors whose g² overflows in the
    square_overflows case; ``tiny_theta(g)``: the size of θ in the tiny and subnormal cases."""

    def __init__(self, descriptor, *, shapes=None, flags=None, overflow_tensors=(0,), tiny_theta=None):
        self.descriptor = descriptor
        self.function = descriptor.step_function
        self.state_order = descriptor.state_names
        self.hp = descriptor.kernel_kwargs(descriptor.defaults())
        self.flag = descriptor.tensor_flag.name if descriptor.tensor_flag else None
        self.shapes = shapes or (FLAGGED_SHAPES if self.flag else GENERAL_SHAPES)
        self.flags: list[bool] = list(flags or FLAGS) if self.flag else []  # one per tensor, where flagged
        self.second_moments = {s.name for s in descriptor.state if s.second_moment}
        self.per_column = {s.name for s in descriptor.state if s.per_column}
        self.overflow_tensors = overflow_tensors
        # θ for the tiny and subnormal cases: by default the size of one step, lr·g/ε for a rule
        # with an ε (Adam's step), else ten steps of lr (a step of a sign rule is lr).
        lr, eps = self.hp.get("lr", 1e-3), self.hp.get("eps")
        self.tiny_theta = tiny_theta or ((lambda g: lr * g / eps) if eps else (lambda g: 10 * lr))

    @functools.cached_property
    def step_matters(self) -> bool:
        """Whether the step index enters the rule: the reference, run from the same non-zero
        state and gradients at steps 1, 2, 999, 1000 and 1001 (float64), gives different bits.
        Lion has no bias correction: its step index does not matter, and its suite has no
        step-index mutants."""
        rng = np.random.default_rng(0)
        dt = np.dtype(np.float64)
        params, state, grads = (
            _draw(rng, self.shapes, 1.0, dt),
            self.resumed_state(rng, dt, 1.0),
            _draw(rng, self.shapes, 1.0, dt),
        )
        results = set()
        for t in (1, 2, 999, 1000, 1001):
            work = [p.copy() for p in params]
            current = [[a.copy() for a in state[k]] for k in self.state_order]
            with np.errstate(all="ignore"):
                self.descriptor.step(work, [g.copy() for g in grads], *current, step=t, **self.hyperparams())
            results.add(b"".join(a.tobytes() for a in [*work, *(x for lst in current for x in lst)]))
        return len(results) > 1

    def hyperparams(self, **over):
        hp = {**self.hp, **over}
        if self.flag is not None:
            hp[self.flag] = list(self.flags)
        return hp

    def state_shape(self, k, i, shape):
        if self.flag is not None and k in self.per_column and self.flags[i]:
            return (shape[1],)
        return shape

    def zero_state(self, dt, shapes=None):
        shapes = shapes or self.shapes
        return {k: [np.zeros(self.state_shape(k, i, s), dt) for i, s in enumerate(shapes)] for k in self.state_order}

    def resumed_state(self, rng, dt, grad_scale, shapes=None):
        """Plausible non-zero state (second moments non-negative, of the size of g²; others ~0.1·g)."""
        shapes = shapes or self.shapes
        state = {}
        for k in self.state_order:
            arrays = []
            for i, s in enumerate(shapes):
                d = rng.standard_normal(self.state_shape(k, i, s)) * grad_scale
                arrays.append(np.asarray(d * d if k in self.second_moments else d * 0.1, dtype=dt))
            state[k] = arrays
        return state

    def case(self, name, dt, *, params, grads, state=None, first_step=1, hp=None, description, tags=(), kills=()):
        return _case(
            self,
            name,
            hp or self.hyperparams(),
            params,
            state if state is not None else self.zero_state(dt),
            grads,
            first_step,
            description=description,
            tags=tags,
            kills=kills,
        )


def _draw(rng, shapes, scale, dt):
    with np.errstate(under="ignore"):
        return [np.asarray(rng.standard_normal(s) * scale, dtype=dt) for s in shapes]


def _draws(rng, shapes, scale, dt, steps):
    return [_draw(rng, shapes, scale, dt) for _ in range(steps)]


# Magnitudes per dtype. "tiny": g normal, g² (so v, f) subnormal; Δθ ≈ lr·g/ε, so θ is drawn
# at that size to move visibly. "subnormal": g itself subnormal. "huge": g² finite but huge.
# "overflow": g² = +Inf, (1 − β₂)·g² finite (so ((1 − β₂)·g)·g does not overflow).
TINY_G = {"float64": 1e-155, "float32": 1e-20}
SUBNORMAL_G = {"float64": 1e-310, "float32": 1e-40}
HUGE_G = {"float64": 1e150, "float32": 1e18}
OVERFLOW_G = {"float64": (1.4e154, 1.7e154), "float32": (1.9e19, 2.5e19)}


def _overflow_grads(rng, shapes, dt, steps, big, big_step):
    """Normal gradients, but the tensors ``big`` at step ``big_step`` have |g| with g² = +Inf."""
    grads = _draws(rng, shapes, 1.0, dt, steps)
    lo, hi = OVERFLOW_G[np.dtype(dt).name]
    for i in big:
        s = shapes[i]
        sign = np.where(rng.standard_normal(s) < 0, -1.0, 1.0)
        grads[big_step][i] = np.asarray(sign * rng.uniform(lo, hi, s), dtype=dt)
    return grads


def shared_kills(rule: CaseRule) -> dict:
    """Case stem -> the shared mutants (fisheropt.vectors.mutants.shared_optimizer_mutants) that
    the common case is written for, whatever the rule: ``basic`` kills β₁/β₂ swapped (where the
    rule has both) and the doubled state (where it has state)."""
    basic = []
    if {"beta1", "beta2"} <= set(rule.hp):
        basic.append("betas_swapped")
    if rule.state_order:
        basic.append("state_doubled")
    return {"basic": basic}


#: the mutants a case is written for: a list, or a function of the dtype name
Kills = Sequence[str] | Callable[[str], Sequence[str]]


def common_cases(
    rule: CaseRule, other_hp: dict, *, extra_kills: dict[str, Kills] | None = None, case_hp=None, descriptions=None
):
    """The cases every rule has, for float64 and float32, derived from the rule's descriptor.
    ``extra_kills``: case stem -> mutants (beyond the rule-based and shared ones) that the rule's
    version of that case is for (a list, or a function of the dtype name); ``case_hp``: case stem
    -> hyperparameters that replace the defaults there; ``descriptions``: case stem -> text that
    replaces the generic description. The square_overflows case exists for a rule with a second
    moment only (a square to overflow)."""
    extra_kills = extra_kills or {}
    case_hp = case_hp or {}
    descriptions = descriptions or {}
    shared = shared_kills(rule)
    squares = bool(rule.second_moments)
    cases = []
    shapes = rule.shapes
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        short = _SHORT[dtype]

        def kills(stem, dtype=dtype):
            k = extra_kills.get(stem, ())
            return list(k(dtype) if callable(k) else k) + shared.get(stem, [])

        def hp(stem):
            return rule.hyperparams(**case_hp[stem]) if stem in case_hp else None

        def text(stem, default):
            return descriptions.get(stem, default)

        rng = np.random.default_rng(1)
        cases.append(
            rule.case(
                f"{short}_basic",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, 1.0, dt, 4),
                hp=hp("basic"),
                description=text("basic", "four steps from zero state, unit-scale θ and g"),
                kills=kills("basic"),
            )
        )

        rng = np.random.default_rng(2)
        cases.append(
            rule.case(
                f"{short}_zero_grads_from_step1",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=[[np.zeros(s, dt) for s in shapes] for _ in range(2)],
                hp=hp("zero_grads"),
                description=text(
                    "zero_grads", "g = 0 at steps 1 and 2: nothing may divide 0 by 0; only weight decay moves θ"
                ),
                kills=kills("zero_grads"),
            )
        )

        rng = np.random.default_rng(3)
        cases.append(
            rule.case(
                f"{short}_resume_at_step_1000",
                dt,
                params=_draw(rng, shapes, 1e-3, dt),
                state=rule.resumed_state(rng, dt, 1.0),
                grads=_draws(rng, shapes, 1.0, dt, 3),
                first_step=1000,
                hp=hp("resume"),
                description=text(
                    "resume",
                    "steps 1000-1002 from non-zero state; θ of the size of one step, so the "
                    "bias corrections of t = 1000 (not 999 or 1001) show in θ"
                    if rule.step_matters
                    else "steps 1000-1002 from non-zero state; θ of the size of a few steps (the step "
                    "index does not enter this rule)",
                ),
                kills=kills("resume"),
            )
        )

        rng = np.random.default_rng(4)
        g = TINY_G[dtype]
        cases.append(
            rule.case(
                f"{short}_tiny",
                dt,
                params=_draw(rng, shapes, rule.tiny_theta(g), dt),
                grads=_draws(rng, shapes, g, dt, 3),
                hp=hp("tiny"),
                description=text(
                    "tiny",
                    f"|g| ~ {g:g}: g is normal"
                    + (", g² is subnormal" if squares else "")
                    + f"; θ ~ {rule.tiny_theta(g):g}, so it moves visibly",
                ),
                tags=["tiny"],
                kills=kills("tiny"),
            )
        )

        rng = np.random.default_rng(10)
        g = SUBNORMAL_G[dtype]
        cases.append(
            rule.case(
                f"{short}_subnormal_grads",
                dt,
                params=_draw(rng, shapes, rule.tiny_theta(g), dt),
                grads=_draws(rng, shapes, g, dt, 3),
                hp=hp("subnormal"),
                description=text(
                    "subnormal",
                    f"|g| ~ {g:g}: subnormal gradients (flush-to-zero loses them); θ ~ {rule.tiny_theta(g):g}",
                ),
                tags=["tiny"],
                kills=kills("subnormal"),
            )
        )

        rng = np.random.default_rng(5)
        g = HUGE_G[dtype]
        cases.append(
            rule.case(
                f"{short}_huge",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, g, dt, 3),
                hp=hp("huge"),
                description=text(
                    "huge",
                    f"|g| ~ {g:g}: "
                    + ("g² huge but finite" if squares else "huge but finite")
                    + "; unit-scale θ still moves visibly",
                ),
                tags=["huge"],
                kills=kills("huge"),
            )
        )

        if squares:
            rng = np.random.default_rng(11)
            cases.append(
                rule.case(
                    f"{short}_square_overflows",
                    dt,
                    params=_draw(rng, shapes, 1.0, dt),
                    grads=_overflow_grads(rng, shapes, dt, 3, big=rule.overflow_tensors, big_step=1),
                    hp=hp("overflow"),
                    description=text(
                        "overflow",
                        f"tensor(s) {', '.join(map(str, rule.overflow_tensors))} at step 2 "
                        "have g² = +Inf (IEEE): their second moment becomes +Inf and stays "
                        "so, and θ stops there; (1 − β₂)·g² computed as ((1 − β₂)·g)·g "
                        "would not overflow",
                    ),
                    tags=["overflow"],
                    kills=kills("overflow"),
                )
            )

        rng = np.random.default_rng(6)
        cases.append(
            rule.case(
                f"{short}_other_hyperparams",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, 1.0, dt, 4),
                hp=rule.hyperparams(**other_hp),
                description=text(
                    "other", "other hyperparameters: " + ", ".join(f"{k} = {v:g}" for k, v in other_hp.items())
                ),
                kills=kills("other"),
            )
        )
    return cases


def _valid(h, x) -> bool:
    """x is a valid value of ``h``, and within its typical range where it has one."""
    if h.low is not None and (x < h.low or (h.low_open and x == h.low)):
        return False
    if h.high is not None and (x > h.high or (h.high_open and x == h.high)):
        return False
    typical = getattr(h, "typical", None)
    return typical is None or typical[0] <= x <= typical[1]


def derived_other_hyperparams(descriptor) -> dict:
    """Kernel hyperparameters other than the defaults, for a rule without its own choice: a
    factor in [0, 1) moves five times as far from 1 (β = 0.9 → 0.5, 0.999 → 0.995), a zero
    becomes 0.1, anything else is multiplied by 5 (each within its valid and typical range,
    else halved, else 0.5 for a factor)."""
    out = {}
    for h in descriptor.hyperparams:
        values = h.default if h.names else (h.default,)
        new = []
        for v in values:
            if h.high is not None and h.high <= 1 and (h.low or 0) >= 0:
                candidates = [1 - 5 * (1 - v), v / 2, 0.5]
            else:
                candidates = [5 * v if v else 0.1, v / 2]
            new.append(next(float(f"{x:.12g}") for x in candidates if f"{x:.12g}" != f"{v:.12g}" and _valid(h, x)))
        out.update(zip(h.kernel_names, new))
    return out


# ---- what each rule adds ----------------------------------------------------------------
@dataclass(frozen=True)
class RuleVectors:
    """What the vectors of one rule add to the common cases derived from its descriptor. All
    optional: a rule without an entry in :data:`RULE_VECTORS` gets the common cases, with
    :func:`derived_other_hyperparams`, and the shared mutants."""

    other_hp: dict | None = None  # the other_hyperparams case (None: derived)
    kills: dict = field(default_factory=dict)  # common case stem -> mutants (or dtype -> mutants)
    case_hp: dict = field(default_factory=dict)  # common case stem -> hyperparameters replacing the defaults
    descriptions: dict = field(default_factory=dict)  # common case stem -> description
    overflow_tensors: tuple = (0,)
    tiny_theta: Callable | None = None
    extra_cases: Callable | None = None  # (CaseRule) -> the rule's own cases, after the common ones


def _f32_only(*names):
    return lambda dtype: list(names) if dtype == "float32" else []


ADAM_FAMILY_KILLS = {
    "basic": lambda dtype: (
        ["no_bias_correction", "bias_correction_twice", "betas_swapped", "state_doubled"]
        + (["scalars_in_param_dtype"] if dtype == "float32" else ["eps_inside_sqrt"])
    ),
    "other": ["eps_inside_sqrt"],
    "overflow": ["square_after_scaling"],
}


def _adam_cases(rule):
    cases = []
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        rng = np.random.default_rng(12)
        # L2 decay overflows: g + λθ = ±Inf, so m = ±Inf, v = +Inf and θ = NaN (Inf/Inf) there.
        big = np.finfo(dt).max
        params = _draw(rng, GENERAL_SHAPES, 1.0, dt)
        params[0][0, :2] = np.asarray([big * 0.9, -big * 0.9], dtype=dt)
        grads = _draws(rng, GENERAL_SHAPES, 1.0, dt, 2)
        grads[0][0][0, :2] = np.asarray([big * 0.9, -big * 0.9], dtype=dt)
        cases.append(
            rule.case(
                f"{_SHORT[dtype]}_decay_overflows",
                dt,
                params=params,
                grads=grads,
                hp=rule.hyperparams(weight_decay=0.5),
                description="two elements with g + λθ = ±Inf at step 1: m = ±Inf, v = +Inf, θ = NaN there "
                "(IEEE); every other element is finite and moves",
                tags=["overflow"],
                kills=["decay_decoupled"],
            )
        )
    return cases


def _coupled_adam_cases(rule):
    # Column means whose float32 squares or float32 sums overflow, while the float64 mean fits.
    dt = np.dtype(np.float32)
    rng = np.random.default_rng(13)
    shapes = [(9, 5), (5, 3)]
    flags = [True, False]
    params = _draw(rng, shapes, 1.0, dt)
    grads = _draws(rng, shapes, 1.0, dt, 3)
    g = grads[1][0]
    g[4, 0] = 2.2e19  # g² = 4.8e38 > float32 max; the column mean 5.4e37 fits
    g[:, 1] = np.asarray(rng.uniform(1.2e19, 1.3e19, 9) * np.sign(rng.standard_normal(9)), dtype=dt)
    # column 1: every g² ≈ 1.5e38 fits, their float32 sum does not; the mean does
    sub = CaseRule(rule.descriptor, shapes=shapes, flags=flags)
    return [
        sub.case(
            "f32_column_mean_needs_float64",
            dt,
            params=params,
            grads=grads,
            description="step 2: one column holds a g with g² > float32 max, another nine g with g² ≈ 1.5e38; "
            "squared and summed in float64 both column means fit in float32",
            tags=["overflow"],
            kills=["squares_in_float32", "reduction_in_float32"],
        )
    ]


def _fadam_cases(rule):
    cases = []
    shapes = GENERAL_SHAPES
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        short = _SHORT[dtype]
        rng = np.random.default_rng(7)
        # clip = 2 makes max(1, RMS/c) and max(1, RMS)/c differ: catches the common port bug.
        cases.append(
            rule.case(
                f"{short}_clip_2",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, 1.0, dt, 3),
                hp=rule.hyperparams(clip=2.0),
                description="c = 2: max(1, RMS/c) and max(1, RMS)/c differ",
                tags=["clip"],
                kills=["clip_form"],
            )
        )
        rng = np.random.default_rng(8)
        # p = 1: the full Fisher inverse (no square root).
        cases.append(
            rule.case(
                f"{short}_p_1",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, 1.0, dt, 3),
                hp=rule.hyperparams(p=1.0),
                description="p = 1: f^p = f",
                kills=["p_ignored"],
            )
        )
        rng = np.random.default_rng(14)
        # p = 0.75, c = 3: RMS(ḡ) < c, where max(1, RMS/c) = 1 but max(1, RMS)/c < 1.
        cases.append(
            rule.case(
                f"{short}_p_0p75_clip_3",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, 1.0, dt, 3),
                hp=rule.hyperparams(p=0.75, clip=3.0),
                description="p = 0.75, c = 3: RMS(ḡ) < c, so the two clip forms differ, and f^p is a pow",
                tags=["clip"],
                kills=["p_ignored", "clip_form"],
            )
        )
        rng = np.random.default_rng(9)
        # g² underflows to 0 in the parameter dtype; only ε_t keeps f^p + ε_t positive. In float32
        # g² also underflows when formed in float32 for RMS(g), but not in float64.
        g = 1e-170 if dtype == "float64" else 1e-25
        cases.append(
            rule.case(
                f"{short}_grad_squares_underflow",
                dt,
                params=_draw(rng, shapes, 1.0, dt),
                grads=_draws(rng, shapes, g, dt, 2),
                description=f"|g| ~ {g:g}: g² = 0 in the parameter dtype; RMS(g) (squares formed in float64) "
                "is not 0 in float32, 0 in float64 (so ε_t = ε^{2p})",
                tags=["tiny"],
                kills=(
                    ["squares_in_float32", "reduction_in_float32", "eps_constant"]
                    if dtype == "float32"
                    else ["eps_unguarded"]
                ),
            )
        )
    return cases


# Lion: the decay and the nonfinite cases use λ = 0.1 (the default λ = 0 would hide the decay).
LION_DECAY = 0.1


def _near_tiny(rng, shapes, dt):
    """Normal g of 1 to 8 times the smallest normal number: (1 − β₁)·g and (1 − β₂)·g are subnormal."""
    tiny = float(np.finfo(dt).tiny)
    return [
        np.asarray(np.where(rng.standard_normal(s) < 0, -1.0, 1.0) * rng.uniform(1, 8, s) * tiny, dtype=dt)
        for s in shapes
    ]


def _lion_cases(rule):
    """Sign arguments that are subnormal (a flush-to-zero build makes them 0), ±Inf (sign ±1,
    θ finite, m = ±Inf from then on) and NaN (sign(NaN) = NaN: θ and m NaN there), for
    float64 and float32 (spec/lion.md, "Edge cases")."""
    cases = []
    shapes = rule.shapes
    hp = rule.hyperparams(weight_decay=LION_DECAY)
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        short = _SHORT[dtype]
        tiny = float(np.finfo(dt).tiny)
        big = 0.9 * float(np.finfo(dt).max)

        rng = np.random.default_rng(20)
        params = _draw(rng, shapes, 1e-3, dt)
        cases.append(
            rule.case(
                f"{short}_sign_argument_subnormal",
                dt,
                params=params,
                grads=[_near_tiny(rng, shapes, dt) for _ in range(3)],
                description=f"|g| of 1 to 8 × {tiny:g} (normal): c = (1 − β₁)·g at step 1 and m are subnormal, "
                "and sign(c) = ±1 moves θ by α; flushed to zero, c = 0 and θ stays",
                tags=["tiny"],
            )
        )

        rng = np.random.default_rng(21)
        params = _draw(rng, shapes, 1.0, dt)
        state = rule.resumed_state(rng, dt, 1.0)
        grads = _draws(rng, shapes, 1.0, dt, 3)
        g0, m0 = grads[0][0], state["m"][0]
        g0[0, :2] = [np.inf, -np.inf]  # c = ±Inf: θ moves by α; m = ±Inf and stays
        m0[1, :2] = [-big, big]  # huge m and g of opposite signs: c = ∓0.72·max,
        g0[1, :2] = [big, -big]  # while g − m overflows
        cases.append(
            rule.case(
                f"{short}_infinite_grads",
                dt,
                params=params,
                state=state,
                grads=grads,
                first_step=1000,
                hp=hp,
                description="step 1: g = ±Inf at two elements: c = ±Inf, sign(c) = ±1, θ moves by α(±1 + λθ) and "
                "stays finite, m = ±Inf and stays so; two elements with m = ∓0.9·max, g = ±0.9·max: "
                "c = ∓0.72·max is finite (g − m is not)",
                tags=["overflow"],
                kills=["lerp_form"],
            )
        )

        rng = np.random.default_rng(22)
        params = _draw(rng, shapes, 1.0, dt)
        state = rule.resumed_state(rng, dt, 1.0)
        grads = _draws(rng, shapes, 1.0, dt, 3)
        m0 = state["m"][0]
        grads[0][0][0, 2] = np.nan  # NaN gradient: c, θ, m NaN from step 1 on
        m0[2, 0] = np.nan  # NaN momentum: the same
        m0[2, 1] = np.inf  # m = +Inf: c = +Inf at step 1 (θ moves by α) ...
        grads[1][0][2, 1] = -np.inf  # ... and Inf − Inf = NaN at step 2
        grads[0][0][2, 2], grads[1][0][2, 2] = np.inf, -np.inf  # m = +Inf after step 1, NaN after step 2
        cases.append(
            rule.case(
                f"{short}_nan_placement",
                dt,
                params=params,
                state=state,
                grads=grads,
                first_step=1000,
                hp=hp,
                description="sign(NaN) = NaN: a NaN gradient or momentum makes c, θ and m NaN at that element "
                "from then on, as does c = Inf − Inf (m = +Inf meeting g = −Inf); every other element "
                "stays finite",
                tags=["nan"],
                kills=["sign_of_nan"],
            )
        )
    return cases


#: Rule name -> what its vectors add to the common cases. A rule of fisheropt.refimpl.RULES
#: without an entry still gets a suite (common cases, derived other hyperparameters).
RULE_VECTORS: dict[str, RuleVectors] = {
    "adam": RuleVectors(
        other_hp={"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1},
        kills={**ADAM_FAMILY_KILLS, "other": ["eps_inside_sqrt", "decay_decoupled"]},
        extra_cases=_adam_cases,
    ),
    "adamw": RuleVectors(
        other_hp={"lr": 0.05, "beta1": 0.0, "beta2": 0.5, "eps": 1e-3, "weight_decay": 0.5},
        kills={**ADAM_FAMILY_KILLS, "other": ["eps_inside_sqrt", "decay_coupled", "decay_not_scaled_by_lr"]},
    ),
    "coupled_adam": RuleVectors(
        other_hp={"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.2},
        kills={
            **ADAM_FAMILY_KILLS,
            "basic": lambda dtype: (
                ADAM_FAMILY_KILLS["basic"](dtype) + ["mean_over_columns", "couple_m", "uncoupled_as_coupled"]
            ),
        },
        overflow_tensors=(0, 3),  # one coupled, one uncoupled
        extra_cases=_coupled_adam_cases,
    ),
    "fadam": RuleVectors(
        other_hp={
            "lr": 0.05,
            "beta1": 0.5,
            "beta2": 0.9,
            "eps": 1e-4,
            "eps2": 0.1,
            "clip": 0.5,
            "p": 0.25,
            "weight_decay": 0.5,
        },
        kills={
            "basic": lambda dtype: (
                [
                    "betas_swapped",
                    "momentum_before_preconditioning",
                    "decay_not_preconditioned",
                    "beta2_not_debiased",
                    "momentum_bias_corrected",
                    "old_fisher",
                    "state_doubled",
                ]
                + (["scalars_in_param_dtype"] if dtype == "float32" else [])
            ),
            "zero_grads": ["eps_unguarded"],
            "overflow": ["square_after_scaling"],
            "other": ["p_ignored", "no_clip"],
            "subnormal": _f32_only("eps_no_normal_floor"),
        },
        # θ ~ 1e-2 in the tiny cases: there w̄ = θ/(f^p + ε_t) is huge and clipped, so the decay
        # moves θ by α·λ·c·θ/RMS(θ) per step; a θ much smaller than that would flip sign every step
        # (and amplify rounding differences), a θ much larger would overflow w̄ in float32.
        tiny_theta=lambda g: 1e-2,
        extra_cases=_fadam_cases,
    ),
    "lion": RuleVectors(
        # λ ≠ 0 and α large enough that α²λ (decay after the sign step) shows in float32;
        # β₂ = 0.999, whose 1 − β₂ in float32 arithmetic is off by 1e-5 relative.
        other_hp={"lr": 0.01, "beta1": 0.95, "beta2": 0.999, "weight_decay": 0.5},
        case_hp={"zero_grads": {"weight_decay": LION_DECAY}},
        descriptions={
            "zero_grads": f"g = 0 at steps 1 and 2 from zero state: c = 0 exactly and sign(0) = 0, "
            f"so only the decay (λ = {LION_DECAY:g}) moves θ"
        },
        kills={
            "basic": ["momentum_before_sign"],
            "zero_grads": ["sign_of_zero", "decay_not_scaled_by_lr"],
            "other": lambda dtype: (
                ["decay_after_sign", "decay_not_scaled_by_lr", "decay_coupled"]
                + (["scalars_in_param_dtype"] if dtype == "float32" else [])
            ),
        },
        extra_cases=_lion_cases,
    ),
}


def case_rule(name: str, entry: RuleVectors | None = None) -> CaseRule:
    entry = entry if entry is not None else RULE_VECTORS.get(name, RuleVectors())
    return CaseRule(RULES[name], overflow_tensors=entry.overflow_tensors, tiny_theta=entry.tiny_theta)


def rule_cases(name: str, entry: RuleVectors | None = None) -> list[dict]:
    """Every case of the suite of rule ``name`` (a key of fisheropt.refimpl.RULES): the common
    cases, then the rule's own. ``entry`` replaces the rule's :data:`RULE_VECTORS` entry (a bare
    ``RuleVectors()`` gives the suite a new rule would have with no entry at all)."""
    entry = entry if entry is not None else RULE_VECTORS.get(name, RuleVectors())
    rule = case_rule(name, entry)
    other_hp = entry.other_hp if entry.other_hp is not None else derived_other_hyperparams(rule.descriptor)
    cases = common_cases(
        rule, other_hp, extra_kills=entry.kills, case_hp=entry.case_hp, descriptions=entry.descriptions
    )
    if entry.extra_cases is not None:
        cases += entry.extra_cases(rule)
    return cases
