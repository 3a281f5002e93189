"""Vector cases for the ESimCSE momentum-encoder update ``ema_update``, by the reference.

Each case is one in-place multi-tensor call
``ema_update(targets, sources, decay=λ)`` (θ_k ← λ·θ_k + (1 − λ)·θ_q) and the
targets after it. The edge cases: λ = 0 (copy the sources), λ = 1 (no change),
scalars and size-1 tensors, tiny, subnormal, huge and near-maximal magnitudes,
targets at zero (the result is (1 − λ)·θ_q alone, so 1 − λ must be rounded from
float64), ±Inf and NaN (IEEE: λ·Inf + (1 − λ)·x = Inf, Inf − Inf = NaN), and a
resumed EMA whose targets and sources nearly cancel.
"""

from __future__ import annotations

import numpy as np

from fisheropt.refimpl.esimcse_momentum import MOMENTUM, ema_coefficients, ema_update

from . import bound, encode, tolerance
from .optim import data_tags, rule_kills

# Two products and a sum in the param dtype: the reference, Numba and CuPy agree
# bit for bit. The tolerance, per tensor, allows an implementation that fuses the
# multiply-add: 1 ulp of the result plus eps·(the larger product, over the tensor).

SHAPES = [(3, 4), (7,), (), (1,), (2, 3, 5)]


def _tolerance(target, source, decay):
    a, b = ema_coefficients(decay, target.dtype)
    terms = [np.abs(a * target.astype(np.float64)), np.abs(b * source.astype(np.float64))]
    finite = [x[np.isfinite(x)] for x in terms]
    scale = max((float(x.max()) for x in finite if x.size), default=0.0)
    return tolerance(atol=float(np.finfo(target.dtype).eps) * scale, ulps=1)


def _case(
    name,
    dtype,
    decay,
    *,
    scale=1.0,
    shapes=SHAPES,
    seed=0,
    near=False,
    description="",
    targets=None,
    sources=None,
    tags=(),
    kills=(),
):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    with np.errstate(under="ignore"):
        if sources is None:
            sources = [np.asarray(rng.standard_normal(s) * scale, dtype=dt) for s in shapes]
        if targets is not None:
            pass
        elif near:  # a momentum encoder that has tracked the encoder for a long time
            targets = [np.asarray(q + rng.standard_normal(q.shape) * scale * 1e-3, dtype=dt) for q in sources]
        else:
            targets = [np.asarray(rng.standard_normal(s) * scale, dtype=dt) for s in shapes]
    args = {"targets": [t.copy() for t in targets], "sources": [q.copy() for q in sources], "decay": decay}
    out = [t.copy() for t in targets]
    with np.errstate(invalid="ignore", over="ignore"):
        ema_update(out, sources, decay=decay)
    tol = {"targets": [_tolerance(t, q, decay) for t, q in zip(targets, sources)]}
    all_tags = list(dict.fromkeys(list(tags) + data_tags(args, {"targets": out})))
    moves = _targets_move(targets, out, tol["targets"])
    if not moves:
        all_tags.append("targets_static")
    all_kills = list(dict.fromkeys(rule_kills(all_tags, moves, never="targets_unchanged", steps=()) + list(kills)))
    return {
        "name": name,
        "kind": "inplace",
        "function": "ema_update",
        "dtype": dt.name,
        "description": description or f"θ_k ← {decay}·θ_k + (1 − {decay})·θ_q over {len(shapes)} tensors",
        "tags": all_tags,
        "kills": all_kills,
        "tolerance": tol,
        "args": encode(args),
        "expected": encode({"targets": out}),
    }


def _targets_move(before, after, tols) -> bool:
    for b, a, tol in zip(before, after, tols):
        b64, a64 = b.astype(np.float64), a.astype(np.float64)
        if not np.array_equal(np.isnan(b64), np.isnan(a64)) or not np.array_equal(np.isinf(b64), np.isinf(a64)):
            return True
        ok = np.isfinite(a64)
        if np.any(np.abs(a64[ok] - b64[ok]) > bound(a64[ok], tol, b.dtype)):
            return True
    return False


def _nonfinite(dt):
    """Targets and sources with ±Inf and NaN next to finite values, one tensor per pattern."""
    inf, nan = np.inf, np.nan
    targets = [np.array([inf, -inf, 1.5, inf, nan, 2.0], dt), np.array([-inf, 3.0], dt)]
    sources = [np.array([1.0, 2.0, inf, -inf, 1.0, nan], dt), np.array([-inf, inf], dt)]
    return targets, sources


def _near_max(rng, dt, shapes=((3, 4), (7,))):
    big = float(np.finfo(dt).max)
    return (
        [np.asarray(rng.uniform(-0.9, 0.9, s) * big, dtype=dt) for s in shapes],
        [np.asarray(rng.uniform(-0.9, 0.9, s) * big, dtype=dt) for s in shapes],
    )


def ema_cases():
    cases = []
    for dtype in ("float32", "float64"):
        dt = np.dtype(dtype)
        f32 = dtype == "float32"
        tiny = 1e-40 if f32 else 1e-310
        cases += [
            _case(
                f"ema_{dtype}_default",
                dtype,
                MOMENTUM,
                seed=1,
                kills=["decay_swapped"] + ([] if f32 else ["float32_arithmetic"]),
            ),
            _case(
                f"ema_{dtype}_decay0_copies_sources",
                dtype,
                0.0,
                seed=2,
                description="λ = 0: the targets become the sources",
            ),
            _case(
                f"ema_{dtype}_decay1_keeps_targets", dtype, 1.0, seed=3, description="λ = 1: the targets do not change"
            ),
            _case(f"ema_{dtype}_decay_0p9", dtype, 0.9, seed=4),
            _case(f"ema_{dtype}_tiny", dtype, MOMENTUM, scale=1e-20, seed=5),
            _case(
                f"ema_{dtype}_subnormal",
                dtype,
                MOMENTUM,
                scale=tiny,
                seed=9,
                description=f"|θ| ~ {tiny:g}: subnormal targets and sources (flush-to-zero loses them)",
            ),
            _case(f"ema_{dtype}_huge", dtype, MOMENTUM, scale=1e20, seed=6),
            _case(
                f"ema_{dtype}_near_max",
                dtype,
                MOMENTUM,
                seed=10,
                targets=_near_max(np.random.default_rng(10), dt)[0],
                sources=_near_max(np.random.default_rng(10), dt)[1],
                description="|θ| up to 0.9·(dtype max): the result never overflows, θ_q − θ_k may",
                tags=["huge"],
                kills=["lerp_form"],
            ),
            _case(
                f"ema_{dtype}_targets_zero",
                dtype,
                MOMENTUM,
                seed=11,
                targets=[np.zeros(s, dt) for s in SHAPES],
                description="θ_k = 0: the result is (1 − λ)·θ_q alone, with 1 − λ rounded from float64",
                kills=["scalars_in_param_dtype"] if f32 else ["float32_arithmetic"],
            ),
            _case(
                f"ema_{dtype}_nonfinite",
                dtype,
                MOMENTUM,
                targets=_nonfinite(dt)[0],
                sources=_nonfinite(dt)[1],
                description="±Inf and NaN (IEEE): λ·Inf + (1 − λ)·x = Inf, Inf + (−Inf) = NaN, NaN stays NaN",
                tags=["nonfinite"],
                kills=["lerp_form"],
            ),
            _case(
                f"ema_{dtype}_near_cancellation",
                dtype,
                MOMENTUM,
                seed=7,
                near=True,
                description="targets ≈ sources: the update is a tiny correction",
            ),
            _case(f"ema_{dtype}_one_big_tensor", dtype, MOMENTUM, shapes=[(16, 9)], seed=8),
        ]
    return cases
