"""Chaos: random sequences of valid and invalid calls against a shadow that only sees the valid ones.

After every call the optimizer must equal, byte for byte, a shadow optimizer of
the same rule and backend that was given only the calls that were accepted:
steps, hyperparameter changes, checkpoint round trips through a file. Refused
input, corrupt state dicts and failures injected inside a step (MemoryError or
KeyboardInterrupt before the first write) must leave no trace.
"""

import numpy as np
import pytest
from conftest import HOST_BACKENDS
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from rules import CLASS_NAMES as RULES
from rules import make_optimizer, snapshot
from test_reliability import _injection_points, fail_on_call, mixed_model

import fisheropt as fo


def _bad_grads(kind, params, rng):
    good = [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]
    i = int(rng.integers(len(params)))
    if kind == "nan":
        good[i][...] = np.nan
    elif kind == "shape":
        good[i] = np.ones(good[i].size + 1, good[i].dtype)
    elif kind == "dtype":
        good[i] = good[i].astype(np.float16)
    elif kind == "byteorder":
        good[i] = good[i].astype(good[i].dtype.newbyteorder())
    elif kind == "alias_param":
        good[i] = params[i][...]
    elif kind == "count":
        good = good[:-1]
    return good


def _bad_state(kind, opt):
    sd = opt.state_dict()
    second = [s.name for s in opt.rule.state if s.second_moment]
    if kind == "nan" or (kind == "negative" and not second):  # a rule without a second moment
        sd["state"]["m"][0].flat[0] = np.nan
    elif kind == "negative":
        sd["state"][second[0]][-1].flat[0] = -1.0
    elif kind == "shape":
        sd["state"]["m"][0] = np.zeros(sd["state"]["m"][0].size + 1, sd["state"]["m"][0].dtype)
    elif kind == "step":
        sd["step"] = -1
    elif kind == "lr":
        sd["hyperparams"]["lr"] = float("inf")
    return sd


def machine_for(backend, rule_name):
    class Chaos(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(0)
            params = mixed_model(self.rng)
            self.opt = make_optimizer(rule_name, params, backend, lr=1e-2)
            self.shadow = make_optimizer(rule_name, [p.copy() for p in params], backend, lr=1e-2)
            self.params = params

        def _grads(self):
            return [np.asarray(self.rng.standard_normal(p.shape), dtype=p.dtype) for p in self.params]

        @rule()
        def step(self):
            g = self._grads()
            self.opt.step(g)
            self.shadow.step(g)

        @rule(kind=st.sampled_from(["nan", "shape", "dtype", "byteorder", "alias_param", "count"]))
        def refused_step(self, kind):
            with pytest.raises((ValueError, TypeError, FloatingPointError)):
                self.opt.step(_bad_grads(kind, self.params, self.rng))

        @rule(lr=st.sampled_from([0.0, 1e-4, 3e-2]), wd=st.sampled_from([0.0, 0.05]))
        def change_hyperparams(self, lr, wd):
            self.opt.set_hyperparams(lr=lr, weight_decay=wd)
            self.shadow.set_hyperparams(lr=lr, weight_decay=wd)

        @rule(change=st.sampled_from([{"lr": -1.0}, {"eps": 1e-60}, {"betas": (0.9, 1.0)}, {"lr": 1e300}, {"nope": 1}]))
        def refused_hyperparams(self, change):
            with pytest.raises((ValueError, TypeError)):
                self.opt.set_hyperparams(**change)

        @rule()
        def checkpoint_round_trip(self):
            path = _tmp_dir() / "ckpt.npz"
            fo.save_state(self.opt.state_dict(), path)
            self.opt.load_state_dict(fo.load_state(path))

        @rule(kind=st.sampled_from(["nan", "negative", "shape", "step", "lr"]))
        def refused_state(self, kind):
            with pytest.raises(ValueError):
                self.opt.load_state_dict(_bad_state(kind, self.opt))

        @precondition(lambda self: True)
        @rule(point=st.integers(0, 3), k=st.integers(1, 4), exc=st.sampled_from([MemoryError, KeyboardInterrupt]))
        def failure_inside_a_step(self, point, k, exc):
            points = _injection_points(backend, rule_name)
            module, name = points[point % len(points)]
            if backend == "numba":
                fo.backends.get("numba").clear_cache()
            g = self._grads()
            mp = pytest.MonkeyPatch()
            try:
                fail_on_call(mp, module, name, k, exc)
                self.opt.step(g)
            except exc:
                return  # refused: the invariant checks that nothing changed
            finally:
                mp.undo()
            self.shadow.step(g)  # not reached the injection point: a normal step

        @invariant()
        def equals_shadow(self):
            assert snapshot(self.opt) == snapshot(self.shadow)

    Chaos.__name__ = f"Chaos_{backend}_{rule_name}"
    return Chaos


_TMP = []


def _tmp_dir():
    return _TMP[-1]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("rule_name", RULES)
def test_chaos(backend, rule_name, tmp_path):
    reasons = fo.backends.unavailable()
    if backend in reasons:
        pytest.skip(f"{backend}: {reasons[backend]}")
    _TMP.append(tmp_path)
    machine = machine_for(backend, rule_name)
    machine.TestCase.settings = settings(max_examples=20, stateful_step_count=40, deadline=None)
    machine.TestCase().runTest()
