"""spec/vectors: valid against the schema, reproduced by the reference, passed by every backend."""

import json

import numpy as np
import pytest
from conftest import gpu_skip_reason

import fisheropt as fo
from fisheropt import vectors
from fisheropt.refimpl import RULES
from fisheropt.vectors.optim import RULE_VECTORS, derived_other_hyperparams

SCHEMA = json.loads((vectors.VECTOR_DIR / "schema.json").read_text())
SUITES = sorted(vectors.SUITES)


def test_suites_come_from_the_registry():
    """One suite per update rule of fisheropt.refimpl.RULES (plus esimcse and fisher), a vector
    file per suite and no other; each rule's cases call that rule's step function with its state."""
    assert vectors.OPTIMIZER_SUITES == tuple(RULES)
    assert set(vectors.SUITES) == set(RULES) | {"esimcse", "fisher"}
    assert {p.stem for p in vectors.VECTOR_DIR.glob("*.json")} - {"schema"} == set(vectors.SUITES)
    assert set(RULE_VECTORS) <= set(RULES), "an entry for a rule the registry does not have"
    for name, rule in RULES.items():
        for case in vectors.load_suite(name)["cases"]:
            assert case["function"] == rule.step_function and tuple(case["state_order"]) == rule.state_names
            flag = rule.tensor_flag.name if rule.tensor_flag else None
            assert set(case["hyperparams"]) - {flag} == set(rule.kernel_kwargs(rule.defaults())), case["name"]


def test_derived_other_hyperparameters_are_valid_and_differ_from_the_defaults():
    """What a rule without its own other_hyperparams case gets (fisheropt.vectors.optim)."""
    for rule in RULES.values():
        other = derived_other_hyperparams(rule)
        default = rule.kernel_kwargs(rule.defaults())
        assert set(other) == set(default) and all(other[k] != default[k] for k in other), rule.name
        for h in rule.hyperparams:
            for k in h.kernel_names:
                x = other[k]
                assert h.low is None or x > h.low or (x == h.low and not h.low_open), (rule.name, k, x)
                assert h.high is None or x < h.high or (x == h.high and not h.high_open), (rule.name, k, x)
                assert h.typical is None or h.typical[0] <= x <= h.typical[1], (rule.name, k, x)


@pytest.mark.parametrize("suite", SUITES)
def test_vector_file_matches_schema(suite):
    jsonschema = pytest.importorskip("jsonschema")  # a test extra; absent on some GPU images
    data = vectors.load_suite(suite)
    jsonschema.validate(data, SCHEMA)
    assert data["suite"] == suite
    names = [c["name"] for c in data["cases"]]
    assert len(names) == len(set(names)), "case names must be unique within a suite"


def _tolerance_leaves(tol, where=""):
    """(path, bound) for every bound of a tolerance tree."""
    if vectors.is_tolerance(tol):
        return [(where, tol)]
    items = tol.items() if isinstance(tol, dict) else enumerate(tol)
    return [leaf for k, v in items for leaf in _tolerance_leaves(v, f"{where}/{k}")]


@pytest.mark.parametrize("suite", SUITES)
def test_reference_still_generates_the_stored_vectors(suite):
    """Drift guard: the stored files equal what the reference generates today
    (same cases, inputs bit for bit, expected values within each case's tolerance)."""
    stored = vectors.load_suite(suite)["cases"]
    fresh = vectors.generate_suite(suite)["cases"]
    assert [c["name"] for c in fresh] == [c["name"] for c in stored], (
        "case list changed: regenerate with `python -m fisheropt.vectors`"
    )
    for new, old in zip(fresh, stored):
        for key in ("kind", "function", "dtype", "inputs", "args", "hyperparams", "state_order", "tags", "kills"):
            assert json.loads(json.dumps(new.get(key))) == old.get(key), f"{suite}/{old['name']}: {key} changed"
        # Some tolerances scale with the peak of a float32 BLAS result, whose last bits move
        # with the BLAS build: a change in the fourth digit is drift, one in the eighth is not.
        new_leaves, old_leaves = _tolerance_leaves(new["tolerance"]), _tolerance_leaves(old["tolerance"])
        assert [p for p, _ in new_leaves] == [p for p, _ in old_leaves], f"{suite}/{old['name']}: tolerance changed"
        for (path, a), (_, b) in zip(new_leaves, old_leaves):
            assert a.keys() == b.keys() and a["ulps"] == b["ulps"], f"{suite}/{old['name']}{path}: tolerance changed"
            for k in ("rtol", "atol"):
                assert a[k] == pytest.approx(b[k], rel=1e-4), f"{suite}/{old['name']}{path}: tolerance changed"
        assert (
            vectors.compare(
                vectors.decode(new["expected"]),
                vectors.decode(old["expected"]),
                vectors.expected_tolerance(old),
                old["name"],
            )
            == []
        )


def _host_backends():
    reasons = fo.backends.unavailable()
    return [
        pytest.param(n, marks=pytest.mark.skipif(n in reasons, reason=str(reasons.get(n)))) for n in ("numpy", "numba")
    ]


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("backend", _host_backends())
def test_backend_passes_vectors(suite, backend):
    module = fo.backends.get(backend)
    failures = []
    for case in vectors.load_suite(suite)["cases"]:
        if not hasattr(module, case["function"]):
            failures.append(f"{case['name']}: backend lacks {case['function']}")
            continue
        failures += vectors.run_case(case, module)
    assert failures == []


@pytest.mark.gpu
@pytest.mark.parametrize("suite", SUITES)
def test_cupy_passes_vectors(suite):
    assert gpu_skip_reason() is None
    import cupy

    module = fo.backends.get("cupy")
    failures = []
    for case in vectors.load_suite(suite)["cases"]:
        if not hasattr(module, case["function"]):
            failures.append(f"{case['name']}: backend lacks {case['function']}")
            continue
        failures += vectors.run_case(case, module, to_device=cupy.asarray)
    assert failures == []


def test_checker_detects_a_wrong_result():
    """The vector checker itself must fail on a perturbed result (guards against a no-op check)."""
    case = vectors.load_suite("adam")["cases"][0]

    class Perturbed:
        @staticmethod
        def adam_step(params, grads, m, v, **kw):
            fo.backends.get("numpy").adam_step(params, grads, m, v, **kw)
            params[0][...] = params[0] * (1 + 1e-6)

    assert vectors.run_case(case, Perturbed) != []
    assert vectors.run_case(case, fo.backends.get("numpy")) == []


def test_checker_applies_ulps_and_dtype():
    tol = vectors.tolerance(ulps=2)
    e = np.float32([1.0, 0.0, 1e-45, 3.0e38])
    one_ulp = np.float32([1.0 + 2**-23, 1e-45, 2e-45, 3.0e38 + 2**104])
    three_ulps = np.float32([1.0 + 3 * 2**-23, 0.0, 1e-45, 3.0e38])
    assert vectors.compare(one_ulp, e, tol) == []
    assert vectors.compare(three_ulps, e, tol) != []
    assert vectors.compare(e.astype(np.float64), e, tol) != [], "a float64 result for a float32 array must fail"
    assert vectors.ulp(np.float64(0.0), np.float64) == 2.0**-1074
    assert vectors.ulp(np.float32(1.5), np.float32) == 2.0**-23


def test_codec_round_trips_non_finite_and_exact_values():
    a = np.array([np.nan, np.inf, -np.inf, 0.1, -0.0, 5e-324], dtype=np.float64)
    b = vectors.decode(json.loads(json.dumps(vectors.encode(a))))
    assert b.dtype == a.dtype and b.tobytes() == a.tobytes()
    f = np.float32([1 / 3, 1e-45, 3.4e38])
    g = vectors.decode(json.loads(json.dumps(vectors.encode(f))))
    assert g.dtype == np.float32 and g.tobytes() == f.tobytes()
