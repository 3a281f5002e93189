"""The numba backend's internals: results independent of the thread count (fixed chunks and
reduction order), FAdam's schedules (the ε_t guess and the deferred hint kept in the plan), the
fused multiply-add intrinsic of the float64 sums, and the plan cache (weak references, id reuse).

Agreement with the reference: tests/test_numba_backend.py and tests/test_conformance.py.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from agreement import assert_exact, make_tensor  # noqa: E402
from rules import RULE_NAMES  # noqa: E402

from fisheropt import backends  # noqa: E402
from fisheropt.backends.numba import _core as nb_core  # noqa: E402
from fisheropt.refimpl import RULES  # noqa: E402

ref = backends.get("numpy")
nb = backends.get("numba")


# ---- determinism across thread counts ----------------------------------------------
def _big_problem(seed, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(70_001,), (300, 700), (129,), (), (5, 65_537)]
    params = [make_tensor(rng, s, dtype, 0) for s in shapes]
    grads = [make_tensor(rng, s, dtype, -2) for s in shapes]
    return params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_bitwise_identical_for_any_thread_count(rule_name, dtype):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 numba threads")
    rule = RULES[rule_name]
    hp = rule.kernel_kwargs({**rule.defaults(), "lr": 1e-2, **({"clip": 0.5} if "clip" in rule.defaults() else {})})
    results = []
    old = numba.get_num_threads()
    try:
        for threads in (1, 2, 1):
            numba.set_num_threads(threads)
            params, grads = _big_problem(7, dtype)
            kw = {}
            if rule.tensor_flag is not None:  # as matrices, every one flagged
                params = [
                    p.reshape(-1, 7) if p.size % 7 == 0 else p.reshape(1, -1) if p.ndim else p.reshape(1, 1)
                    for p in params
                ]
                grads = [g.reshape(p.shape) for g, p in zip(grads, params)]
                kw = {rule.tensor_flag.name: [True] * len(params)}
            state = [
                [np.zeros(p.shape[1], dtype) if spec.per_column and kw else np.zeros_like(p) for p in params]
                for spec in rule.state
            ]
            for t in range(1, 4):
                getattr(nb, rule.step_function)(params, grads, *state, step=t, **hp, **kw)
            results.append([a.copy() for a in params + [x for s in state for x in s]])
    finally:
        numba.set_num_threads(old)
    for a, b, c in zip(*results):
        assert np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
        assert np.array_equal(a.reshape(-1).view(np.uint8), c.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("p", [0.5, 0.7, 1.0])  # the three ways f^p is evaluated
def test_fadam_schedule_never_changes_the_bits(p):
    """The numba FAdam guesses ε_t = ε^{2p} and, for tensors whose guess failed on the
    last step, defers to three passes (a hint kept in the plan). Every schedule must
    give the same bits: run the same steps with the hint kept, and with the plan
    dropped before each step (no hint: guess, then recompute where it failed)."""
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, eps2=0.01, clip=0.5, p=p, weight_decay=0.1)
    shapes = [(70_001,), (300, 700), (129,), (), (64,)]
    dtypes = [np.float32, np.float64, np.float32, np.float32, np.float64]
    # Gradient exponent per step and tensor: -12 makes RMS(g) < ε/ε₂, so ε_t is not the
    # guess; the sequence visits guess-holds, guess-fails, deferred-then-tiny and
    # deferred-then-normal for each tensor.
    exponents = [
        [-2, -12, -2, -12, 0],
        [-12, -12, -2, -12, -2],
        [-12, -2, -12, -2, -12],
        [-2, -2, -12, -12, -12],
        [-12, -12, -12, -2, -2],
    ]
    runs, deferred_seen = [], []
    for keep_hint in (True, False):
        rng = np.random.default_rng(3)
        params = [make_tensor(rng, s, d, 0) for s, d in zip(shapes, dtypes)]
        m = [np.zeros_like(x) for x in params]
        f = [np.zeros_like(x) for x in params]
        seen = False
        for t, exps in enumerate(exponents, start=1):
            grads = [make_tensor(rng, s, d, e) for s, d, e in zip(shapes, dtypes, exps)]
            if not keep_hint:
                nb.clear_cache()
            nb.fadam_step(params, grads, m, f, step=t, **hp)
            # the plans of this step's launches (one per dtype here), and their "defer" hints
            plans = [plan for key, (_refs, plan) in nb_core.PLANS._entries.items() if key[0] == "fadam"]
            seen |= any(entry[-1].any() for plan in plans for entry in plan)
        runs.append(params + m + f)
        deferred_seen.append(seen)
    assert deferred_seen[0], "the deferred schedule was never exercised"
    for a, b in zip(*runs):
        assert_exact(a, b, "kept hint vs no hint")


def test_fma64_is_fused_and_changes_nothing_for_float32_squares():
    """FAdam's sums accumulate acc ← fma64(x, x, acc). It must be a real fused
    multiply-add (one rounding); and for x from float32 data, x·x is exact in float64,
    so it must give exactly acc + x·x (the claim that fma left float32 results alone)."""
    from fisheropt.backends.numba._core import fma64

    @numba.njit
    def fused(a, b, c):
        out = np.empty_like(a)
        for i in range(a.size):
            out[i] = fma64(a[i], b[i], c[i])
        return out

    a = np.array([1.0 + 2.0**-30])
    c = np.array([-(1.0 + 2.0**-29)])
    assert (a * a + c)[0] == 0.0  # unfused: a² rounds to 1 + 2^-29
    assert fused(a, a, c)[0] == 2.0**-60  # fused: the exact residual

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-40, 38, 100_000)).astype(np.float32)
    x = np.where(np.isfinite(x), x, 1.0).astype(np.float64)
    acc = rng.standard_normal(x.size) * 10.0 ** rng.integers(-80, 76, x.size)
    assert np.array_equal(fused(x, x, acc), acc + x * x)


# ---- the plan cache ------------------------------------------------------------------
def test_plan_cache_holds_no_strong_references_and_survives_id_reuse():
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    for round_ in range(20):
        rng = np.random.default_rng(round_)
        n = int(rng.integers(1, 300_000))
        p = [rng.standard_normal(n).astype(np.float32)]
        m, v = [np.zeros_like(p[0])], [np.zeros_like(p[0])]
        pr, mr, vr = [p[0].copy()], [m[0].copy()], [v[0].copy()]
        g = [rng.standard_normal(n).astype(np.float32)]
        nb.adam_step(p, g, m, v, step=1, **hp)
        ref.adam_step(pr, g, mr, vr, step=1, **hp)
        assert_exact(p[0], pr[0], "id reuse")
        r = weakref.ref(p[0])
        del p, m, v
        gc.collect()
        assert r() is None, "the plan cache keeps a parameter alive"
    assert len(nb_core.PLANS) <= nb_core.PLANS._maxsize
