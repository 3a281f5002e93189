"""Invariants of the update rules (Hypothesis), on every host backend."""

import math

import numpy as np
import pytest
from conftest import host_backend_params
from hypothesis import given
from hypothesis import strategies as st

import fisheropt as fo
from fisheropt.refimpl import fadam as fadam_ref

dtypes = st.sampled_from([np.float32, np.float64])
matrix_shapes = st.tuples(st.integers(1, 9), st.integers(1, 7))
any_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
log_scales = st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e6])


@pytest.mark.parametrize("backend", host_backend_params())
@given(
    shape=matrix_shapes,
    dtype=dtypes,
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    beta2=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
)
def test_coupled_second_moment_is_row_mean_of_adams(backend, shape, dtype, steps, seed, beta2):
    """Coupled Adam stores v̄ (d,) = mean over rows of Adam's per-element v (V×d)."""
    rng = np.random.default_rng(seed)
    theta = np.asarray(rng.standard_normal(shape), dtype=dtype)
    opt = fo.CoupledAdam([theta], betas=(0.9, beta2), coupled=[True], backend=backend)
    v_full = np.zeros(shape)  # per-element Adam second moment, float64
    for _ in range(steps):
        g = np.asarray(rng.standard_normal(shape), dtype=dtype)
        v_full = beta2 * v_full + (1 - beta2) * g.astype(np.float64) ** 2
        opt.step([g])
    v_col = opt.state["v"][0]
    assert v_col.shape == (shape[1],)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(v_col, v_full.mean(axis=0), rtol=rtol * steps, atol=0)


@pytest.mark.parametrize("backend", host_backend_params())
@given(
    shapes=st.lists(any_shapes, min_size=1, max_size=4),
    dtype=dtypes,
    scale=log_scales,
    wd=st.sampled_from([0.0, 0.1, 1.0]),
    clip=st.sampled_from([0.5, 1.0, 2.0]),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_fadam_update_rms_is_bounded(backend, shapes, dtype, scale, wd, clip, steps, seed):
    """RMS(ḡ) ≤ c and RMS(w̄) ≤ c, and m is a convex mix of ḡ's, so
    RMS(Δθ) ≤ lr·c·(1 + λ) per tensor, whatever the gradient scale."""
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s) * scale, dtype=dtype) for s in shapes]
    lr = 1e-3
    opt = fo.FAdam(params, lr=lr, clip=clip, weight_decay=wd, backend=backend)
    for _ in range(steps):
        before = [p.astype(np.float64) for p in params]
        opt.step([np.asarray(rng.standard_normal(s) * scale, dtype=dtype) for s in shapes])
        for b, p in zip(before, params):
            if p.size:
                rms_step = fadam_ref.rms(p.astype(np.float64) - b)
                # slack: float32 rounding of θ itself (ulp of |θ|) on top of the bound
                slack = 1.0001 + (
                    8 * np.finfo(dtype).eps * np.max(np.abs(b)) / (lr * clip) if dtype == np.float32 else 0
                )
                assert rms_step <= lr * clip * (1 + wd) * slack


@given(
    rms_g=st.floats(0, 1e30),
    eps=st.floats(1e-30, 1e-2),
    eps2=st.floats(1e-6, 1.0),
    p=st.floats(0.05, 1.0),
    dtype=dtypes,
)
def test_fadam_adaptive_epsilon_is_never_zero_or_nan(rms_g, eps, eps2, p, dtype):
    """The v3 bug: ε·min(1, RMS(g)) is 0 for a zero gradient; ours falls back to ε^{2p}
    there and wherever the value underflows, and never goes below the dtype's tiny."""
    e = fadam_ref.adaptive_epsilon(rms_g, eps=eps, eps2=eps2, p=p, dtype=dtype)
    assert isinstance(e, dtype) and math.isfinite(e) and e >= np.finfo(dtype).tiny
    assert e <= max(dtype(eps ** (2 * p)), np.finfo(dtype).tiny)


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize(
    "dtype,g", [(np.float64, 1e-170), (np.float64, 5e-324), (np.float32, 1e-40), (np.float32, 1e-25)]
)
def test_fadam_subnormal_gradient_stays_finite(backend, dtype, g):
    """g² underflows to 0 here, so f = 0 and only ε_t keeps the denominator positive."""
    theta = np.ones(4, dtype=dtype)
    opt = fo.FAdam([theta], backend=backend)
    opt.step([np.full(4, g, dtype=dtype)])
    assert np.isfinite(theta).all() and np.isfinite(opt.state["m"][0]).all()


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fadam_all_zero_gradient_gives_finite_state(backend, dtype):
    params = [np.ones((4, 3), dtype=dtype), np.zeros(5, dtype=dtype)]
    opt = fo.FAdam(params, backend=backend)
    for _ in range(3):
        opt.step([np.zeros_like(p) for p in params])
    for arrays in [params, *opt.state.values()]:
        assert all(np.isfinite(a).all() for a in arrays)
    # only the preconditioned weight decay moves θ: it shrinks towards 0
    assert np.all(params[0] < 1) and np.all(params[1] == 0)


@pytest.mark.parametrize("backend", host_backend_params())
@given(shape=any_shapes, dtype=dtypes, scale=log_scales, seed=st.integers(0, 2**31))
def test_adam_first_step_moves_each_coordinate_at_most_lr(backend, shape, dtype, scale, seed):
    """At t = 1, m̂ = g and v̂ = g², so |Δθ| = lr·|g|/(|g| + ε) ≤ lr, and = lr·sign(g) for |g| ≫ ε."""
    rng = np.random.default_rng(seed)
    theta = np.asarray(rng.standard_normal(shape), dtype=dtype)
    g = np.asarray(rng.standard_normal(shape) * scale, dtype=dtype)
    before = theta.astype(np.float64)
    lr = 1e-2
    fo.Adam([theta], lr=lr, eps=1e-8, backend=backend).step([g])
    delta = theta.astype(np.float64) - before
    ulp = 4 * np.finfo(dtype).eps * (np.abs(before) + lr)
    assert np.all(np.abs(delta) <= lr + ulp)
    big = np.abs(g) > 1e-4
    np.testing.assert_allclose(delta[big], -lr * np.sign(g[big]), atol=float(np.max(ulp, initial=0)) + lr * 1e-3)


@pytest.mark.parametrize("backend", host_backend_params())
def test_fadam_step1_fisher_is_squared_gradient(backend):
    """β̂2 = 0 at t = 1: the Fisher EMA starts at g² exactly (debiasing, not a zero-initialised EMA)."""
    g = np.array([0.5, -2.0, 3.0])
    opt = fo.FAdam([np.ones(3)], backend=backend)
    opt.step([g])
    np.testing.assert_array_equal(opt.state["f"][0], g * g)


@pytest.mark.parametrize("backend", host_backend_params())
def test_coupled_adam_uncoupled_tensors_follow_adamw(backend):
    rng = np.random.default_rng(3)
    a = [rng.standard_normal((4, 3)), rng.standard_normal(6)]
    b = [x.copy() for x in a]
    coupled = fo.CoupledAdam(a, coupled=[True, False], backend=backend)
    adamw = fo.AdamW(b, backend=backend)
    for _ in range(4):
        g = [rng.standard_normal(x.shape) for x in a]
        coupled.step(g)
        adamw.step(g)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], b[0])  # the coupled matrix did differ from AdamW
