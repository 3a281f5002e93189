"""Bad input is a clear error, and a rejected call leaves params and state exactly as they were."""

import numpy as np
import pytest
from conftest import host_backend_params
from rules import CLASS_NAMES, make_optimizer, snapshot

import fisheropt as fo
from fisheropt.refimpl import RULES as REGISTRY


def _no_flags(rule, params):
    """Every tensor flag False (so that bad params, not the flags, are what is refused)."""
    descriptor = next(r for r in REGISTRY.values() if r.title == rule)
    return {descriptor.tensor_flag.name: [False] * len(params)} if descriptor.tensor_flag else {}


# np.matrix is tested on purpose (it must be refused); NumPy warns on creating one.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

RULES = CLASS_NAMES  # every rule of the registry, by class name


def _warm_optimizer(rule, backend, dtype=np.float64):
    rng = np.random.default_rng(0)
    params = [np.asarray(rng.standard_normal((4, 3)), dtype=dtype), np.asarray(rng.standard_normal(5), dtype=dtype)]
    opt = make_optimizer(rule, params, backend)  # Coupled Adam: the matrix coupled, the vector not
    for _ in range(2):  # non-zero state, so "untouched" is a real check
        opt.step([np.asarray(rng.standard_normal(p.shape), dtype=dtype) for p in params])
    return opt


def _good_grads(opt):
    return [np.ones_like(p) for p in opt.params]


def _nan_in_last(opt):
    g = _good_grads(opt)
    g[-1][-1] = np.nan
    return g


def _inf_in_first(opt):
    g = _good_grads(opt)
    g[0][0, 0] = -np.inf
    return g


BAD_GRADS = {
    "too few": (lambda o: _good_grads(o)[:1], ValueError, "got 1 grads for 2 params"),
    "too many": (lambda o: _good_grads(o) + [np.ones(2)], ValueError, "got 3 grads for 2 params"),
    "wrong shape": (
        lambda o: [np.ones((3, 4)), np.ones(5)],
        ValueError,
        r"shape \(3, 4\) but params\[0\] has shape \(4, 3\)",
    ),
    "integer dtype": (lambda o: [np.ones((4, 3), dtype=np.int64), np.ones(5)], TypeError, "dtype int64"),
    "mixed dtype": (lambda o: [np.ones((4, 3), dtype=np.float32), np.ones(5)], TypeError, "mixed dtypes"),
    "NaN": (_nan_in_last, FloatingPointError, r"grads\[1\]"),
    "Inf": (_inf_in_first, FloatingPointError, r"grads\[0\]"),
    "non-contiguous": (lambda o: [np.ones((3, 4)).T, np.ones(5)], ValueError, "not C-contiguous"),
    "not an array": (lambda o: [[1.0] * 3] * 4 + [np.ones(5)], ValueError, "got 5 grads"),
    "list instead of array": (lambda o: [[[1.0] * 3] * 4, np.ones(5)], TypeError, "must be a NumPy or CuPy array"),
    "a single array": (lambda o: np.ones(5), ValueError, "grads"),
    "None": (lambda o: None, TypeError, "sequence of arrays"),
    # a big-endian copy holds the same numbers; a kernel would read its bytes as garbage
    "non-native byte order": (
        lambda o: [g.astype(g.dtype.newbyteorder()) for g in _good_grads(o)],
        TypeError,
        r"grads\[0\] has non-native byte order",
    ),
    "np.matrix": (lambda o: [np.asmatrix(_good_grads(o)[0]), _good_grads(o)[1]], TypeError, "ndarray subclass"),
    "numpy scalar": (lambda o: [_good_grads(o)[0], np.float64(1.0)], TypeError, r"grads\[1\] must be a NumPy"),
    "grad is a view of a parameter": (
        lambda o: [_good_grads(o)[0], o.params[1][:]],
        ValueError,
        r"params\[1\] and grads\[1\] share memory",
    ),
    "grad is a view of the state": (
        lambda o: [_good_grads(o)[0], o.state["m"][1].reshape(5)],
        ValueError,
        r"state\['m'\]\[1\] and grads\[1\] share memory",
    ),
    "two grads share memory": (
        lambda o: (lambda b: [b[:12].reshape(4, 3), b[7:]])(np.ones(12)),
        ValueError,
        r"grads\[0\] and grads\[1\] share memory",
    ),
}


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", BAD_GRADS)
def test_bad_grads_raise_and_change_nothing(backend, rule, case):
    make, exc, match = BAD_GRADS[case]
    opt = _warm_optimizer(rule, backend)
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step(make(opt))
    assert snapshot(opt) == before
    opt.step(_good_grads(opt))  # still usable afterwards
    assert opt.step_count == before[2] + 1


def _bad_values(h):
    """(value, message) pairs that the descriptor's valid range refuses."""
    out = [(float("nan"), rf"{h.name}(\[0\])? must be finite"), ("0.1", rf"{h.name}(\[0\])? must be a real number")]
    if h.names:
        out = [((v,) + tuple(h.default[1:]), m) for v, m in out]
        out += [
            (h.default[:1], f"{h.name} must be a pair"),
            ((h.default[0], h.high), rf"{h.name}\[1\] must be {'<' if h.high_open else '<='} {h.high}"),
            ((-0.1, h.default[1]), rf"{h.name}\[0\] must be >= {h.low}"),
        ]
        return out
    if h.low is not None:
        out.append((h.low - 1.0, f"{h.name} must be {'>' if h.low_open else '>='} {h.low}"))
        if h.low_open:
            out.append((h.low, f"{h.name} must be > {h.low}"))
    if h.high is not None:
        out.append((h.high + 0.5, f"{h.name} must be {'<' if h.high_open else '<='} {h.high}"))
    return out


BAD_HYPERPARAMS = [
    (rule.title, h.name, value, match)
    for rule in REGISTRY.values()
    for h in rule.hyperparams
    for value, match in _bad_values(h)
]


@pytest.mark.parametrize("rule,name,value,match", BAD_HYPERPARAMS)
def test_invalid_hyperparameters(rule, name, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_optimizer(rule, [np.zeros(3)], **{name: value})
    # changing it later is validated the same way, all or nothing
    opt = make_optimizer(rule, [np.zeros(3)])
    before = opt.hyperparams
    with pytest.raises((ValueError, TypeError), match=match):
        opt.set_hyperparams(lr=0.5, **{name: value}) if name != "lr" else opt.set_hyperparams(**{name: value})
    assert opt.hyperparams == before


BAD_PARAMS = [
    ("read-only", lambda: [np.frombuffer(np.ones(3).tobytes())], ValueError, "read-only"),
    ("non-contiguous", lambda: [np.ones((3, 4))[:, ::2]], ValueError, "not C-contiguous"),
    ("integer", lambda: [np.ones(3, dtype=np.int32)], TypeError, "dtype int32"),
    ("float16", lambda: [np.ones(3, dtype=np.float16)], TypeError, "dtype float16"),
    ("empty list", lambda: [], ValueError, "empty"),
    ("same array twice", lambda: [np.ones(3)] * 2, ValueError, r"params\[0\] and params\[1\] share memory"),
    ("python list", lambda: [[1.0, 2.0]], TypeError, "NumPy or CuPy array"),
    (
        "two reshapes of one buffer",
        lambda: (lambda a: [a.reshape(600, 500), a.reshape(300, 1000)])(np.ones(300_000)),
        ValueError,
        r"params\[0\] and params\[1\] share memory",
    ),
    (
        "overlapping slices",
        lambda: (lambda a: [a[0:100], a[50:150]])(np.ones(200)),
        ValueError,
        r"params\[0\] and params\[1\] share memory",
    ),
    (
        "non-native byte order",
        lambda: [np.ones(4, ">f4" if np.little_endian else "<f4")],
        TypeError,
        "non-native byte order",
    ),
    ("np.matrix", lambda: [np.asmatrix(np.ones((2, 2)))], TypeError, "ndarray subclass"),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name,make,exc,match", BAD_PARAMS)
def test_bad_params_rejected(rule, name, make, exc, match):
    params = make()
    with pytest.raises(exc, match=match):
        make_optimizer(rule, params, **_no_flags(rule, params))


@pytest.mark.parametrize(
    "coupled,match",
    [
        ([True], "must be 2-D"),
        ([True, True], "2 entries for 1 params"),
        (None, "coupled is required"),
        ([1], "must be a bool"),
        (["yes"], "must be a bool"),
    ],
)
def test_coupled_flags_validated(coupled, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fo.CoupledAdam([np.ones(4)], coupled=coupled, backend="numpy")


def test_coupled_accepts_numpy_bools():
    opt = fo.CoupledAdam([np.ones((2, 3)), np.ones(4)], coupled=np.array([True, False]), backend="numpy")
    assert opt.coupled == (True, False) and all(type(c) is bool for c in opt.coupled)


@pytest.mark.parametrize("value", ["no", 0, None, 1.0])
def test_check_finite_must_be_a_bool(value):
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        fo.Adam([np.ones(3)], check_finite=value, backend="numpy")
    opt = fo.Adam([np.ones(3)], backend="numpy")
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        opt.check_finite = value
    assert opt.check_finite is True


def test_coupled_matrix_needs_rows():
    with pytest.raises(ValueError, match="V ≥ 1"):
        fo.CoupledAdam([np.ones((0, 3))], coupled=[True], backend="numpy")


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
def test_param_made_read_only_after_construction(backend, rule):
    """Checked again at every step: otherwise the first tensor would be written
    before the write into the read-only one failed."""
    opt = _warm_optimizer(rule, backend)
    opt.params[1].flags.writeable = False
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        opt.step(_good_grads(opt))
    assert snapshot(opt) == before
