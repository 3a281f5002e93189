"""The numba backend against the reference: the pre-step check, the optimizer classes, many
tensors in one call, restored state, and the fused finiteness checks (all or nothing).

Agreement with the reference for every rule is tests/test_conformance.py; the
tolerances are derived in tests/agreement.py. The backend's internals (determinism across
thread counts, FAdam's schedules, the fma intrinsic, the plan cache):
tests/backends/test_numba_internals.py.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from agreement import assert_close, assert_exact, make_tensor, shapes_st, tol  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rules import CLASS_NAMES, make_optimizer  # noqa: E402

import fisheropt as fo  # noqa: E402
from fisheropt import backends  # noqa: E402
from fisheropt.refimpl import RULES  # noqa: E402

ref = backends.get("numpy")
nb = backends.get("numba")


# ---- interface -----------------------------------------------------------------
def test_numba_is_available():
    assert "numba" in backends.available(), backends.unavailable().get("numba")
    assert nb.NAME == "numba" and nb.array_module is np
    assert nb.owns(np.zeros(3)) and not nb.owns([1.0])


# The rules' property tests against the reference: tests/test_conformance.py (every rule ×
# every fused backend); the signatures: tests/test_interface.py.


@given(
    shapes=st.lists(shapes_st, min_size=0, max_size=6),
    dtypes=st.lists(st.sampled_from([np.float32, np.float64]), min_size=6, max_size=6),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
    where=st.integers(0, 10**6),
    seed=st.integers(0, 2**32 - 1),
)
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
    for a, b in zip(
        p_nb + [x for v in o_nb.state.values() for x in v], p_np + [x for v in o_np.state.values() for x in v]
    ):
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


# ---- many tensors in one call ------------------------------------------------------
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
    adamw_hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    fadam_hp = dict(adamw_hp, eps2=0.01, clip=1.0, p=0.5)
    for t in range(1, 4):
        grads = [randn(rng, p.shape, p.dtype) for p in params]
        for backend, ps, state in ((nb, params, st_nb), (ref, params_r, st_r)):
            backend.adamw_step(ps, grads, *state, step=t, **adamw_hp)
            backend.fadam_step(ps, grads, *state, step=t, **fadam_hp)
    for a, b in zip(params + st_nb[0] + st_nb[1], params_r + st_r[0] + st_r[1]):
        assert_close(a, b, tol(b.dtype, 6), "many tensors")


# ---- the fused finiteness check (per-tensor hyperparameters: tests/test_conformance.py) ---------
def _per_tensor_problem(rule, rng):
    shapes = [(40, 7), (3, 5), (70_001,), (64, 9)] if rule != "coupled_adam_step" else [(40, 7), (3, 5), (9, 11)]
    dtypes = [np.float32, np.float64, np.float32, np.float64][: len(shapes)]
    params = [make_tensor(rng, s, d, 0) for s, d in zip(shapes, dtypes)]
    n = len(params)
    hp = dict(
        step=[int(x) for x in rng.integers(1, 50, n)],
        lr=[float(x) for x in rng.uniform(1e-3, 1e-1, n)],
        beta1=0.9,
        beta2=[0.99, 0.999, 0.9, 0.99][:n],
        eps=1e-8,
        weight_decay=[0.0, 0.1, 0.01, 0.0][:n],
    )
    kw = {}
    if rule == "fadam_step":
        hp.update(eps2=[0.01, 0.1, 0.01, 1.0], clip=[1.0, 0.5, 2.0, 1.0], p=[0.5, 1.0, 0.25, 0.5])
    if rule == "coupled_adam_step":
        kw["coupled"] = [True, False, True]
    state_shapes = [(s[1],) if kw.get("coupled", [False] * n)[i] else s for i, s in enumerate(shapes)]
    state = [
        [np.zeros_like(p) for p in params],
        [np.abs(make_tensor(rng, s, d, -2)) for s, d in zip(state_shapes, dtypes)],
    ]
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
    assert np.isinf(f[0]).all()  # g² overflowed: the step went ahead, as the reference's does
    for a, b in zip(params + m + f, params_r + m_r + f_r):
        assert_close(a, b, tol(b.dtype, 1), "huge finite gradient")


_THREADS_SCRIPT = """
import sys
import torch
import numba
import numpy as np
import fisheropt as fo

other = 1 if numba.config.NUMBA_NUM_THREADS > 1 else 2  # differs from numba's count
torch.get_num_threads()
torch.set_num_threads(other)
n = int(sys.argv[1])
fo.AdamW([np.zeros(n, np.float32)], backend="numba").step([np.ones(n, np.float32)])
print(torch.get_num_threads(), other)
"""


@pytest.mark.parametrize("elements", [10, 1 << 18], ids=["serial launch", "parallel launch"])
def test_step_leaves_torchs_thread_count_alone(elements):
    """numba's OpenMP layer sets OpenMP's thread count when it starts (the first parallel
    launch in a process, hence a fresh one here), and torch reads that count: the step must
    leave torch.get_num_threads() as the user set it."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(elements)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got, want = result.stdout.split()
    assert got == want, f"torch.get_num_threads() is {got} after a numba step, was set to {want}"
