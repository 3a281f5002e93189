"""Optimizer state saves and loads exactly; a resumed run equals an uninterrupted one, bit for bit."""

import numpy as np
import pytest
from conftest import host_backend_params
from hypothesis import given
from hypothesis import strategies as st
from rules import CLASS_NAMES, make_optimizer

import fisheropt as fo

SHAPES = [(6, 4), (5,), ()]


def _make(rule, params, backend):
    return make_optimizer(rule, params, backend, lr=1e-2)  # Coupled Adam: the (6, 4) matrix coupled


def _grads(rng, dtype):
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]


RULES = CLASS_NAMES  # every rule of the registry


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("via_file", [False, True])
@given(split=st.integers(0, 6), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_resume_equals_uninterrupted(tmp_path_factory, backend, rule, via_file, split, dtype, seed):
    total = 6
    rng = np.random.default_rng(seed)
    init = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    grads = [_grads(rng, dtype) for _ in range(total)]

    straight = [p.copy() for p in init]
    opt = _make(rule, straight, backend)
    for g in grads:
        opt.step(g)

    first = [p.copy() for p in init]
    opt1 = _make(rule, first, backend)
    for g in grads[:split]:
        opt1.step(g)
    sd = opt1.state_dict()
    if via_file:
        path = tmp_path_factory.mktemp("state") / "opt.npz"
        fo.save_state(sd, path)
        sd = fo.load_state(path)
    resumed = [p.copy() for p in first]  # a new process would reload params from its own checkpoint
    opt2 = _make(rule, resumed, backend)
    opt2.load_state_dict(sd)
    assert opt2.step_count == split
    for g in grads[split:]:
        opt2.step(g)

    for a, b in zip(straight, resumed):
        assert a.tobytes() == b.tobytes()
    for name in opt.state:
        for a, b in zip(opt.state[name], opt2.state[name]):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_is_a_copy(rule):
    params = [np.ones(s) for s in SHAPES]
    opt = _make(rule, params, "numpy")
    opt.step([np.ones(s) for s in SHAPES])
    sd = opt.state_dict()
    saved = {k: [a.copy() for a in v] for k, v in sd["state"].items()}
    opt.step([np.ones(s) for s in SHAPES])
    for k in saved:
        for a, b in zip(saved[k], sd["state"][k]):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("rule", RULES)
def test_file_round_trip_is_bit_exact(tmp_path, rule):
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(s) for s in SHAPES]
    opt = _make(rule, params, "numpy")
    for _ in range(3):
        opt.step(_grads(rng, np.float64))
    sd = opt.state_dict()
    fo.save_state(sd, tmp_path / "s.npz")
    back = fo.load_state(tmp_path / "s.npz")
    assert back["step"] == sd["step"] and back["hyperparams"] == sd["hyperparams"]
    for k in sd["state"]:
        for a, b in zip(sd["state"][k], back["state"][k]):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _corrupt(sd, how):
    sd = {**sd, "state": {k: list(v) for k, v in sd["state"].items()}, "hyperparams": dict(sd["hyperparams"])}
    if how == "wrong optimizer":
        sd["optimizer"] = "SGD"
    elif how == "wrong shape":
        sd["state"]["m"][0] = np.zeros((2, 2))
    elif how == "wrong dtype":
        sd["state"]["m"][0] = sd["state"]["m"][0].astype(np.float32)
    elif how == "missing tensor":
        sd["state"]["m"] = sd["state"]["m"][:-1]
    elif how == "bad step":
        sd["step"] = -1
    elif how == "bad hyperparameter":
        sd["hyperparams"]["lr"] = -1.0
    elif how == "unknown version":
        sd["version"] = 99
    elif how == "missing state entry":
        sd["state"].pop("m")
    return sd


@pytest.mark.parametrize(
    "how",
    [
        "wrong optimizer",
        "wrong shape",
        "wrong dtype",
        "missing tensor",
        "bad step",
        "bad hyperparameter",
        "unknown version",
        "missing state entry",
    ],
)
@pytest.mark.parametrize("rule", RULES)
def test_bad_state_dict_is_rejected_and_changes_nothing(rule, how):
    rng = np.random.default_rng(2)
    opt = _make(rule, [rng.standard_normal(s) for s in SHAPES], "numpy")
    opt.step(_grads(rng, np.float64))
    good = opt.state_dict()
    opt.step(_grads(rng, np.float64))
    before = opt.state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict(_corrupt(good, how))
    after = opt.state_dict()
    assert after["step"] == before["step"] and after["hyperparams"] == before["hyperparams"]
    for k in before["state"]:
        for a, b in zip(before["state"][k], after["state"][k]):
            assert a.tobytes() == b.tobytes()


def test_load_state_rejects_foreign_npz(tmp_path):
    np.savez(tmp_path / "x.npz", meta=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))
    with pytest.raises(ValueError, match="not a fisheropt"):
        fo.load_state(tmp_path / "x.npz")
