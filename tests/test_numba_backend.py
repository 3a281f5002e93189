"""The numba backend beyond agreement with the reference: determinism, schedules, plumbing.

Agreement with the reference for every rule is tests/test_conformance.py; the
tolerances are derived in tests/agreement.py.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fisheropt as fo  # noqa: E402
from fisheropt import backends  # noqa: E402

from agreement import assert_close, assert_exact, make_tensor, shapes_st, tol  # noqa: E402
from fisheropt.refimpl import RULES  # noqa: E402
from rules import CLASS_NAMES, RULE_NAMES, make_optimizer  # noqa: E402

ref = backends.get("numpy")
nb = backends.get("numba")
from fisheropt.backends.numba import _core as nb_core  # noqa: E402




# ---- helpers -------------------------------------------------------------------
# ---- interface -----------------------------------------------------------------
def test_numba_is_available():
    assert "numba" in backends.available(), backends.unavailable().get("numba")
    assert nb.NAME == "numba" and nb.array_module is np
    assert nb.owns(np.zeros(3)) and not nb.owns([1.0])


# The rules' property tests against the reference: tests/test_conformance.py (every rule ×
# every fused backend); the signatures: tests/test_interface.py.


@given(shapes=st.lists(shapes_st, min_size=0, max_size=6),
       dtypes=st.lists(st.sampled_from([np.float32, np.float64]), min_size=6, max_size=6),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
       where=st.integers(0, 10**6), seed=st.integers(0, 2**32 - 1))
def test_all_finite_matches_reference(shapes, dtypes, poison, where, seed):
    rng = np.random.default_rng(seed)
    arrays = [make_tensor(rng, s, d, int(rng.integers(-30, 30))) for s, d in zip(shapes, dtypes)]
    nonempty = [a for a in arrays if a.size]
    if poison is not None and nonempty:
        a = nonempty[where % len(nonempty)]
        a.flat[where % a.size] = poison
    assert nb.all_finite(arrays) == ref.all_finite(arrays)


def test_all_finite_edge_cases():
    f32 = np.float32
    assert nb.all_finite([])
    assert nb.all_finite([np.zeros(0, f32), np.zeros((3, 0))])
    assert nb.all_finite([np.array(f32(3.4e38)), np.array(np.finfo(np.float64).max)])
    assert nb.all_finite([np.array([np.finfo(f32).tiny / 2], f32), np.array([-0.0])])  # subnormal, -0
    for bad in (np.nan, np.inf, -np.inf):
        for dt in (np.float32, np.float64):
            x = np.ones(200_003, dt)
            x[-1] = bad  # the very last element of the last chunk
            assert not nb.all_finite([np.ones(5), x])
            x[-1] = 1
            x[0] = bad
            assert not nb.all_finite([x])
    # what the fused kernel does not read (lists, integers, non-contiguous views) is answered by NumPy
    assert not nb.all_finite([[1.0, np.nan]]) and nb.all_finite([np.arange(3)])
    y = np.ones((4, 4))
    y[1, 1] = np.nan
    assert not nb.all_finite([y[:, 1::2]]) and nb.all_finite([y[::2, ::2]])


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
            if rule.tensor_flag is not None:   # as matrices, every one flagged
                params = [p.reshape(-1, 7) if p.size % 7 == 0 else p.reshape(1, -1) if p.ndim else p.reshape(1, 1)
                          for p in params]
                grads = [g.reshape(p.shape) for g, p in zip(grads, params)]
                kw = {rule.tensor_flag.name: [True] * len(params)}
            state = [[np.zeros(p.shape[1], dtype) if spec.per_column and kw else np.zeros_like(p) for p in params]
                     for spec in rule.state]
            for t in range(1, 4):
                getattr(nb, rule.step_function)(params, grads, *state, step=t, **hp, **kw)
            results.append([a.copy() for a in params + [x for s in state for x in s]])
    finally:
        numba.set_num_threads(old)
    for a, b, c in zip(*results):
        assert np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
        assert np.array_equal(a.reshape(-1).view(np.uint8), c.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("p", [0.5, 0.7, 1.0])   # the three ways f^p is evaluated
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
    exponents = [[-2, -12, -2, -12, 0], [-12, -12, -2, -12, -2], [-12, -2, -12, -2, -12],
                 [-2, -2, -12, -12, -12], [-12, -12, -12, -2, -2]]
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
    assert (a * a + c)[0] == 0.0              # unfused: a² rounds to 1 + 2^-29
    assert fused(a, a, c)[0] == 2.0**-60      # fused: the exact residual

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-40, 38, 100_000)).astype(np.float32)
    x = np.where(np.isfinite(x), x, 1.0).astype(np.float64)
    acc = rng.standard_normal(x.size) * 10.0 ** rng.integers(-80, 76, x.size)
    assert np.array_equal(fused(x, x, acc), acc + x * x)


# ---- the optimizer classes -------------------------------------------------------
def randn(rng, shape, dtype):
    return np.asarray(rng.standard_normal(shape), dtype=dtype)  # a 0-d array for shape (), not a scalar


def _model(rng, dtypes=(np.float32, np.float64)):
    shapes = [(64, 33), (33,), (), (1,), (1000,), (70_000,), (12, 5)]
    return [randn(rng, s, dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("cls", CLASS_NAMES)
def test_optimizer_classes_numba_vs_numpy(cls):
    rng = np.random.default_rng(3)
    p_nb = _model(rng)
    p_np = [p.copy() for p in p_nb]
    kw = dict(lr=3e-3, weight_decay=0.05)
    o_nb = make_optimizer(cls, p_nb, "numba", **kw)
    o_np = make_optimizer(cls, p_np, "numpy", **kw)
    assert o_nb.backend.NAME == "numba"
    steps = 25
    for t in range(1, steps + 1):
        grads = [randn(rng, p.shape, p.dtype) for p in p_nb]
        if t == 5:
            for g in grads:
                g[...] = 0  # an all-zero gradient step
        o_nb.step(grads)
        o_np.step(grads)
    for a, b in zip(p_nb + [x for v in o_nb.state.values() for x in v],
                    p_np + [x for v in o_np.state.values() for x in v]):
        if not o_nb.rule.reduces:
            assert_exact(a, b, cls)
        else:
            assert_close(a, b, tol(b.dtype, steps), cls)


def test_optimizer_rejects_nonfinite_with_numba():
    p = [np.ones(100_000, np.float32), np.ones(3)]
    opt = fo.AdamW(p, backend="numba")
    g = [np.ones(100_000, np.float32), np.array([1.0, np.nan, 2.0])]
    before = [x.copy() for x in p]
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        opt.step(g)
    for a, b in zip(p, before):
        assert np.array_equal(a, b)


def test_load_state_dict_then_step_matches():
    """State restored in place keeps cached plans valid (same arrays, new contents)."""
    rng = np.random.default_rng(5)
    p1 = _model(rng)
    p2 = [p.copy() for p in p1]
    o1 = fo.FAdam(p1, backend="numba")
    o2 = fo.FAdam(p2, backend="numpy")
    g = [randn(rng, p.shape, p.dtype) for p in p1]
    o1.step(g)
    o2.step(g)
    sd = o2.state_dict()
    o1.load_state_dict(sd)
    for x, y in zip(p1, p2):
        x[...] = y
    o1.step(g)
    o2.step(g)
    for a, b in zip(p1, p2):
        assert_close(a, b, tol(b.dtype, 2), "after load_state_dict")


# ---- many tensors, cache hygiene ---------------------------------------------------
def test_many_tensors_one_call():
    rng = np.random.default_rng(11)
    shapes = []
    for _ in range(12):
        shapes += [(48, 48)] * 4 + [(48, 192), (192, 48), (48,), (48,), (192,), (48,), (48,), (48,)]
    shapes += [(500, 48), (48,), (48,), (), (1,), (0,)]
    assert len(shapes) >= 150
    params = [randn(rng, s, np.float32 if i % 5 else np.float64) for i, s in enumerate(shapes)]
    params_r = [p.copy() for p in params]
    st_nb = [[np.zeros_like(p) for p in params] for _ in range(2)]
    st_r = [[np.zeros_like(p) for p in params] for _ in range(2)]
    for t in range(1, 4):
        grads = [randn(rng, p.shape, p.dtype) for p in params]
        nb.adamw_step(params, grads, *st_nb, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        ref.adamw_step(params_r, grads, *st_r, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        nb.fadam_step(params, grads, *st_nb, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01,
                      clip=1.0, p=0.5, weight_decay=0.1)
        ref.fadam_step(params_r, grads, *st_r, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01,
                       clip=1.0, p=0.5, weight_decay=0.1)
    for a, b in zip(params + st_nb[0] + st_nb[1], params_r + st_r[0] + st_r[1]):
        assert_close(a, b, tol(b.dtype, 6), "many tensors")


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


# ---- the fused finiteness check (per-tensor hyperparameters: tests/test_conformance.py) ---------
def _per_tensor_problem(rule, rng):
    shapes = [(40, 7), (3, 5), (70_001,), (64, 9)] if rule != "coupled_adam_step" else [(40, 7), (3, 5), (9, 11)]
    dtypes = [np.float32, np.float64, np.float32, np.float64][:len(shapes)]
    params = [make_tensor(rng, s, d, 0) for s, d in zip(shapes, dtypes)]
    n = len(params)
    hp = dict(step=[int(x) for x in rng.integers(1, 50, n)], lr=[float(x) for x in rng.uniform(1e-3, 1e-1, n)],
              beta1=0.9, beta2=[0.99, 0.999, 0.9, 0.99][:n], eps=1e-8,
              weight_decay=[0.0, 0.1, 0.01, 0.0][:n])
    kw = {}
    if rule == "fadam_step":
        hp.update(eps2=[0.01, 0.1, 0.01, 1.0], clip=[1.0, 0.5, 2.0, 1.0], p=[0.5, 1.0, 0.25, 0.5])
    if rule == "coupled_adam_step":
        kw["coupled"] = [True, False, True]
    state_shapes = [(s[1],) if kw.get("coupled", [False] * n)[i] else s for i, s in enumerate(shapes)]
    state = [[np.zeros_like(p) for p in params],
             [np.abs(make_tensor(rng, s, d, -2)) for s, d in zip(state_shapes, dtypes)]]
    return params, state, hp, kw, shapes, dtypes


@pytest.mark.parametrize("rule", [r.step_function for r in RULES.values() if hasattr(nb, r.step_function + "_checked")])
def test_fused_finiteness_check_refuses_before_any_write(rule):
    """<rule>_step_checked: a NaN in the last dtype group's gradient is found by the
    reductions, which run for every group before any update: nothing is written."""
    rng = np.random.default_rng(12)
    params, state, hp, kw, shapes, dtypes = _per_tensor_problem(rule, rng)
    checked = getattr(nb, rule + "_checked")
    for bad in range(len(params)):
        grads = [make_tensor(rng, s, d, -1) for s, d in zip(shapes, dtypes)]
        grads[bad].flat[grads[bad].size // 2] = (np.nan, np.inf, -np.inf)[bad % 3]
        before = [a.tobytes() for a in params + state[0] + state[1]]
        assert checked(params, grads, *state, **hp, **kw) is False
        assert [a.tobytes() for a in params + state[0] + state[1]] == before
    grads = [make_tensor(rng, s, d, -1) for s, d in zip(shapes, dtypes)]
    params_u, state_u = [p.copy() for p in params], [[a.copy() for a in s] for s in state]
    assert checked(params, grads, *state, **hp, **kw) is True
    getattr(nb, rule)(params_u, grads, *state_u, **hp, **kw)
    for a, b in zip(params + state[0] + state[1], params_u + state_u[0] + state_u[1]):
        assert_exact(a, b, "checked vs unchecked step")


def test_fused_check_accepts_huge_finite_float64_gradients():
    """Σg² overflows to Inf for |g| > 1e154 in float64 although g is finite: the tensor is then
    read again, and the step goes ahead."""
    params = [np.ones(1000), np.ones((4, 3))]
    grads = [np.full(1000, 1e200), np.full((4, 3), 1e-3)]
    m, f = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    hp = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1)
    params_r, m_r, f_r = [p.copy() for p in params], [a.copy() for a in m], [a.copy() for a in f]
    assert nb.fadam_step_checked(params, grads, m, f, **hp) is True
    ref.fadam_step(params_r, grads, m_r, f_r, **hp)
    assert np.isinf(f[0]).all()   # g² overflowed: the step went ahead, as the reference's does
    for a, b in zip(params + m + f, params_r + m_r + f_r):
        assert_close(a, b, tol(b.dtype, 1), "huge finite gradient")
