"""Vector cases for the four update rules, computed by the reference.

Each case runs a short trajectory (several steps) of a rule's multi-tensor
``<rule>_step`` from fisheropt.refimpl and records params and state after
every step. Inputs are drawn from fixed seeds (or built element by element where
a case needs exact magnitudes). The edge cases are the ones implementations get
wrong: step 1, zero gradients, resuming mid-run (step ≫ 1, non-zero state, and
parameters small enough that the bias correction shows in θ), tiny values whose
squares are subnormal, subnormal gradients, huge values, squares that overflow
to +Inf (and the NaN that follows where IEEE says so), other hyperparameters;
for FAdam also c ≠ 1, p ≠ 0.5 and squares that underflow in float32 but not in
float64; for Coupled Adam coupled and uncoupled tensors in one call (``coupled``
stored explicitly) and column means whose float32 squares or sums would overflow.

Every array gets its own tolerance (see :func:`_tolerances` and spec/vectors.md),
and every case lists the mutants (fisheropt.vectors.mutants) it must kill: the
ones it was designed for, plus the rule-based ones (:func:`rule_kills`).
"""
from __future__ import annotations

import numpy as np

from fisheropt import refimpl

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
# Coupled Adam's v̄ comes from a float64 column mean; summed in another order, its
# float64 value may differ by ~V·2^-53 relative (V ≤ 9 rows here).
COUPLED_V_EXTRA_ULPS = 4

ADAM_HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
FADAM_HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "eps2": 0.01, "clip": 1.0,
            "p": 0.5, "weight_decay": 0.1}

GENERAL_SHAPES = [(3, 4), (7,), (), (1,), (2, 3, 5)]
# Coupled Adam: coupled V×d tensors and uncoupled ones (a 2-D one too) in every call.
COUPLED_SHAPES = [(6, 4), (1, 3), (9, 5), (5, 3), (7,)]
COUPLED_FLAGS = [True, True, True, False, False]

STEP_MUTANTS = ("step_ahead", "step_behind")

_SHORT = {"float64": "f64", "float32": "f32"}


def _finite_max(arrays) -> float:
    vals = [np.abs(a[np.isfinite(a)]).max() for a in arrays if np.isfinite(a).any()]
    return float(max(vals)) if vals else 0.0


def _relative_ulp(scale, dtype) -> float:
    """ulp(scale)/scale: the relative precision of an array whose largest element is ``scale``
    (dtype eps for normal numbers, more for subnormal ones)."""
    return float(ulp(scale, dtype) / scale) if scale > 0 else 0.0


def _tolerances(function, state_order, params0, expected, dtype, steps, coupled):
    """One bound per array (params[i], state[k][i]), the same for every step.

    State: STATE_ULPS ulp of each element plus STATE_SCALE_UNITS·eps·max|x|. θ: one ulp of θ
    per step plus max|Δθ|·(THETA_STEP_UNITS·eps + STATE_ULPS·ulp(M)/M), M = max|m|: Δθ is
    proportional to m, so the error the tolerance of m allows moves θ accordingly; that term
    is ≈ eps for a normal m and larger only where m is subnormal (a 1-ulp change of a subnormal
    m that PyTorch's lerp form or an FMA may make changes Δθ by percent)."""
    eps = float(np.finfo(dtype).eps)
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
            if function == "coupled_adam_step" and k == "v" and coupled[i]:
                ulps += COUPLED_V_EXTRA_ULPS
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
    resume case the step-index mutants, every case with a subnormal the flush-to-zero mutant,
    every case in which θ moves the never-update mutant."""
    kills = []
    if "resume" in tags:
        kills += list(steps)
    if "subnormal" in tags and ftz:
        kills.append(ftz)
    if moves and never:
        kills.append(never)
    return kills


def _case(name, function, state_order, hyperparams, params, state, grads, first_step, *,
          description, tags=(), kills=()):
    """Run the reference over the trajectory and build the case."""
    dt = params[0].dtype
    inputs = {"params": [p.copy() for p in params], "state": {k: [a.copy() for a in v] for k, v in state.items()},
              "grads": grads, "first_step": first_step}
    step_fn = getattr(refimpl, function)
    work = [p.copy() for p in params]
    current = [[a.copy() for a in state[k]] for k in state_order]
    expected = []
    with np.errstate(all="ignore"):  # overflow cases overflow on purpose
        for offset, g in enumerate(grads):
            step_fn(work, [x.copy() for x in g], *current, step=first_step + offset, **hyperparams)
            expected.append({"params": [p.copy() for p in work],
                             "state": {k: [a.copy() for a in current[i]] for i, k in enumerate(state_order)}})
    coupled = hyperparams.get("coupled", [False] * len(params))
    tol = _tolerances(function, state_order, params, expected, dt, len(grads), coupled)
    all_tags = list(dict.fromkeys(list(tags) + data_tags(inputs, expected)))
    moves = theta_moves(params, expected, tol)
    if not moves:
        all_tags.append("theta_static")
    all_kills = list(dict.fromkeys(rule_kills(all_tags, moves) + list(kills)))
    return {
        "name": name,
        "kind": "optimizer",
        "function": function,
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
class Rule:
    """What the generic cases need to know about one update rule."""

    def __init__(self, function, state_order, hp, shapes, *, coupled=None, second_moment="v",
                 overflow_tensors=(0,), tiny_theta=None):
        self.overflow_tensors = overflow_tensors
        # θ for the tiny and subnormal cases: by default the size of one Adam step, lr·g/ε.
        self.tiny_theta = tiny_theta or (lambda g: 1e-3 * g / 1e-8)
        self.function = function
        self.state_order = state_order
        self.hp = hp
        self.shapes = shapes
        self.coupled = coupled
        self.second_moment = second_moment

    def hyperparams(self, **over):
        hp = {**self.hp, **over}
        if self.coupled is not None:
            hp["coupled"] = list(self.coupled)
        return hp

    def state_shape(self, k, i, shape):
        if self.coupled is not None and k == "v" and self.coupled[i]:
            return (shape[1],)
        return shape

    def zero_state(self, dt, shapes=None):
        shapes = shapes or self.shapes
        return {k: [np.zeros(self.state_shape(k, i, s), dt) for i, s in enumerate(shapes)] for k in self.state_order}

    def resumed_state(self, rng, dt, grad_scale, shapes=None):
        """Plausible non-zero moments (second moments non-negative, of the size of g²)."""
        shapes = shapes or self.shapes
        state = {}
        for k in self.state_order:
            arrays = []
            for i, s in enumerate(shapes):
                d = rng.standard_normal(self.state_shape(k, i, s)) * grad_scale
                arrays.append(np.asarray(d * d if k == self.second_moment else d * 0.1, dtype=dt))
            state[k] = arrays
        return state

    def case(self, name, dt, *, params, grads, state=None, first_step=1, hp=None, description, tags=(), kills=()):
        return _case(name, self.function, self.state_order, hp or self.hyperparams(), params,
                     state if state is not None else self.zero_state(dt), grads, first_step,
                     description=description, tags=tags, kills=kills)


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


def common_cases(rule: Rule, other_hp: dict, *, extra_kills=None):
    """The cases every rule has, for float64 and float32. ``extra_kills``: case stem ->
    mutants (beyond the rule-based ones) that the rule's version of that case is for."""
    extra_kills = extra_kills or {}
    cases = []
    shapes = rule.shapes
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        short = _SHORT[dtype]

        def kills(stem, dtype=dtype):
            k = extra_kills.get(stem, ())
            return k(dtype) if callable(k) else k

        rng = np.random.default_rng(1)
        cases.append(rule.case(
            f"{short}_basic", dt, params=_draw(rng, shapes, 1.0, dt), grads=_draws(rng, shapes, 1.0, dt, 4),
            description="four steps from zero state, unit-scale θ and g", kills=kills("basic")))

        rng = np.random.default_rng(2)
        cases.append(rule.case(
            f"{short}_zero_grads_from_step1", dt, params=_draw(rng, shapes, 1.0, dt),
            grads=[[np.zeros(s, dt) for s in shapes] for _ in range(2)],
            description="g = 0 at steps 1 and 2: nothing may divide 0 by 0; only weight decay moves θ",
            kills=kills("zero_grads")))

        rng = np.random.default_rng(3)
        cases.append(rule.case(
            f"{short}_resume_at_step_1000", dt, params=_draw(rng, shapes, 1e-3, dt),
            state=rule.resumed_state(rng, dt, 1.0), grads=_draws(rng, shapes, 1.0, dt, 3), first_step=1000,
            description="steps 1000-1002 from non-zero state; θ of the size of one step, so the "
                        "bias corrections of t = 1000 (not 999 or 1001) show in θ",
            kills=kills("resume")))

        rng = np.random.default_rng(4)
        g = TINY_G[dtype]
        cases.append(rule.case(
            f"{short}_tiny", dt, params=_draw(rng, shapes, rule.tiny_theta(g), dt),
            grads=_draws(rng, shapes, g, dt, 3),
            description=f"|g| ~ {g:g}: g is normal, g² is subnormal; θ ~ {rule.tiny_theta(g):g}, so it moves visibly",
            tags=["tiny"], kills=kills("tiny")))

        rng = np.random.default_rng(10)
        g = SUBNORMAL_G[dtype]
        cases.append(rule.case(
            f"{short}_subnormal_grads", dt, params=_draw(rng, shapes, rule.tiny_theta(g), dt),
            grads=_draws(rng, shapes, g, dt, 3),
            description=f"|g| ~ {g:g}: subnormal gradients (flush-to-zero loses them); θ ~ {rule.tiny_theta(g):g}",
            tags=["tiny"], kills=kills("subnormal")))

        rng = np.random.default_rng(5)
        g = HUGE_G[dtype]
        cases.append(rule.case(
            f"{short}_huge", dt, params=_draw(rng, shapes, 1.0, dt), grads=_draws(rng, shapes, g, dt, 3),
            description=f"|g| ~ {g:g}: g² huge but finite; unit-scale θ still moves visibly",
            tags=["huge"], kills=kills("huge")))

        rng = np.random.default_rng(11)
        cases.append(rule.case(
            f"{short}_square_overflows", dt, params=_draw(rng, shapes, 1.0, dt),
            grads=_overflow_grads(rng, shapes, dt, 3, big=rule.overflow_tensors, big_step=1),
            description=f"tensor(s) {', '.join(map(str, rule.overflow_tensors))} at step 2 have g² = +Inf "
                        "(IEEE): their second moment becomes +Inf and stays so, and θ stops there; "
                        "(1 − β₂)·g² computed as ((1 − β₂)·g)·g would not overflow",
            tags=["overflow"], kills=kills("overflow")))

        rng = np.random.default_rng(6)
        cases.append(rule.case(
            f"{short}_other_hyperparams", dt, params=_draw(rng, shapes, 1.0, dt),
            grads=_draws(rng, shapes, 1.0, dt, 4), hp=rule.hyperparams(**other_hp),
            description="other hyperparameters: " + ", ".join(f"{k} = {v:g}" for k, v in other_hp.items()),
            kills=kills("other")))
    return cases


def _f32_only(*names):
    return lambda dtype: list(names) if dtype == "float32" else []


ADAM_FAMILY_KILLS = {
    "basic": lambda dtype: ["no_bias_correction", "bias_correction_twice", "betas_swapped", "state_doubled"]
    + (["scalars_in_param_dtype"] if dtype == "float32" else ["eps_inside_sqrt"]),
    "other": ["eps_inside_sqrt"],
    "overflow": ["square_after_scaling"],
}


def adam_cases():
    rule = Rule("adam_step", ("m", "v"), ADAM_HP, GENERAL_SHAPES)
    cases = common_cases(rule, {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1},
                         extra_kills={**ADAM_FAMILY_KILLS, "other": ["eps_inside_sqrt", "decay_decoupled"]})
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        rng = np.random.default_rng(12)
        # L2 decay overflows: g + λθ = ±Inf, so m = ±Inf, v = +Inf and θ = NaN (Inf/Inf) there.
        big = np.finfo(dt).max
        params = _draw(rng, GENERAL_SHAPES, 1.0, dt)
        params[0][0, :2] = np.asarray([big * 0.9, -big * 0.9], dtype=dt)
        grads = _draws(rng, GENERAL_SHAPES, 1.0, dt, 2)
        grads[0][0][0, :2] = np.asarray([big * 0.9, -big * 0.9], dtype=dt)
        cases.append(rule.case(
            f"{_SHORT[dtype]}_decay_overflows", dt, params=params, grads=grads,
            hp=rule.hyperparams(weight_decay=0.5),
            description="two elements with g + λθ = ±Inf at step 1: m = ±Inf, v = +Inf, θ = NaN there "
                        "(IEEE); every other element is finite and moves",
            tags=["overflow"], kills=["decay_decoupled"]))
    return cases


def adamw_cases():
    rule = Rule("adamw_step", ("m", "v"), {**ADAM_HP, "weight_decay": 1e-2}, GENERAL_SHAPES)
    return common_cases(rule, {"lr": 0.05, "beta1": 0.0, "beta2": 0.5, "eps": 1e-3, "weight_decay": 0.5},
                        extra_kills={**ADAM_FAMILY_KILLS,
                                     "other": ["eps_inside_sqrt", "decay_coupled", "decay_not_scaled_by_lr"]})


def coupled_adam_cases():
    rule = Rule("coupled_adam_step", ("m", "v"), {**ADAM_HP, "weight_decay": 1e-2}, COUPLED_SHAPES,
                coupled=COUPLED_FLAGS, overflow_tensors=(0, 3))  # one coupled, one uncoupled
    cases = common_cases(rule, {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.2},
                         extra_kills={**ADAM_FAMILY_KILLS,
                                      "basic": lambda dtype: ADAM_FAMILY_KILLS["basic"](dtype) + [
                                          "mean_over_columns", "couple_m", "uncoupled_as_coupled"]})
    # Column means whose float32 squares or float32 sums overflow, while the float64 mean fits.
    dt = np.dtype(np.float32)
    rng = np.random.default_rng(13)
    shapes = [(9, 5), (5, 3)]
    flags = [True, False]
    params = _draw(rng, shapes, 1.0, dt)
    grads = _draws(rng, shapes, 1.0, dt, 3)
    g = grads[1][0]
    g[4, 0] = 2.2e19                      # g² = 4.8e38 > float32 max; the column mean 5.4e37 fits
    g[:, 1] = np.asarray(rng.uniform(1.2e19, 1.3e19, 9) * np.sign(rng.standard_normal(9)), dtype=dt)
    # column 1: every g² ≈ 1.5e38 fits, their float32 sum does not; the mean does
    sub = Rule("coupled_adam_step", ("m", "v"), rule.hp, shapes, coupled=flags)
    cases.append(sub.case(
        "f32_column_mean_needs_float64", dt, params=params, grads=grads,
        description="step 2: one column holds a g with g² > float32 max, another nine g with g² ≈ 1.5e38; "
                    "squared and summed in float64 both column means fit in float32",
        tags=["overflow"], kills=["squares_in_float32", "reduction_in_float32"]))
    return cases


def fadam_cases():
    # θ ~ 1e-2 in the tiny cases: there w̄ = θ/(f^p + ε_t) is huge and clipped, so the decay
    # moves θ by α·λ·c·θ/RMS(θ) per step; a θ much smaller than that would flip sign every step
    # (and amplify rounding differences), a θ much larger would overflow w̄ in float32.
    rule = Rule("fadam_step", ("m", "f"), FADAM_HP, GENERAL_SHAPES, second_moment="f", tiny_theta=lambda g: 1e-2)
    fadam_kills = {
        "basic": lambda dtype: ["betas_swapped", "momentum_before_preconditioning", "decay_not_preconditioned",
                                "beta2_not_debiased", "momentum_bias_corrected", "old_fisher", "state_doubled"]
        + (["scalars_in_param_dtype"] if dtype == "float32" else []),
        "zero_grads": ["eps_unguarded"],
        "overflow": ["square_after_scaling"],
        "other": ["p_ignored", "no_clip"],
        "subnormal": _f32_only("eps_no_normal_floor"),
    }
    cases = common_cases(rule, {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-4, "eps2": 0.1, "clip": 0.5,
                                "p": 0.25, "weight_decay": 0.5}, extra_kills=fadam_kills)
    shapes = GENERAL_SHAPES
    for dtype in ("float64", "float32"):
        dt = np.dtype(dtype)
        short = _SHORT[dtype]
        rng = np.random.default_rng(7)
        # clip = 2 makes max(1, RMS/c) and max(1, RMS)/c differ: catches the common port bug.
        cases.append(rule.case(
            f"{short}_clip_2", dt, params=_draw(rng, shapes, 1.0, dt), grads=_draws(rng, shapes, 1.0, dt, 3),
            hp=rule.hyperparams(clip=2.0), description="c = 2: max(1, RMS/c) and max(1, RMS)/c differ",
            tags=["clip"], kills=["clip_form"]))
        rng = np.random.default_rng(8)
        # p = 1: the full Fisher inverse (no square root).
        cases.append(rule.case(
            f"{short}_p_1", dt, params=_draw(rng, shapes, 1.0, dt), grads=_draws(rng, shapes, 1.0, dt, 3),
            hp=rule.hyperparams(p=1.0), description="p = 1: f^p = f", kills=["p_ignored"]))
        rng = np.random.default_rng(14)
        # p = 0.75, c = 3: RMS(ḡ) < c, where max(1, RMS/c) = 1 but max(1, RMS)/c < 1.
        cases.append(rule.case(
            f"{short}_p_0p75_clip_3", dt, params=_draw(rng, shapes, 1.0, dt),
            grads=_draws(rng, shapes, 1.0, dt, 3), hp=rule.hyperparams(p=0.75, clip=3.0),
            description="p = 0.75, c = 3: RMS(ḡ) < c, so the two clip forms differ, and f^p is a pow",
            tags=["clip"], kills=["p_ignored", "clip_form"]))
        rng = np.random.default_rng(9)
        # g² underflows to 0 in the parameter dtype; only ε_t keeps f^p + ε_t positive. In float32
        # g² also underflows when formed in float32 for RMS(g), but not in float64.
        g = 1e-170 if dtype == "float64" else 1e-25
        cases.append(rule.case(
            f"{short}_grad_squares_underflow", dt, params=_draw(rng, shapes, 1.0, dt),
            grads=_draws(rng, shapes, g, dt, 2),
            description=f"|g| ~ {g:g}: g² = 0 in the parameter dtype; RMS(g) (squares formed in float64) "
                        "is not 0 in float32, 0 in float64 (so ε_t = ε^{2p})",
            tags=["tiny"], kills=(["squares_in_float32", "reduction_in_float32", "eps_constant"]
                                  if dtype == "float32" else ["eps_unguarded"])))
    return cases
