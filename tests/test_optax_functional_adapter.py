"""fisheropt.vectors.functional, the vector runner for functional implementations: NumPy only
(no JAX needed). The reference wrapped functionally passes every case of every suite, and
plausible mistakes of a functional port (a step index off by one, state not carried, results
in the wrong dtype, an exception) fail."""

from __future__ import annotations

import numpy as np
import pytest

from fisheropt.backends import reference
from fisheropt.vectors import SUITES, load_suite
from fisheropt.vectors.functional import lookup, run_functional_case, run_functional_suite


def functional(fn):
    """A functional step from an in-place one: copy, update the copies, return them."""

    def step(params, grads, state, *, step, **hp):
        params = [p.copy() for p in params]
        state = {k: [a.copy() for a in v] for k, v in state.items()}
        fn(params, [g.copy() for g in grads], *state.values(), step=step, **hp)
        return params, state

    return step


def functional_inplace(fn):
    def call(**args):
        copies = {k: [a.copy() for a in v] if isinstance(v, list) else v for k, v in args.items()}
        fn(**copies)
        return copies

    return call


def implementations(**overrides):
    impl = {}
    for name in ("fisher_gram", "fisher_sample_space_direction"):
        impl[name] = getattr(reference, name)
    impl["ema_update"] = functional_inplace(reference.ema_update)
    for name in dir(reference):
        if name.endswith("_step"):
            impl[name] = functional(getattr(reference, name))
    impl.update(overrides)
    return impl


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_reference_passes_every_case_functionally(suite):
    results = run_functional_suite(suite, implementations())
    assert results and all(not m for m in results.values()), {k: v[:1] for k, v in results.items() if v}


def _optimizer_suite(name="adam"):
    return load_suite(name)


def test_step_index_off_by_one_fails():
    impl = implementations(
        adam_step=lambda p, g, s, *, step, **hp: functional(reference.adam_step)(p, g, s, step=step + 1, **hp)
    )
    results = run_functional_suite(_optimizer_suite(), impl)
    assert any(results.values())
    assert results["f32_resume_at_step_1000"]


def test_state_not_carried_fails():
    def forgetful(params, grads, state, *, step, **hp):
        new_params, _ = functional(reference.adam_step)(params, grads, state, step=step, **hp)
        return new_params, state  # returns the old state

    results = run_functional_suite(_optimizer_suite(), implementations(adam_step=forgetful))
    assert results["f64_basic"] and results["f32_basic"]


def test_wrong_dtype_and_exceptions_fail():
    def float32_everything(params, grads, state, *, step, **hp):
        p, s = functional(reference.adam_step)(params, grads, state, step=step, **hp)
        return [a.astype(np.float32) for a in p], s

    def raises(*a, **k):
        raise RuntimeError("boom")

    results = run_functional_suite(_optimizer_suite(), implementations(adam_step=float32_everything))
    assert any("dtype" in m for m in results["f64_basic"])
    results = run_functional_suite(_optimizer_suite(), implementations(adam_step=raises))
    assert all(any("raised RuntimeError: boom" in m for m in msgs) for msgs in results.values())
    ema = load_suite("esimcse")["cases"][0]
    assert run_functional_case(ema, implementations(ema_update=lambda **a: None))  # not a mapping


def test_lookup_names_the_missing_function():
    with pytest.raises(KeyError, match="fadam_step"):
        lookup({}, "fadam_step")
    assert lookup(reference, "adam_step") is reference.adam_step
