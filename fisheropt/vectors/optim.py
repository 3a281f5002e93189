"""Vector cases for the four update rules, computed by the reference.

Each case runs a short trajectory (several steps) of a rule's multi-tensor
``<rule>_step`` from fisheropt.refimpl and records params and state after
every step. Inputs are drawn from fixed seeds; the edge cases are the ones
implementations get wrong: step 1, zero gradients, tiny and huge magnitudes,
resuming mid-run (step ≫ 1 with non-zero state), clipping and p ≠ 0.5 for FAdam.
"""
from __future__ import annotations

import numpy as np

from fisheropt import refimpl

from . import encode

# elementwise in the param dtype; float64 reductions. rtol covers a few ulp per
# step plus reduction-order differences; atol covers cancellation θ - Δθ ≈ 0
# at the scale of the inputs.
_RTOL = {"float32": 2e-5, "float64": 1e-12}
_ATOL_PER_SCALE = {"float32": 1e-6, "float64": 1e-13}

ADAM_HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
FADAM_HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "eps2": 0.01, "clip": 1.0,
            "p": 0.5, "weight_decay": 0.1}

GENERAL_SHAPES = [(3, 4), (7,), (), (1,), (2, 3, 5)]
MATRIX_SHAPES = [(6, 4), (1, 3), (9, 5)]


def _trajectory_case(name, function, state_order, state_shapes, shapes, dtype, hyperparams,
                     *, steps=3, scale=1.0, grad_scale=None, first_step=1, zero_grads=False, seed=0):
    rng = np.random.default_rng(seed)
    grad_scale = scale if grad_scale is None else grad_scale
    dt = np.dtype(dtype)
    params = [np.asarray(rng.standard_normal(s) * scale, dtype=dt) for s in shapes]
    if first_step == 1:
        state = {k: [np.zeros(state_shapes(k, s), dt) for s in shapes] for k in state_order}
    else:  # resuming: plausible non-zero moments (second moments non-negative)
        state = {}
        for k in state_order:
            draw = [rng.standard_normal(state_shapes(k, s)) * grad_scale for s in shapes]
            second_moment = k in ("v", "f")
            state[k] = [np.asarray(d * d if second_moment else d * 0.1, dtype=dt) for d in draw]
    grads = [[np.asarray(np.zeros(s) if zero_grads else rng.standard_normal(s) * grad_scale, dtype=dt) for s in shapes]
             for _ in range(steps)]
    inputs = {"params": [p.copy() for p in params], "state": {k: [a.copy() for a in v] for k, v in state.items()},
              "grads": grads, "first_step": first_step}
    step_fn = getattr(refimpl, function)
    expected = []
    current = [state[k] for k in state_order]
    for offset, g in enumerate(grads):
        step_fn(params, [x.copy() for x in g], *current, step=first_step + offset, **hyperparams)
        expected.append({"params": [p.copy() for p in params],
                         "state": {k: [a.copy() for a in current[i]] for i, k in enumerate(state_order)}})
    magnitude = max(scale, grad_scale)
    return {
        "name": name,
        "kind": "optimizer",
        "function": function,
        "dtype": dt.name,
        "state_order": list(state_order),
        "hyperparams": hyperparams,
        "tolerance": {"rtol": _RTOL[dt.name], "atol": _ATOL_PER_SCALE[dt.name] * magnitude},
        "inputs": encode(inputs),
        "expected": encode(expected),
    }


def _same_shape(_name, shape):
    return shape


def _coupled_shape(name, shape):
    return (shape[1],) if name == "v" else shape


def _common_cases(function, hp, state_order, state_shapes, shapes, extra_hp):
    cases = []
    for dtype in ("float64", "float32"):
        short = "f64" if dtype == "float64" else "f32"
        cases += [
            _trajectory_case(f"{short}_basic", function, state_order, state_shapes, shapes, dtype, hp,
                             steps=4, seed=1),
            _trajectory_case(f"{short}_zero_grads_from_step1", function, state_order, state_shapes, shapes,
                             dtype, hp, steps=2, zero_grads=True, seed=2),
            _trajectory_case(f"{short}_resume_at_step_1000", function, state_order, state_shapes, shapes,
                             dtype, hp, steps=3, first_step=1000, seed=3),
            _trajectory_case(f"{short}_tiny", function, state_order, state_shapes, shapes, dtype, hp,
                             steps=3, scale=1e-3, grad_scale=1e-30 if dtype == "float64" else 1e-18, seed=4),
            _trajectory_case(f"{short}_huge", function, state_order, state_shapes, shapes, dtype, hp,
                             steps=3, scale=1e3, grad_scale=1e30 if dtype == "float64" else 1e15, seed=5),
            _trajectory_case(f"{short}_other_hyperparams", function, state_order, state_shapes, shapes, dtype,
                             {**hp, **extra_hp}, steps=4, seed=6),
        ]
    return cases


def adam_cases():
    return _common_cases("adam_step", ADAM_HP, ("m", "v"), _same_shape, GENERAL_SHAPES,
                         {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1})


def adamw_cases():
    return _common_cases("adamw_step", {**ADAM_HP, "weight_decay": 1e-2}, ("m", "v"), _same_shape,
                         GENERAL_SHAPES, {"lr": 0.05, "beta1": 0.0, "beta2": 0.5, "eps": 1e-3, "weight_decay": 0.5})


def coupled_adam_cases():
    return _common_cases("coupled_adam_step", {**ADAM_HP, "weight_decay": 1e-2}, ("m", "v"), _coupled_shape,
                         MATRIX_SHAPES, {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.2})


def fadam_cases():
    cases = _common_cases("fadam_step", FADAM_HP, ("m", "f"), _same_shape, GENERAL_SHAPES,
                          {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-4, "eps2": 0.1, "clip": 0.5,
                           "p": 0.25, "weight_decay": 0.5})
    for dtype in ("float64", "float32"):
        short = "f64" if dtype == "float64" else "f32"
        # clip = 2 makes max(1, RMS/c) and max(1, RMS)/c differ: catches the common port bug.
        cases.append(_trajectory_case(f"{short}_clip_2", "fadam_step", ("m", "f"), _same_shape, GENERAL_SHAPES,
                                      dtype, {**FADAM_HP, "clip": 2.0}, steps=3, seed=7))
        # g² underflows to 0, so only the adaptive ε keeps f^p + ε_t positive.
        cases.append(_trajectory_case(f"{short}_subnormal_grads", "fadam_step", ("m", "f"), _same_shape,
                                      GENERAL_SHAPES, dtype, FADAM_HP, steps=2,
                                      grad_scale=1e-170 if dtype == "float64" else 1e-40, seed=9))
        # p = 1: the full Fisher inverse (no square root).
        cases.append(_trajectory_case(f"{short}_p_1", "fadam_step", ("m", "f"), _same_shape, GENERAL_SHAPES,
                                      dtype, {**FADAM_HP, "p": 1.0}, steps=3, seed=8))
    return cases
