"""Fisher backends (numpy reference, numba, cupy) agree; the direction path never builds P x P."""

import inspect
import tracemalloc

import numpy as np
import pytest
from conftest import gpu_skip_reason, host_backend_params
from hypothesis import given
from hypothesis import strategies as st

import fisheropt as fo
from fisheropt import _ngd
from fisheropt.refimpl import fisher_ngd

FISHER_FUNCTIONS = ("fisher_gram", "fisher_sample_space_direction")


def _numba_module():
    pytest.importorskip("numba")
    from fisheropt.backends.numba import fisher

    return fisher


def test_backend_functions_are_registered():
    assert set(FISHER_FUNCTIONS) <= set(fo.backends.FUNCTIONS)
    ref = fo.backends.get("numpy")
    for name in FISHER_FUNCTIONS:
        assert getattr(ref, name) is getattr(fisher_ngd, name)


def test_numba_module_signatures_equal_the_reference():
    nb = _numba_module()
    for name in FISHER_FUNCTIONS:
        assert inspect.signature(getattr(nb, name)) == inspect.signature(getattr(fisher_ngd, name)), name


@st.composite
def gram_problems(draw):
    N = draw(st.integers(1, 12))
    P = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    log_scale = draw(st.integers(-3, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    G = (10.0**log_scale * rng.standard_normal((N, P))).astype(dtype)
    if draw(st.booleans()) and N > 1:  # duplicated sample: exactly singular Gram
        G[-1] = G[0]
    rhs = rng.uniform(0, 2, N)
    # damping relative to the Gram's scale keeps the solve well conditioned in float64
    rel = draw(st.sampled_from([1e-6, 1e-3, 1.0]))
    damping = rel * max(float(np.mean(G.astype(np.float64) ** 2)) * P, 1e-30)
    return G, rhs, damping


def _close(a, b, dtype, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rtol = 2e-4 if dtype == np.float32 else 1e-8
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(initial=0), 1e-300), err_msg=what)


@given(gram_problems())
def test_numba_agrees_with_reference(problem):
    nb = _numba_module()
    G, rhs, damping = problem
    _close(nb.fisher_gram(G), fisher_ngd.fisher_gram(G), G.dtype, "gram")
    d = nb.fisher_sample_space_direction(G, rhs, damping)
    assert d.dtype == G.dtype and d.shape == (G.shape[1],)
    want = fisher_ngd.fisher_sample_space_direction(G, rhs, damping)
    assert np.all(np.abs(d.astype(np.float64) - want) <= 2 * _direction_error_bound(G, rhs, damping))


@given(gram_problems())
def test_reference_direction_solves_the_damped_system(problem):
    """d = Gᵀa with (GGᵀ + λI) a = rhs, checked against a float64 dense solve."""
    G, rhs, damping = problem
    G64 = G.astype(np.float64)
    a = np.linalg.solve(G64 @ G64.T + damping * np.eye(G.shape[0]), rhs)
    d = fisher_ngd.fisher_sample_space_direction(G, rhs, damping)
    assert np.all(np.abs(d - G64.T @ a) <= _direction_error_bound(G, rhs, damping))


def _direction_error_bound(G, rhs, damping):
    """Elementwise bound on the rounding error of d = Gᵀ(GGᵀ + λI)⁻¹rhs: the gemv in G's dtype
    errs by ~N·eps·|G|ᵀ|a|, and a carries the float64 solve's error ~cond·eps64·|a| plus, for
    float32 G, that of the float32 block products of the Gram, ~cond·block·eps32·|a| (all large
    only when the damped Gram is ill conditioned, e.g. a tiny damping and nearly parallel rows)."""
    G64 = G.astype(np.float64)
    K = G64 @ G64.T + damping * np.eye(G.shape[0])
    a = np.linalg.solve(K, rhs)
    scale = np.abs(G64).T @ np.abs(a)
    gram_eps = min(G.shape[1], fisher_ngd.GRAM_BLOCK) * np.finfo(np.float32).eps if G.dtype == np.float32 else 0.0
    eps = 4 * G.shape[0] * np.finfo(G.dtype).eps + 10 * np.linalg.cond(K) * (np.finfo(np.float64).eps + gram_eps)
    return eps * scale + 1e-300


def _direction_problem(rng, N, F, H, C, dtype):
    from fisheropt.workloads.models import MLP

    m = MLP(F, H, C, seed=int(rng.integers(1 << 20)), dtype=dtype)
    m.set_flat((m.get_flat() + rng.standard_normal(m.n_params)).astype(dtype))
    X = rng.standard_normal((N, F)).astype(dtype)
    y = rng.integers(0, C, N)
    J, p, G = m.logit_jacobians(X), m.probs(X), m.per_sample_grads(X, y)
    return {
        "G": G,
        "J": J,
        "probs": p,
        "s": fo.fisher.logit_grad_sq_norms(p, y),
        "labels_sampled": fo.fisher.sample_labels(p, 2, seed=1),
    }


_NEEDS = {"ef": ("G",), "ief": ("G", "s"), "sf": ("G", "J", "probs", "labels_sampled"), "exact": ("G", "J", "probs")}


@given(
    N=st.integers(1, 8),
    F=st.integers(1, 4),
    H=st.integers(1, 3),
    C=st.integers(2, 4),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(sorted(_NEEDS)),
    lam=st.sampled_from([1e-2, 1.0]),
)
def test_numba_directions_agree_with_reference(N, F, H, C, dtype, seed, kind, lam):
    nb = _numba_module()
    prob = _direction_problem(np.random.default_rng(seed), N, F, H, C, dtype)
    args = {k: prob[k] for k in _NEEDS[kind]}
    want = fisher_ngd.ngd_direction(kind, damping=lam, **args)
    got = _ngd.ngd_direction(kind, damping=lam, backend=nb, **args)
    _close(got, want, dtype, kind)


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("kind", sorted(_NEEDS))
def test_public_api_backends_agree(backend, kind, rng):
    prob = _direction_problem(rng, 6, 3, 3, 3, np.float64)
    args = {k: prob[k] for k in _NEEDS[kind]}
    want = fo.fisher.ngd_direction(kind, damping=0.1, **args)
    _close(fo.fisher.ngd_direction(kind, damping=0.1, backend=backend, **args), want, np.float64, kind)


@pytest.mark.parametrize("kind", ["ef", "ief", "sf", "exact"])
def test_direction_path_never_allocates_p_by_p(kind):
    """P = 2^17: a P x P float64 matrix would be 128 GiB; the direction path's peak
    traced allocation must stay at O(N·C·P) (here < 64 MiB)."""
    rng = np.random.default_rng(0)
    N, C, P = 6, 3, 1 << 17
    G = rng.standard_normal((N, P)).astype(np.float32)
    kw = {"G": G, "damping": 1.0}
    if kind == "ief":
        kw["s"] = rng.uniform(0.1, 1, N)
    if kind in ("sf", "exact"):
        J = rng.standard_normal((N, C, P)).astype(np.float32)
        p = rng.dirichlet(np.ones(C), N).astype(np.float32)
        kw.update(J=J, probs=p)
        if kind == "sf":
            kw["labels_sampled"] = fo.fisher.sample_labels(p, 1, seed=0)
    tracemalloc.start()
    try:
        d = fo.fisher.ngd_direction(kind, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.shape == (P,) and np.all(np.isfinite(d))
    assert peak < 2**30, "a P x P array would be >= 64 GiB; something quadratic was built"
    vec = 8 * P  # one float64 P-vector
    small = 2 * P * G.itemsize + 64 * 8 * N * N + 2**16  # the output d + N x N work arrays
    bound = {
        "ef": small,  # no copy of G at all
        "ief": small,
        "sf": 2 * 8 * N * P + 4 * vec,  # float64 Ĝ (K*N x P, K = 1) + one temporary + P-vectors
        "exact": 8 * N * C * P + 3 * 8 * N * P + 4 * vec,
    }[kind]  # the float64 factor A + N x P temps
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"


# ---- GPU ----------------------------------------------------------------------------
@pytest.mark.gpu
@given(gram_problems())
def test_cupy_agrees_with_reference(problem):
    assert gpu_skip_reason() is None
    import cupy

    cp_backend = fo.backends.get("cupy")
    G, rhs, damping = problem
    Gd = cupy.asarray(G)
    _close(cp_backend.fisher_gram(Gd).get(), fisher_ngd.fisher_gram(G), G.dtype, "gram")
    d = cp_backend.fisher_sample_space_direction(Gd, cupy.asarray(rhs), damping)
    assert d.dtype == G.dtype
    want = fisher_ngd.fisher_sample_space_direction(G, rhs, damping)
    assert np.all(np.abs(d.get().astype(np.float64) - want) <= 2 * _direction_error_bound(G, rhs, damping))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(_NEEDS))
def test_cupy_public_directions_agree(kind, rng):
    assert gpu_skip_reason() is None
    import cupy

    prob = _direction_problem(rng, 6, 3, 3, 3, np.float64)
    args = {k: prob[k] for k in _NEEDS[kind]}
    want = fo.fisher.ngd_direction(kind, damping=0.1, **args)
    dev = {k: cupy.asarray(v) for k, v in args.items()}
    got = fo.fisher.ngd_direction(kind, damping=0.1, backend="auto", **dev)
    assert isinstance(got, cupy.ndarray)
    _close(got.get(), want, np.float64, kind)
    with pytest.raises(TypeError):
        fo.fisher.ngd_direction(kind, damping=0.1, backend="numpy", **dev)


def test_cupy_backend_skips_cleanly_here():
    reason = gpu_skip_reason()
    if reason is None:
        pytest.skip("cupy is usable here; the GPU tests ran")
    with pytest.raises(fo.BackendUnavailable, match="cupy"):
        fo.fisher.ngd_direction("ef", G=np.ones((2, 3)), damping=1.0, backend="cupy")


# ---- the CuPy module's logic, run on the host with NumPy standing in for CuPy ----------
def _load_cupy_fisher_with_numpy(monkeypatch):
    """Import backends/cupy/fisher.py with ``cupy`` = numpy and ``cupyx.scipy.linalg`` = scipy's,
    so its control flow (blocking, Cholesky check, eigh fallback, dtypes) is tested without a GPU.
    The GPU tests above run the real thing where a device exists."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    import scipy.linalg

    import fisheropt.backends as backends_pkg

    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.linalg = types.ModuleType("cupyx.scipy.linalg")
    cupyx.scipy.linalg.solve_triangular = scipy.linalg.solve_triangular
    monkeypatch.setitem(sys.modules, "cupy", np)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", cupyx.scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.linalg", cupyx.scipy.linalg)
    path = Path(backends_pkg.__file__).parent / "cupy" / "fisher.py"
    spec = importlib.util.spec_from_file_location("_fisher_cupy_on_numpy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cupy_module_logic_on_numpy(monkeypatch, rng):
    mod = _load_cupy_fisher_with_numpy(monkeypatch)
    for inspect_name in FISHER_FUNCTIONS:
        assert inspect.signature(getattr(mod, inspect_name)) == inspect.signature(getattr(fisher_ngd, inspect_name))
    monkeypatch.setattr(mod, "GRAM_BLOCK", 16)  # exercise the blocked float32 path
    for dtype in (np.float32, np.float64):
        G = rng.standard_normal((5, 70)).astype(dtype)
        rhs = rng.uniform(0.1, 1, 5)
        _close(mod.fisher_gram(G), G.astype(np.float64) @ G.astype(np.float64).T, dtype, "gram")
        want = fisher_ngd.fisher_sample_space_direction(G, rhs, 0.1)
        got = mod.fisher_sample_space_direction(G, rhs, 0.1)
        assert got.dtype == dtype
        _close(got, want, dtype, "direction")
    # the condition check runs before cuSOLVER's Cholesky (which reports failure by NaNs, not an
    # exception): an ill-conditioned damped Gram is refused like on the host, never factorised
    G = rng.standard_normal((4, 9))
    G[3] = G[0]
    monkeypatch.setattr(np.linalg, "cholesky", lambda a: np.full_like(a, np.nan))
    with pytest.raises(fisher_ngd.DampingTooSmall, match="too small"):
        mod.fisher_sample_space_direction(G, np.ones(4), 1e-13)
    bad = G.copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        mod.fisher_sample_space_direction(bad, np.ones(4), 0.2)


def test_cupy_module_directions_on_numpy(monkeypatch, rng):
    mod = _load_cupy_fisher_with_numpy(monkeypatch)
    prob = _direction_problem(rng, 5, 3, 3, 3, np.float64)
    for kind, needs in _NEEDS.items():
        args = {k: prob[k] for k in needs}
        _close(
            _ngd.ngd_direction(kind, damping=0.1, backend=mod, **args),
            fisher_ngd.ngd_direction(kind, damping=0.1, **args),
            np.float64,
            kind,
        )
