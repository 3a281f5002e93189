"""The ESimCSE momentum-encoder kernel ``ema_update`` on every backend: bit-for-bit
agreement with the NumPy reference (Numba on the CPU; CuPy on a GPU). The CuPy kernel's
agreement on the CPU emulator (every edge value, subnormals, strides, alignment, the golden
vectors) is in tests/test_cupy_backend.py, its PTX and engine checks in
tests/backends/test_cupy_internals.py."""

import ast
import importlib.util
import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import gpu_skip_reason
from cupy_emulated import MODULES as CUPY_MODULES
from cupy_emulated import EmulatedBackend, cuda_kernels
from cupy_emulated import planner as cupy_planner
from hypothesis import given
from hypothesis import strategies as st

import fisheropt as fo
from fisheropt.backends import FUNCTIONS
from fisheropt.refimpl.esimcse_momentum import MOMENTUM
from fisheropt.refimpl.esimcse_momentum import ema_update as ref_ema

SHAPES = [(37, 5), (8,), (), (1,), (2, 3, 4), (0, 3)]


def _tensors(dtype, seed, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    k = [np.asarray(rng.standard_normal(s) * scale, dtype=dtype) for s in shapes]
    q = [np.asarray(rng.standard_normal(s) * scale, dtype=dtype) for s in shapes]
    return k, q


def _numba_module():
    pytest.importorskip("numba")
    from fisheropt.backends.numba import esimcse

    return esimcse


def _assert_bitwise(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        bits = [np.ascontiguousarray(np.atleast_1d(x)).view(np.uint8) for x in (g, w)]
        np.testing.assert_array_equal(*bits)  # bit patterns: -0.0 ≠ 0.0, NaN payloads


def test_ema_update_is_in_the_interface_and_the_reference():
    assert "ema_update" in FUNCTIONS
    assert fo.backends.get("numpy").ema_update is ref_ema
    for name in fo.backends.available():
        fn = fo.backends.get(name).ema_update
        assert inspect.signature(fn) == inspect.signature(ref_ema), name
    assert inspect.signature(CUPY_MODULES["esimcse"].ema_update) == inspect.signature(ref_ema)  # without cupy


# ---- Numba ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [MOMENTUM, 0.0, 1.0, 0.5, 0.999999])
def test_numba_equals_reference_bitwise(dtype, decay):
    N = _numba_module()
    k, q = _tensors(dtype, 1)
    k_ref = [a.copy() for a in k]
    for _ in range(3):  # a short trajectory
        N.ema_update(k, q, decay=decay)
        ref_ema(k_ref, q, decay=decay)
    _assert_bitwise(k, k_ref)


@given(
    seed=st.integers(0, 2**32 - 1),
    decay=st.floats(0.0, 1.0),
    exp=st.sampled_from([-30, -3, 0, 3, 30]),
    f32=st.booleans(),
)
def test_numba_equals_reference_property(seed, decay, exp, f32):
    N = _numba_module()
    dtype = np.float32 if f32 else np.float64
    k, q = _tensors(dtype, seed, scale=10.0**exp)
    k_ref = [a.copy() for a in k]
    N.ema_update(k, q, decay=decay)
    ref_ema(k_ref, q, decay=decay)
    _assert_bitwise(k, k_ref)


def test_numba_mixed_dtypes_strided_sources_and_parallel_path():
    N = _numba_module()
    rng = np.random.default_rng(2)
    big = N.PARALLEL_THRESHOLD + 17  # takes the multi-threaded kernel
    k = [rng.standard_normal(big), rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((6, 4))]
    q = [
        rng.standard_normal(big),
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal((6, 8))[:, ::2],
    ]  # a strided source is fine (read only)
    k_ref = [a.copy() for a in k]
    N.ema_update(k, q, decay=MOMENTUM)
    ref_ema(k_ref, q, decay=MOMENTUM)
    _assert_bitwise(k, k_ref)


# ---- validation: every backend refuses bad input before writing anything ---------------
def _host_ema_backends():
    """The backends' ema_update on NumPy arrays; the cupy backend's through its engine on the CPU
    emulator (check_ema_args wants NumPy arrays there, CuPy arrays on the package's engine)."""
    backends = {"numpy": ref_ema}
    if importlib.util.find_spec("numba"):
        backends["numba"] = _numba_module().ema_update
    backends["cupy-emulated"] = EmulatedBackend().ema_update
    return backends


def _bad_calls():
    """(description, targets, sources, decay, error type, message pattern); targets[0] is always
    valid, so a backend that writes before validating everything is caught."""
    rng = np.random.default_rng(9)

    def good(*shape, dt=np.float64):
        return np.asarray(rng.standard_normal(shape), dtype=dt)

    ro = good(3)
    ro.flags.writeable = False
    swapped = good(3).astype(np.dtype(np.float64).newbyteorder("S"))
    with warnings.catch_warnings():  # np.matrix, on purpose (it must be refused)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.asmatrix(good(2, 2))
    second = [  # (description, targets[1], sources[1], error, message)
        ("non-native target", swapped, good(3), TypeError, r"targets\[1\] has non-native byte order"),
        ("non-native source", good(3), swapped, TypeError, r"sources\[1\] has non-native byte order"),
        ("shape mismatch", good(3), good(4), ValueError, r"sources\[1\] has shape \(4,\) but targets\[1\]"),
        ("dtype mismatch", good(3), good(3, dt=np.float32), TypeError, r"sources\[1\] has dtype float32"),
        ("strided target", good(3, 4)[:, ::2], good(3, 2), ValueError, r"targets\[1\] is not C-contiguous"),
        ("fortran target", np.asfortranarray(good(3, 4)), good(3, 4), ValueError, r"targets\[1\] is not C-contiguous"),
        ("read-only target", ro, good(3), ValueError, r"targets\[1\] is read-only"),
        ("float16", good(3, dt=np.float16), good(3, dt=np.float16), TypeError, r"targets\[1\] has dtype float16"),
        ("subclass", matrix, good(2, 2), TypeError, r"targets\[1\] is a .*subclass"),
        ("scalar", np.float64(1.0), np.float64(2.0), TypeError, r"targets\[1\] must be"),
        ("list source", good(3), [1.0, 2.0, 3.0], TypeError, r"sources\[1\] must be"),
    ]
    cases = [(name, [good(4), k], [good(4), q], 0.9, err, msg) for name, k, q, err, msg in second]
    return cases + [
        ("lengths", [good(4), good(3)], [good(4)], 0.9, ValueError, r"2 targets but 1 sources"),
        ("one array, not a list", good(4), good(4), 0.9, TypeError, r"targets must be a list or tuple"),
        ("decay > 1", [good(4)], [good(4)], 1.5, ValueError, r"decay must be <= 1"),
        ("decay NaN", [good(4)], [good(4)], float("nan"), ValueError, r"decay must be finite"),
        ("decay str", [good(4)], [good(4)], "0.9", TypeError, r"decay must be a real number"),
    ]


@pytest.mark.parametrize("backend", list(_host_ema_backends()))
@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_ema_update_refuses_bad_input_before_writing(backend, case):
    _, targets, sources, decay, error, pattern = case
    before = [np.array(t, copy=True) for t in targets] if isinstance(targets, list) else None
    with pytest.raises(error, match=pattern):
        _host_ema_backends()[backend](targets, sources, decay=decay)
    if before is not None:
        for t, b in zip(targets, before):
            np.testing.assert_array_equal(np.asarray(t), b)  # nothing written, not even targets[0]


def test_ema_update_torch_tensors_are_a_type_error():
    torch = pytest.importorskip("torch")
    for fn in _host_ema_backends().values():
        with pytest.raises(TypeError, match=r"targets\[0\] must be .*torch"):
            fn([torch.zeros(3, dtype=torch.float64)], [np.ones(3)], decay=0.5)


def test_ema_update_validation_is_shared(monkeypatch):
    """One validator (refimpl's check_ema_args) for the three backends, called once per update."""
    from fisheropt.refimpl import esimcse_momentum

    assert CUPY_MODULES["esimcse"].check_ema_args is esimcse_momentum.check_ema_args
    if importlib.util.find_spec("numba"):
        assert _numba_module().check_ema_args is esimcse_momentum.check_ema_args
    calls = []
    orig = esimcse_momentum.check_ema_args
    monkeypatch.setattr(esimcse_momentum, "check_ema_args", lambda *a, **k: calls.append(1) or orig(*a, **k))
    esimcse_momentum.ema_update([np.zeros(3)], [np.ones(3)], decay=0.5)
    assert calls == [1]


def test_cupy_module_refuses_host_arrays_before_building_its_kernel():
    """On an engine that launches on CuPy arrays (every engine but the tests' CPU emulation), NumPy
    arrays are refused by check_ema_args before the engine is used: nothing built, uploaded or run."""

    class UntouchableLauncher:
        block = cuda_kernels.BLOCK
        host_arrays = False  # as the CuPy launcher: it takes device arrays

        def __getattr__(self, name):
            raise AssertionError(f"the launcher was used ({name}) before the arguments were checked")

    with pytest.raises(TypeError, match=r"targets\[0\] is a numpy array.*cupy"):
        with cupy_planner.using(cupy_planner.Engine(UntouchableLauncher())):
            CUPY_MODULES["esimcse"].ema_update([np.zeros(3)], [np.ones(3)], decay=0.5)


def test_numba_registry_backend_uses_the_kernel():
    if "numba" in fo.backends.unavailable():
        pytest.skip(f"numba backend: {fo.backends.unavailable()['numba']}")
    N = _numba_module()
    assert fo.backends.get("numba").ema_update is N.ema_update


# ---- CuPy: the backend's own kernel, compiled without flush-to-zero -------------------------
def test_cupy_ema_is_a_streaming_kernel_of_the_backend():
    """Not a cupy.ElementwiseKernel (CuPy compiles those with -ftz=true, flushing float32
    subnormals): a kernel of backends/cupy/_kernels, compiled by _device with COMPILE_OPTIONS (no
    flush-to-zero, no contraction) and run by the CPU emulator in tests/test_cupy_backend.py."""
    m = CUPY_MODULES["esimcse"]
    assert "esimcse" in cuda_kernels.kernel_modules() and set(m.KERNELS) == {"esimcse_ema"}
    assert cuda_kernels.kernels()["esimcse_ema"] is m.KERNELS["esimcse_ema"]
    assert "esimcse_ema" in cuda_kernels.ELEMENTWISE
    assert {"--ftz=false", "--fmad=false"} <= set(cuda_kernels.COMPILE_OPTIONS)
    for dtype in ("float32", "float64"):
        assert f"fo_esimcse_ema_{cuda_kernels.suffix(dtype)}(" in cuda_kernels.source(dtype)
    # the reference's order: round(round(λ·θ_k) + round((1−λ)·θ_q)), two products and a sum
    assert "target_group[k] = decay * target_group[k] + one_minus_decay * source_group[k];" in (
        m.KERNELS["esimcse_ema"].body
    )
    tree = ast.parse(Path(m.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "cupy" for name in imported)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"ElementwiseKernel", "RawKernel", "RawModule"}
    assert inspect.signature(m.ema_update) == inspect.signature(ref_ema)


# ---- CuPy on a GPU ------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [MOMENTUM, 0.0, 1.0, 0.9])
def test_cupy_equals_reference_bitwise(dtype, decay):
    assert gpu_skip_reason() is None
    import cupy

    backend = fo.backends.get("cupy")
    rng = np.random.default_rng(4)
    shapes = SHAPES + [(1 << 20,), (300, 7)]
    k, q = _tensors(dtype, 5, shapes=shapes)
    k_ref = [a.copy() for a in k]
    k_dev = [cupy.asarray(a) for a in k]
    q_dev = [cupy.asarray(a) for a in q]
    for _ in range(3):
        backend.ema_update(k_dev, q_dev, decay=decay)
        ref_ema(k_ref, q, decay=decay)
    _assert_bitwise([cupy.asnumpy(a) for a in k_dev], k_ref)
    strided = cupy.asarray(rng.standard_normal((40, 12)).astype(dtype))
    with pytest.raises(ValueError, match="not C-contiguous"):  # refused, like on the host
        backend.ema_update([strided[:, ::2]], [cupy.zeros((40, 6), dtype)], decay=decay)


@pytest.mark.gpu
def test_cupy_ema_via_registry_select():
    assert gpu_skip_reason() is None
    import cupy

    k = [cupy.zeros(4, dtype=cupy.float32)]
    q = [cupy.ones(4, dtype=cupy.float32)]
    fo.backends.select("auto", k + q).ema_update(k, q, decay=0.75)
    np.testing.assert_array_equal(cupy.asnumpy(k[0]), np.full(4, np.float32(0.25), np.float32))
