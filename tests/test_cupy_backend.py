"""The cupy backend against the reference: its kernels run by the CPU emulator
(``backends/cupy/_emulate.py``, needs g++) and, marked ``gpu``, by CuPy on a GPU.

Agreement tests run by two backends: ``emulated`` (the exact CUDA source, compiled by g++
with a CUDA prelude, small block and chunk sizes so that every multi-chunk / multi-tile path
is exercised, through the rule modules' own ``<rule>_step`` functions on an emulated engine)
and ``cupy`` (marked ``gpu``; skipped with the registry's reason when CuPy or a GPU is absent).
ESimCSE's momentum-encoder update ``ema_update`` (esimcse.py's kernel) and the two passes of a
sharded step (FSDP2 / DTensor) by both. Then the registry's behaviour
without a GPU, and GPU-only tests (the optimizer classes, DLPack, a large multi-chunk problem).

The backend's internals (tables, the engine's host logic, the CUDA text and its PTX, the
package's plumbing without CuPy, the mutants): tests/backends/test_cupy_internals.py.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import pytest
from cupy_emulated import (
    DTYPES,
    FHP,
    HAVE_CXX,
    HP,
    RULES,
    EmulatedBackend,
    _assert_agree,
    _run_both,
    cuda_kernels,
    ema_both,
    fixed_problem,
    problems,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fisheropt as fo
from fisheropt import refimpl, vectors
from fisheropt.refimpl import esimcse_momentum
from fisheropt.refimpl.esimcse_momentum import MOMENTUM


def _cupy_reason():
    return fo.backends.unavailable().get("cupy")


# =====================================================================================
# CPU: registry behaviour without a GPU
# =====================================================================================
def test_registry_reports_cupy_unusable_with_a_reason():
    reason = _cupy_reason()
    if reason is None:
        pytest.skip("cupy is usable on this machine")
    assert "cupy" not in fo.backends.available()
    assert isinstance(reason, str) and reason
    with pytest.raises(fo.BackendUnavailable, match=re.escape(reason[:40])):
        fo.backends.get("cupy")
    with pytest.raises(fo.BackendUnavailable, match="cupy"):
        fo.Adam([np.zeros(3, np.float32)], backend="cupy")


def test_explicit_cupy_backend_refuses_host_arrays_when_usable():
    if _cupy_reason() is not None:
        pytest.skip(f"cupy backend unavailable: {_cupy_reason()}")
    with pytest.raises(TypeError, match="does not operate"):
        fo.Adam([np.zeros(3, np.float32)], backend="cupy")


# =====================================================================================
# Agreement with the reference: the emulated kernels (CPU) and the real ones (GPU)
# =====================================================================================
class CupyBackend:
    name = "cupy"

    def __init__(self):
        import cupy

        self.cupy = cupy
        self.module = fo.backends.get("cupy")

    def __getattr__(self, fn):  # the backend's functions (all of FUNCTIONS, for the vector suites)
        return getattr(self.module, fn)

    def to_device(self, a, misaligned=False):
        a = np.asarray(a)
        if not misaligned:
            return self.cupy.asarray(a)
        buf = self.cupy.empty(a.size + 1, a.dtype)
        out = buf[1:].reshape(a.shape)
        out[...] = self.cupy.asarray(a)
        return out

    def to_host(self, a):
        return self.cupy.asnumpy(a)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("emulated", marks=pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")),
        pytest.param("cupy", marks=pytest.mark.gpu),
    ],
)
def backend(request):
    if request.param == "emulated":
        return EmulatedBackend()
    reason = _cupy_reason()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return CupyBackend()


#: the rules whose arithmetic is elementwise: the same order of operations as the reference, no
#: contraction, no flush-to-zero, hence identical bits; the others reduce in float64 (tolerance)
EXACT_RULES = ("adam", "adamw", "lion")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("rule", list(RULES))
@given(data=st.data())
@settings(max_examples=15)
def test_rules_agree_with_the_reference(backend, rule, data):
    """Adam, AdamW and Lion (spec/lion.md's order of operations) bit for bit; FAdam and Coupled
    Adam within the tolerance of their float64 reductions."""
    pb = data.draw(problems(rule))
    ref, got = _run_both(backend, rule, pb)
    exact = rule in EXACT_RULES
    _assert_agree(ref, got, exact=exact, magnitude=1 if exact else max(pb["scale"], pb["grad_scale"], 1.0))


@pytest.mark.parametrize("rule", list(RULES))
def test_results_are_deterministic(backend, rule):
    coupled = rule == "coupled_adam"
    shapes = [(37, 61), (5, 3)] if coupled else [(37, 61), (700,), ()]
    pb = fixed_problem(rule, shapes, ["float32", "float64", "float32"][: len(shapes)], seed=11, steps=3)
    _, first = _run_both(backend, rule, pb)
    _, second = _run_both(backend, rule, pb)
    _assert_agree(first, second, exact=True, magnitude=1)


@pytest.mark.parametrize("misaligned", [False, True])
def test_all_finite(backend, misaligned):
    arrays = [
        np.ones(s, d)
        for s, d in [((3, 4), "float32"), ((), "float64"), ((0,), "float32"), ((701,), "float64"), ((129,), "float32")]
    ]
    dev = [backend.to_device(a, misaligned) for a in arrays]
    assert backend.all_finite(dev) is True
    assert backend.all_finite([]) is True
    for bad in (np.nan, np.inf, -np.inf):
        for i, pos in [(3, 700), (4, 0), (1, ())]:
            broken = [a.copy() for a in arrays]
            broken[i][pos] = bad
            assert backend.all_finite([backend.to_device(a, misaligned) for a in broken]) is False


# ---- Lion: edge values, bit for bit --------------------------------------------------------
def _assert_bits(got, want, what):
    """Identical values, the sign of zero included; NaN in the same places (payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    bits = np.dtype(f"u{want.dtype.itemsize}")
    np.testing.assert_array_equal(got[~nan].view(bits), want[~nan].view(bits), err_msg=f"{what}: bits")


_EDGE = {
    "float32": [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1e-45, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-3],
    "float64": [0.0, -0.0, 1.0, -1.0, 1e-310, -1e-310, 5e-324, np.nan, np.inf, -np.inf, 1.7e308, -1.7e308, 1e-3],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta1,weight_decay", [(0.0, 0.0), (0.5, 0.1), (0.9, 1.0)])
def test_lion_edge_values_are_bitwise_the_reference(backend, dtype, beta1, weight_decay):
    """Every triple (m, g, θ) of zeros of both signs, ±1, subnormals, NaN, ±Inf and huge
    values: sign(0) = 0 (with β1 = 0.5, m = 1 and g = -1 give c = 0 exactly), sign(±Inf) = ±1,
    sign(NaN) = NaN, a subnormal c still moves θ by lr (no flush to zero)."""
    vals = np.array(_EDGE[dtype], dtype=dtype)
    mm, gg, theta = (np.ascontiguousarray(a) for a in np.meshgrid(vals, vals, vals, indexing="ij"))
    hp = dict(lr=0.25, beta1=beta1, beta2=0.99, weight_decay=weight_decay)
    want = [theta.copy()], [mm.copy()]
    refimpl.lion_step(want[0], [gg.copy()], want[1], step=3, **hp)
    dev_p, dev_m = [backend.to_device(theta)], [backend.to_device(mm)]
    backend.lion_step(dev_p, [backend.to_device(gg)], dev_m, step=3, **hp)
    got = backend.to_host(dev_p[0])
    _assert_bits(got, want[0][0], "params")
    _assert_bits(backend.to_host(dev_m[0]), want[1][0], "m")
    T = np.dtype(dtype).type
    one, zero, sub = list(vals).index(1.0), list(vals).index(0.0), list(vals).index(vals[vals > 0].min())
    t0 = vals[one]  # θ = 1, where θ's own value can show the move
    if beta1 == 0.5:  # c = 0.5·1 + 0.5·(-1) = 0: only the decay moves θ
        assert got[one, list(vals).index(-1.0), one] == t0 - T(0.25) * (T(0) + T(weight_decay) * t0)
    if beta1 == 0.0:  # m = 0, g subnormal: c subnormal, sign 1; m = g = 0: c = 0, sign 0
        assert got[zero, sub, one] == t0 - T(0.25) * (T(1) + T(weight_decay) * t0)
        assert got[zero, zero, one] == t0 - T(0.25) * (T(0) + T(weight_decay) * t0)


def _cancelling_pairs(dtype, beta1, n, seed):
    """(m, g) with β1·m + (1-β1)·g exactly 0 in ``dtype`` (two roundings), while β1·m itself is
    not exact: a fused multiply-add would leave its rounding error there, a sign of ±1."""
    from fractions import Fraction

    T = np.dtype(dtype).type
    b1, omb1 = T(beta1), T(1 - beta1)
    rng = np.random.default_rng(seed)
    ms, gs = [], []
    for m in rng.standard_normal(4 * n).astype(dtype):
        q = b1 * m
        if Fraction(float(q)) == Fraction(float(b1)) * Fraction(float(m)):
            continue
        g = T(-q / omb1)
        for _ in range(4):
            if omb1 * g == -q:
                ms.append(m)
                gs.append(g)
                break
            g = np.nextafter(g, T(np.inf) if omb1 * g < -q else T(-np.inf))
        if len(ms) == n:
            break
    return np.array(ms, dtype), np.array(gs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lion_exact_cancellation_does_not_move_theta(backend, dtype):
    """c = 0 after two roundings: sign 0, θ moved by the decay alone, as the reference. A
    contracted c (FMA) keeps the product's rounding error and moves θ by ±lr."""
    m, g = _cancelling_pairs(dtype, 0.9, 200, seed=3)
    assert len(m) >= 100
    theta = np.linspace(-1, 1, len(m)).astype(dtype)
    hp = dict(lr=0.25, beta1=0.9, beta2=0.99, weight_decay=0.1)
    want = [theta.copy()], [m.copy()]
    refimpl.lion_step(want[0], [g], want[1], step=1, **hp)
    T = np.dtype(dtype).type
    np.testing.assert_array_equal(want[0][0], theta - T(0.25) * (T(0) + T(0.1) * theta))
    dev_p, dev_m = [backend.to_device(theta)], [backend.to_device(m)]
    backend.lion_step(dev_p, [backend.to_device(g)], dev_m, step=1, **hp)
    _assert_bits(backend.to_host(dev_p[0]), want[0][0], "params")
    _assert_bits(backend.to_host(dev_m[0]), want[1][0], "m")


# ---- ESimCSE momentum encoder (ema_update): bit for bit -------------------------------------
#: sizes around the emulator's chunk (96) and the vector widths (4, 2): partial groups, a partial
#: last chunk, a scalar, an empty tensor
EMA_SHAPES = [(701,), (37, 5), (97,), (3,), (), (1,), (0, 3), (2, 96)]
EMA_DECAYS = [MOMENTUM, 0.0, 1.0, 0.5, 0.999999]


def _ema_tensors(shapes, dtypes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [[np.asarray(rng.standard_normal(s) * scale, dtype=d) for s, d in zip(shapes, dtypes)] for _ in range(2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", EMA_DECAYS)
@pytest.mark.parametrize("misaligned", [False, True])
def test_ema_update_is_bitwise_the_reference(backend, dtype, decay, misaligned):
    """Three updates of tensors of every size class, aligned (16-byte vector access) or not."""
    for scale in (1.0, 1e-30, 1e30):
        targets, sources = _ema_tensors(EMA_SHAPES, [dtype] * len(EMA_SHAPES), seed=3, scale=scale)
        want, got = ema_both(backend, targets, sources, decay, misaligned=misaligned, updates=3)
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_bits(g, w, f"targets[{i}] scale {scale}")


_EMA_EDGE = {  # _EDGE, with the smallest normal numbers: their products with λ are subnormal
    "float32": _EDGE["float32"] + [1.1754944e-38, -1.1754944e-38, 1.7e-38],
    "float64": _EDGE["float64"] + [2.2250738585072014e-308, -2.2250738585072014e-308, 3e-308],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", EMA_DECAYS)
def test_ema_update_edge_values_are_bitwise_the_reference(backend, dtype, decay):
    """Every pair (θ_k, θ_q) of zeros of both signs, ±1, subnormals, the smallest normals (whose
    products are subnormal), NaN, ±Inf and huge values: IEEE's results in the dtype, with no
    flush-to-zero (a subnormal input or product is kept) and the sign of zero kept."""
    vals = np.array(_EMA_EDGE[dtype], dtype=dtype)
    theta_k, theta_q = (np.ascontiguousarray(a) for a in np.meshgrid(vals, vals, indexing="ij"))
    want, got = ema_both(backend, [theta_k], [theta_q], decay)
    _assert_bits(got[0], want[0], "targets")


def test_ema_update_keeps_float32_subnormals(backend):
    """θ of magnitude ~1e-40 (float32 subnormals) and results that become subnormal (λ·θ_k for θ_k
    near the smallest normal): a GPU that flushes them (CuPy's ElementwiseKernel compiles with
    -ftz=true) gives 0 where the reference gives, e.g., -1.45e-40."""
    tiny = np.finfo(np.float32).tiny
    rng = np.random.default_rng(21)
    shapes = [(3, 4), (7,), (), (129,)]
    targets = [rng.uniform(-2.5e-40, 2.5e-40, s).astype(np.float32) for s in shapes]
    sources = [rng.uniform(-2.5e-40, 2.5e-40, s).astype(np.float32) for s in shapes]
    targets.append(np.array([tiny, -tiny, 1.001 * tiny, -1.5 * tiny], np.float32))  # λ·θ_k subnormal
    sources.append(np.array([0.0, -0.0, tiny, 1e-45], np.float32))
    want, got = ema_both(backend, targets, sources, MOMENTUM)
    flat = np.concatenate([w.ravel() for w in want])
    assert np.count_nonzero((flat != 0) & (np.abs(flat) < tiny)) > 100  # the check has subnormals to see
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_bits(g, w, f"targets[{i}]")


@pytest.mark.parametrize("misaligned", [False, True])
def test_ema_update_mixed_dtypes_strided_sources_and_empty_tensors(backend, misaligned):
    """float32 and float64 tensors in one call, sources of any strides (sliced, transposed, reversed:
    read, never written), zero-size tensors; an empty call is a no-op."""
    rng = np.random.default_rng(8)
    dtypes = ["float32", "float64", "float32", "float64", "float32", "float64"]
    shapes = [(40, 12), (33, 7), (0,), (5, 0), (701,), (9, 4)]
    targets = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes)]
    bases = [  # device arrays whose views are the sources
        np.asarray(rng.standard_normal((40, 24)), np.float32),  # [:, ::2]
        np.asarray(rng.standard_normal((7, 33)), np.float64),  # .T
        np.zeros(0, np.float32),
        np.zeros((5, 0), np.float64),
        np.asarray(rng.standard_normal(1402), np.float32),  # [::2]
        np.asarray(rng.standard_normal((9, 4)), np.float64),  # [::-1, ::-1]
    ]
    views = [lambda a: a[:, ::2], lambda a: a.T, lambda a: a, lambda a: a, lambda a: a[::2], lambda a: a[::-1, ::-1]]
    host_sources = [view(b) for view, b in zip(views, bases)]
    dev_bases = [backend.to_device(b, misaligned) for b in bases]
    dev_sources = [view(b) for view, b in zip(views, dev_bases)]
    assert not dev_sources[0].flags.c_contiguous and not dev_sources[5].flags.c_contiguous
    want = [t.copy() for t in targets]
    dev_targets = [backend.to_device(t, misaligned) for t in targets]
    esimcse_momentum.ema_update(want, host_sources, decay=0.9)
    backend.ema_update(dev_targets, dev_sources, decay=0.9)
    for i, (t, w) in enumerate(zip(dev_targets, want)):
        _assert_bits(backend.to_host(t), w, f"targets[{i}]")
    for i, (b, h) in enumerate(zip(dev_bases, bases)):
        np.testing.assert_array_equal(backend.to_host(b), h, err_msg=f"source {i} written")
    backend.ema_update([], [], decay=0.9)


@given(
    seed=st.integers(0, 2**32 - 1),
    decay=st.floats(0.0, 1.0),
    exp=st.sampled_from([-42, -39, -30, -3, 0, 3, 30]),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=4),
    misaligned=st.booleans(),
)
@settings(max_examples=15)
def test_ema_update_agrees_with_the_reference_property(backend, seed, decay, exp, dtypes, misaligned):
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(0, 40, rng.integers(0, 3))) for _ in dtypes]
    targets, sources = _ema_tensors(shapes, dtypes, seed, scale=10.0**exp)
    want, got = ema_both(backend, targets, sources, decay, misaligned=misaligned)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_bits(g, w, f"targets[{i}]")


def test_ema_update_passes_the_esimcse_vectors(backend):
    """Every golden case of spec/vectors/esimcse.json (``ema_float32_subnormal`` among them), also on
    misaligned arrays."""
    cases = [c for c in vectors.load_suite("esimcse")["cases"] if c["function"] == "ema_update"]
    assert "ema_float32_subnormal" in [c["name"] for c in cases]
    for misaligned in (False, True):
        to_device = partial(backend.to_device, misaligned=misaligned)
        failures = [message for case in cases for message in vectors.run_case(case, backend, to_device=to_device)]
        assert failures == [], misaligned


# ---- per-tensor hyperparameters (param groups, per-parameter step counts) ----------------
def _per_tensor_problem(rule, seed):
    rng = np.random.default_rng(seed)
    if rule == "coupled_adam":
        shapes, coupled = [(40, 7), (3, 5), (9, 11), (40, 7), (6,)], [True, False, True, True, False]
    else:
        shapes, coupled = [(40, 7), (3, 5), (701,), (64, 9), (40, 7), ()], None
    dtypes = ["float32", "float64", "float32", "float64", "float32", "float32"][: len(shapes)]
    n = len(shapes)
    # tensors 0 and 4 share every value (one launch); the others differ in something
    hp = dict(
        step=[5, 1, 17, 3, 5, 2][:n],
        lr=[1e-2, 0.05, 1e-3, 1e-2, 1e-2, 0.2][:n],
        beta1=[0.9, 0.5, 0.0, 0.9, 0.9, 0.9][:n],
        beta2=[0.99, 0.999, 0.9, 0.5, 0.99, 0.999][:n],
        weight_decay=[0.0, 0.1, 0.01, 0.5, 0.0, 0.1][:n],
    )
    if rule != "lion":
        hp["eps"] = [1e-8, 1e-3, 1e-8, 1e-6, 1e-8, 1e-8][:n]
    if rule == "fadam":
        hp.update(
            eps2=[0.01, 0.1, 0.01, 1.0, 0.01, 0.01],
            clip=[1.0, 0.5, 2.0, 1.0, 1.0, 0.25],
            p=[0.5, 1.0, 0.25, 0.5, 0.5, 0.75],
        )
    if rule == "coupled_adam":
        hp["coupled"] = coupled
    state_names = RULES[rule][1]
    params = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes)]
    state = []
    for k in state_names:
        arrs = []
        for i, (s, d) in enumerate(zip(shapes, dtypes)):
            s = (s[1],) if coupled and coupled[i] and k == "v" else s
            x = rng.standard_normal(s)
            arrs.append(np.asarray(x * x if k in ("v", "f") else 0.1 * x, dtype=d))
        state.append(arrs)
    grads = [
        [np.asarray(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2), dtype=d) for s, d in zip(shapes, dtypes)]
        for _ in range(3)
    ]
    return params, state, grads, hp


@pytest.mark.parametrize("rule", list(RULES))
def test_per_tensor_hyperparameters_match_the_reference(backend, rule):
    """``step`` and every hyperparameter as one value per tensor, in one call (FAdam's p, eps2
    and clip too, Coupled Adam with coupled and AdamW tensors mixed): the reference's
    results, bit for bit where the rule's arithmetic is elementwise."""
    params, state, grads, hp = _per_tensor_problem(rule, 7)
    fn = RULES[rule][0]
    ref_p, ref_s = [p.copy() for p in params], [[a.copy() for a in s] for s in state]
    dev_p, dev_s = [backend.to_device(p) for p in params], [[backend.to_device(a) for a in s] for s in state]
    for k, g in enumerate(grads):
        kw = dict(hp, step=[t + k for t in hp["step"]])
        if k == 2:  # tuples are per-tensor too
            kw = {name: tuple(v) if isinstance(v, list) else v for name, v in kw.items()}
        getattr(refimpl, fn)(ref_p, [x.copy() for x in g], *ref_s, **kw)
        getattr(backend, fn)(dev_p, [backend.to_device(x) for x in g], *dev_s, **kw)
    got = [backend.to_host(p) for p in dev_p], [[backend.to_host(a) for a in s] for s in dev_s]
    _assert_agree((ref_p, ref_s), got, exact=rule in EXACT_RULES, magnitude=10)


@pytest.mark.parametrize("rule", ["adam", "fadam", "lion"])
def test_shared_and_per_tensor_values_give_the_same_bits(backend, rule):
    """A list whose values are all equal is the same step as the one value."""
    params, state, grads, hp = _per_tensor_problem(rule, 8)
    shared = {k: v[0] for k, v in hp.items()}
    listed = {k: [v] * len(params) for k, v in shared.items()}
    fn = RULES[rule][0]
    out = []
    for kw in (shared, listed):
        p, st = [backend.to_device(x) for x in params], [[backend.to_device(a) for a in s] for s in state]
        getattr(backend, fn)(p, [backend.to_device(x) for x in grads[0]], *st, **kw)
        out.append(([backend.to_host(x) for x in p], [[backend.to_host(a) for a in s] for s in st]))
    _assert_agree(out[0], out[1], exact=True, magnitude=1)


# ---- <rule>_step_checked: the finiteness check fused into the reductions -------------------
@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
def test_fused_finiteness_check_refuses_before_any_write(backend, rule):
    """A NaN/Inf in any tensor's gradient (coupled or AdamW, any dtype group) is found by the
    reductions, which run for every group before any write: False, nothing written; with
    finite gradients the checked step is the unchecked one, bit for bit."""
    params, state, grads, hp = _per_tensor_problem(rule, 9)
    fn = RULES[rule][0]
    hp = dict(hp)
    dev_p, dev_s = [backend.to_device(p) for p in params], [[backend.to_device(a) for a in s] for s in state]
    for bad in range(len(params)):
        g = [x.copy() for x in grads[0]]
        g[bad].flat[g[bad].size // 2] = (np.nan, np.inf, -np.inf)[bad % 3]
        before = [backend.to_host(a).tobytes() for a in dev_p + [a for s in dev_s for a in s]]
        assert getattr(backend, fn + "_checked")(dev_p, [backend.to_device(x) for x in g], *dev_s, **hp) is False
        assert [backend.to_host(a).tobytes() for a in dev_p + [a for s in dev_s for a in s]] == before, bad
    unchecked_p = [backend.to_device(backend.to_host(p)) for p in dev_p]
    unchecked_s = [[backend.to_device(backend.to_host(a)) for a in s] for s in dev_s]
    g = [backend.to_device(x) for x in grads[1]]
    assert getattr(backend, fn + "_checked")(dev_p, g, *dev_s, **hp) is True
    getattr(backend, fn)(unchecked_p, g, *unchecked_s, **hp)
    _assert_agree(
        ([backend.to_host(p) for p in dev_p], [[backend.to_host(a) for a in s] for s in dev_s]),
        ([backend.to_host(p) for p in unchecked_p], [[backend.to_host(a) for a in s] for s in unchecked_s]),
        exact=True,
        magnitude=1,
    )


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("rule", ["fadam", "coupled_adam"])
def test_fused_check_accepts_huge_finite_float64_gradients(backend, rule):
    """Σg² overflows to Inf for |g| > 1e154 in float64 although g is finite: the gradients are
    then read again, and the step goes ahead as the reference's does."""
    params = [np.ones((50, 20)), np.ones((4, 3))]
    grads = [np.full((50, 20), 1e200), np.full((4, 3), 1e-3)]
    m = [np.zeros_like(p) for p in params]
    if rule == "fadam":
        state = [np.zeros_like(p) for p in params]
        hp = dict(step=1, **FHP)
    else:
        state = [np.zeros(20), np.zeros(3)]
        hp = dict(step=1, coupled=[True, True], **HP)
    fn = RULES[rule][0]
    ref_p, ref_m, ref_s = [p.copy() for p in params], [a.copy() for a in m], [a.copy() for a in state]
    getattr(refimpl, fn)(ref_p, grads, ref_m, ref_s, **hp)
    dev = [[backend.to_device(a) for a in lst] for lst in (params, m, state)]
    assert (
        getattr(backend, fn + "_checked")(dev[0], [backend.to_device(g) for g in grads], dev[1], dev[2], **hp) is True
    )
    assert np.isinf(backend.to_host(dev[2][0])).all()  # g² overflowed: the step went ahead
    _assert_agree(
        (ref_p, [ref_m, ref_s]),
        (
            [backend.to_host(a) for a in dev[0]],
            [[backend.to_host(a) for a in dev[1]], [backend.to_host(a) for a in dev[2]]],
        ),
        exact=False,
        magnitude=1,
    )


@pytest.mark.parametrize("suite", sorted(vectors.SUITES))
def test_spec_vectors(backend, suite):
    """Every suite; the emulator only has the update rules and ema_update (the streaming kernels), the
    real backend must run every case."""
    failures, ran = [], 0
    for case in vectors.load_suite(suite)["cases"]:
        if backend.name == "emulated" and not hasattr(backend, case["function"]):
            continue
        failures += vectors.run_case(case, backend, to_device=backend.to_device)
        ran += 1
    if ran == 0:
        pytest.skip(f"suite {suite}: no case the emulator runs (the update rules and ema_update only)")
    assert failures == []


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
def test_fadam_epsilon_follows_rms_of_tiny_gradients():
    """With eps2·RMS(g) < eps the adaptive epsilon depends on the float64 RMS reduction
    (it does not for ordinary gradients, where min(eps, eps2·RMS) = eps)."""
    emu = EmulatedBackend()
    pb = fixed_problem(
        "fadam",
        [(37, 61), (700,), ()],
        ["float32", "float64", "float32"],
        seed=2,
        grad_scale=1e-9,
        steps=3,
        misaligned=True,
        hp=dict(FHP, p=0.25),
    )
    ref, got = _run_both(emu, "fadam", pb)
    _assert_agree(ref, got, exact=False, magnitude=1e-9)


# =====================================================================================
# The two passes of a sharded step (FSDP2 / DTensor, spec/distributed.md §5)
# =====================================================================================
# (apply given a tensor's own partials is the single-process step, bit for bit:
# tests/test_torch_fsdp.py, for every backend with the two passes, this one on the emulator)
RANKS, SHARDED_STEPS = 3, 3
SHARDED_SHAPES = [(70, 9), (129,), (2,), (3, 4), (2, 5), (0, 4)]  # by rows over 3 ranks: 2 rows give 1, 1, 0
SHARDED_FHP = dict(FHP, lr=1e-2, clip=0.5)  # ḡ and w̄ clipped: their sums matter
COUPLED = [True, False, False, True, True, False]  # Coupled Adam's coupled tensors (the others: AdamW)
EPS64 = float(np.finfo(np.float64).eps)


def _rows_of_rank(x, rank):
    """Rank ``rank``'s share of x's rows, as FSDP2's Shard(0) (torch.chunk: trailing shards may be empty)."""
    size = -(-x.shape[0] // RANKS)
    return x[min(rank * size, x.shape[0]) : min((rank + 1) * size, x.shape[0])]


def _sharded_problem(backend, dtype, tiny, coupled):
    """(θ, the gradients of each step, the arrays of one process, those of each rank): θ, m = 0.1 and
    f or v = 0.5 (Coupled Adam's v of shape (d,) where ``coupled``, whole on every rank). With ``tiny``
    one tensor's gradient has RMS(g) < ε/ε₂, so that FAdam's ε_t is not the guess of pass 1."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(dtype) for s in SHARDED_SHAPES]
    grads = [
        [
            (rng.standard_normal(s) * (1e-12 if tiny and i == 1 else 1)).astype(dtype)
            for i, s in enumerate(SHARDED_SHAPES)
        ]
        for _ in range(SHARDED_STEPS)
    ]
    m = [np.full_like(x, 0.1) for x in params]
    second = [np.full(x.shape[1], 0.5, dtype) if c else np.full_like(x, 0.5) for x, c in zip(params, coupled)]
    whole = [[backend.to_device(x) for x in arrays] for arrays in (params, m, second)]

    def on_rank(x, r, replicated=False):
        return backend.to_device(x if replicated else _rows_of_rank(x, r))

    ranks = [
        [
            [on_rank(x, r) for x in params],
            [on_rank(x, r) for x in m],
            [on_rank(x, r, c) for x, c in zip(second, coupled)],
        ]
        for r in range(RANKS)
    ]
    return params, grads, whole, ranks


def _local_grads(backend, g, r):
    return [backend.to_device(_rows_of_rank(x, r)) for x in g]


def _ordered_sum(per_rank):
    """What every rank gets from the all-gather of its partials, added in rank order."""
    total = np.array(per_rank[0], np.float64)
    for values in per_rank[1:]:
        total = total + values
    return total


def _assert_ranks_agree_with_one_process(backend, whole, ranks, coupled, dtype):
    """Gathered over the ranks (a replicated v: every rank's copy, bitwise the same), within
    spec/distributed.md §5.3's 4·K·n·ε₆₄ of the largest entry (the order of the float64 sums) of one
    process; in float32 a scalar rounded to the parameter dtype may land on the neighbouring value,
    one ulp of it more."""
    tolerance = 4 * SHARDED_STEPS * (max(np.prod(s) for s in SHARDED_SHAPES) * EPS64 + float(np.finfo(dtype).eps))
    for k, arrays in enumerate(whole):
        for i, array in enumerate(arrays):
            want, shards = backend.to_host(array), [backend.to_host(ranks[r][k][i]) for r in range(RANKS)]
            if k == 2 and coupled[i]:
                assert all(x.tobytes() == shards[0].tobytes() for x in shards), (k, i)
            got = shards[0] if k == 2 and coupled[i] else np.concatenate(shards)
            assert got.dtype == want.dtype and got.shape == want.shape, (k, i)
            scale = max(float(np.abs(want).max(initial=0)), 1e-300)
            err = float(np.abs(got.astype(np.float64) - want).max(initial=0)) / scale
            assert err <= tolerance, (k, i, err, tolerance)


def _other_backends():
    return [fo.backends.get(name) for name in ("numpy", "numba") if name in fo.backends.available()]


def _assert_pass1_wrote_nothing(backend, host, device):
    for host_arrays, device_arrays in zip(host, device):
        assert all(backend.to_host(a).tobytes() == x.tobytes() for a, x in zip(device_arrays, host_arrays))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiny", [False, True])
def test_fadam_partials_agree_with_the_reference_and_numba(backend, dtype, tiny):
    """Pass 1's (Σg², Σḡ², Σw̄²) per tensor, ε_t guessed and given: the reference's (the same quotients)
    within the float64 summation-order bound 2nε₆₄; numba's (it multiplies by reciprocals, spec/fadam.md)
    within a few ulp of the dtype more. Pass 1 writes nothing."""
    params, grads, whole, _ = _sharded_problem(backend, dtype, tiny, [False] * len(SHARDED_SHAPES))
    host = [[backend.to_host(x) for x in arrays] for arrays in whole]
    g, n = [backend.to_device(x) for x in grads[0]], max(x.size for x in params)
    for eps_t in (None, [1e-3, 1e-12, 2.0, 1e-8, 1e-8, 1e-8]):
        got = backend.fadam_partials(whole[0], g, *whole[1:], step=2, **SHARDED_FHP, eps_t=eps_t)
        assert isinstance(got, np.ndarray) and got.shape == (len(params), 3) and got.dtype == np.float64
        for other in _other_backends():
            want = other.fadam_partials(host[0], grads[0], *host[1:], step=2, **SHARDED_FHP, eps_t=eps_t)
            ulps = 0 if other.NAME == "numpy" else 4 * float(np.finfo(dtype).eps)
            np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=2 * n * EPS64, atol=0, err_msg=other.NAME)
            np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=2 * n * EPS64 + ulps, atol=0, err_msg=other.NAME)
    _assert_pass1_wrote_nothing(backend, host, whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_coupled_adam_partials_agree_with_the_reference(backend, dtype):
    """Pass 1's column sums of g² per coupled tensor, in order: within the float64 summation-order bound
    2Vε₆₄ of the reference's and numba's. Pass 1 writes nothing."""
    _, grads, whole, _ = _sharded_problem(backend, dtype, False, COUPLED)
    host = [[backend.to_host(x) for x in arrays] for arrays in whole]
    g = [backend.to_device(x) for x in grads[0]]
    got = backend.coupled_adam_partials(whole[0], g, *whole[1:], step=2, coupled=COUPLED, **HP)
    assert [(type(x), x.dtype, x.shape) for x in got] == [
        (np.ndarray, np.float64, (s[1],)) for s, c in zip(SHARDED_SHAPES, COUPLED) if c
    ]
    for other in _other_backends():
        want = other.coupled_adam_partials(host[0], grads[0], *host[1:], step=2, coupled=COUPLED, **HP)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=2 * SHARDED_SHAPES[0][0] * EPS64, atol=0, err_msg=other.NAME)
    _assert_pass1_wrote_nothing(backend, host, whole)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiny", [False, True])
def test_fadam_sharded_by_rows_agrees_with_one_process(backend, dtype, tiny):
    """3 ranks (row shards, one empty), 3 steps, as fisheropt.torch.sharded runs them: every rank's pass 1,
    the sums added in rank order, Σḡ², Σw̄² again with the true ε_t where it is not the guess (``tiny``),
    every rank's pass 2 with the whole tensors' sums and sizes."""
    sharded = pytest.importorskip("fisheropt.torch.sharded")
    params, grads, whole, ranks = _sharded_problem(backend, dtype, tiny, [False] * len(SHARDED_SHAPES))
    counts = [x.size for x in params]
    for t, g in enumerate(grads, start=1):
        backend.fadam_step(whole[0], [backend.to_device(x) for x in g], *whole[1:], step=t, **SHARDED_FHP)
        local = [(p, _local_grads(backend, g, r), m, f) for r, (p, m, f) in enumerate(ranks)]
        sums = _ordered_sum([backend.fadam_partials(*arrays, step=t, **SHARDED_FHP) for arrays in local])
        redo, eps_t = sharded.true_epsilons(sums, counts, params, SHARDED_FHP)
        assert bool(redo) == tiny
        if redo:
            subsets = [[[x[i] for i in redo] for x in arrays] for arrays in local]
            again = [backend.fadam_partials(*subset, step=t, **SHARDED_FHP, eps_t=eps_t) for subset in subsets]
            sums[redo, 1:] = _ordered_sum([x[:, 1:] for x in again])
        for arrays in local:
            backend.fadam_apply(*arrays, step=t, **SHARDED_FHP, sums=sums, counts=counts)
    _assert_ranks_agree_with_one_process(backend, whole, ranks, [False] * len(SHARDED_SHAPES), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_coupled_adam_sharded_by_rows_agrees_with_one_process(backend, dtype):
    """The coupled matrices split by rows over 3 ranks, v̄ whole on each (replicated), the others AdamW
    on their row shards: every rank's column sums added in rank order, divided by the whole V."""
    params, grads, whole, ranks = _sharded_problem(backend, dtype, False, COUPLED)
    rows = [x.shape[0] for x, c in zip(params, COUPLED) if c]
    for t, g in enumerate(grads, start=1):
        backend.coupled_adam_step(
            whole[0], [backend.to_device(x) for x in g], *whole[1:], step=t, coupled=COUPLED, **HP
        )
        local = [(p, _local_grads(backend, g, r), m, v) for r, (p, m, v) in enumerate(ranks)]
        per_rank = [backend.coupled_adam_partials(*arrays, step=t, coupled=COUPLED, **HP) for arrays in local]
        sums = [_ordered_sum([partials[k] for partials in per_rank]) for k in range(len(rows))]
        for arrays in local:
            backend.coupled_adam_apply(*arrays, step=t, coupled=COUPLED, **HP, column_sums=sums, rows=rows)
    _assert_ranks_agree_with_one_process(backend, whole, ranks, COUPLED, dtype)


# =====================================================================================
# The production configuration (block 256, chunk 16384) on the emulator: one large case
# =====================================================================================
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the emulator")
def test_production_block_and_chunk_sizes_on_the_emulator():
    emu = EmulatedBackend(block=cuda_kernels.BLOCK, chunk=cuda_kernels.CHUNK, min_rows=32, max_rows=256)
    for rule in ("adamw", "fadam", "coupled_adam", "lion"):
        shapes = [(70, 300)] if rule == "coupled_adam" else [(16384 + 5,), (3, 7)]
        ref, got = _run_both(emu, rule, fixed_problem(rule, shapes, ["float32"] * len(shapes), seed=3))
        _assert_agree(ref, got, exact=rule in EXACT_RULES, magnitude=1)
    targets, sources = _ema_tensors([(16384 + 5,), (3, 7)], ["float32", "float64"], seed=3, scale=1e-39)
    want, got = ema_both(emu, targets, sources, MOMENTUM, misaligned=True)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_bits(g, w, f"ema targets[{i}]")


# =====================================================================================
# GPU only: the optimizer classes, DLPack, a large multi-chunk problem
# =====================================================================================
def _cupy_or_skip():
    reason = _cupy_reason()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cls,kw",
    [
        (fo.Adam, dict(weight_decay=0.01)),
        (fo.AdamW, {}),
        (fo.FAdam, {}),
        (fo.CoupledAdam, dict(coupled=[True, False, False])),
        (fo.Lion, dict(weight_decay=0.1)),
    ],
)
def test_optimizer_classes_on_cupy_arrays(cls, kw):
    cupy = _cupy_or_skip()
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(d) for s, d in [((50, 8), "float32"), ((8,), "float64"), ((), "float32")]]
    dev = [cupy.asarray(h) for h in host]
    ref = cls([h.copy() for h in host], backend="numpy", **kw)
    opt = cls(dev, backend="auto", **kw)
    assert opt.backend.NAME == "cupy"
    for _ in range(3):
        g = [rng.standard_normal(h.shape).astype(h.dtype) for h in host]
        ref.step([x.copy() for x in g])
        opt.step([cupy.asarray(x) for x in g])
    for a, b in zip(opt.params, ref.params):
        rtol = 2e-5 if b.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=rtol, atol=1e-7)
    before = [cupy.asnumpy(p) for p in opt.params]
    bad = [cupy.zeros_like(p) for p in dev]
    bad[0][3] = cupy.nan
    with pytest.raises(FloatingPointError):
        opt.step(bad)
    for a, b in zip(opt.params, before):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)
    sd = opt.state_dict()
    clone = cls([p.copy() for p in opt.params], backend="cupy", **kw)
    clone.load_state_dict(sd)
    g = [cupy.asarray(rng.standard_normal(h.shape).astype(h.dtype)) for h in host]
    opt.step(g)
    clone.step(g)
    for a, b in zip(opt.params, clone.params):
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b))


@pytest.mark.gpu
def test_large_multi_chunk_problem_agrees():
    cupy = _cupy_or_skip()
    backend = CupyBackend()
    for rule in RULES:
        shapes = [(4099, 257), (33,)] if rule != "coupled_adam" else [(4099, 257), (7, 3)]
        ref, got = _run_both(backend, rule, fixed_problem(rule, shapes, ["float32", "float64"], seed=5))
        _assert_agree(ref, got, exact=rule in EXACT_RULES, magnitude=1)
    cupy.cuda.Device().synchronize()


@pytest.mark.gpu
def test_dlpack_from_torch_is_zero_copy_and_updates_the_model():
    _cupy_or_skip()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    module = fo.backends.get("cupy")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    twin.load_state_dict(model.state_dict())
    views = module.from_dlpack_list(model.parameters())
    assert all(v.data.ptr == p.data_ptr() for v, p in zip(views, model.parameters()))
    opt = fo.AdamW(views, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(64, 16, device="cuda")
    for _ in range(3):
        for net in (model, twin):
            net.zero_grad()
            net(x).square().mean().backward()
        grads = module.from_dlpack_list([p.grad for p in model.parameters()])
        opt.step(grads)
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
