"""Conformance: every golden-vector case through fisheropt.optax (issue 17), via the functional
adapter fisheropt.vectors.functional (spec/vectors.md, "Functional implementations").

* without x64 (JAX's default): every float32 case of the update-rule suites and the Fisher
  suite's float32 directions (its Gram matrix is float64 by definition: x64 only);
* with x64 (``with jax.enable_x64(True)``): every float64 case and every Fisher case, and the
  float32 cases of the rules whose state depends on a reduction (the registry's ``reduces``:
  FAdam, Coupled Adam), whose float64 reductions take another path than without x64 (marked
  ``slow``: a second compilation per hyperparameter set).

Every step is jitted. A failing case fails the test, with one exception: on a backend that
flushes subnormal inputs and results to zero (XLA:CPU, FTZ/DAZ; a platform property, see
test_optax.py::test_xla_cpu_flushes_subnormals), a case tagged "subnormal" that fails is
reported as xfail with its first mismatch. Every other tag must pass.

The same lowered programs also run through the StableHLO reference interpreter
(``functional_steps(interpret=True)``), which has IEEE semantics on any host: there every case
must pass, the subnormal ones included (the Fisher solves excepted: LAPACK custom calls).
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax", reason="fisheropt.optax needs jax: pip install 'fisheropt[jax]'")
pytest.importorskip("optax", reason="fisheropt.optax needs optax: pip install 'fisheropt[jax]'")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fisheropt.optax.conformance import functional_steps  # noqa: E402
from fisheropt.refimpl import RULES  # noqa: E402
from fisheropt.vectors import VECTOR_DIR, load_suite  # noqa: E402
from fisheropt.vectors.functional import run_functional_case  # noqa: E402

RULE_SUITES = [name for name in sorted(RULES) if (VECTOR_DIR / f"{name}.json").exists()]
MISSING_SUITES = [name for name in sorted(RULES) if name not in RULE_SUITES]
_STEPS = {}


def _steps(x64: bool, interpret: bool = False):
    """One set of functional steps per mode, shared by the cases (compiled once per hyperparameter set)."""
    if (x64, interpret) not in _STEPS:
        _STEPS[x64, interpret] = functional_steps(jit=True, interpret=interpret)
    return _STEPS[x64, interpret]


def _backend_flushes_subnormals() -> bool:
    return float(jax.jit(lambda a: a * 2)(np.float32(1e-40))) == 0.0


def _params():
    out = []
    for suite in RULE_SUITES + ["fisher"]:
        reduces = suite == "fisher" or getattr(RULES[suite], "reduces", True)
        for case in load_suite(suite)["cases"]:
            float32 = case.get("dtype") == "float32"
            if not float32 or suite == "fisher":
                out.append(pytest.param(True, suite, case, id=f"x64-{suite}-{case['name']}"))
            elif reduces:  # the same float32 case again, through the float64-reduction path: slow
                out.append(pytest.param(True, suite, case, id=f"x64-{suite}-{case['name']}", marks=pytest.mark.slow))
            if float32 and (suite != "fisher" or case["function"] != "fisher_gram"):
                out.append(pytest.param(False, suite, case, id=f"f32-{suite}-{case['name']}"))
    return out


@pytest.mark.parametrize("x64, suite, case", _params())
def test_vector_case(x64, suite, case):
    with jax.enable_x64(x64):
        messages = run_functional_case(case, _steps(x64), to_array=jnp.asarray)
    if not messages:
        return
    if "subnormal" in case.get("tags", ()) and _backend_flushes_subnormals():
        pytest.xfail(f"XLA:{jax.default_backend().upper()} flushes subnormals to zero: {messages[0]}")
    pytest.fail("\n".join(messages[:5]))


def _interpreted_params():
    out = []
    for suite in RULE_SUITES + ["fisher"]:
        for case in load_suite(suite)["cases"]:
            if case["function"] == "fisher_sample_space_direction":
                continue  # a LAPACK custom call on CPU: not interpretable (run by test_vector_case)
            if case.get("dtype") == "float32" and case["function"] != "fisher_gram":
                out.append(pytest.param(False, suite, case, id=f"f32-{suite}-{case['name']}"))
            out.append(pytest.param(True, suite, case, id=f"x64-{suite}-{case['name']}"))
    return out


@pytest.mark.parametrize("x64, suite, case", _interpreted_params())
def test_vector_case_interpreted(x64, suite, case):
    """The program test_vector_case compiles, run by the StableHLO interpreter (IEEE, subnormals
    kept): every case passes, on any host."""
    with jax.enable_x64(x64):
        messages = run_functional_case(case, _steps(x64, interpret=True), to_array=np.asarray)
    assert not messages, "\n".join(messages[:5])


@pytest.mark.parametrize("suite", MISSING_SUITES or ["-"])
def test_every_rule_has_its_suite(suite):
    if suite == "-":
        return
    pytest.skip(f"no spec/vectors/{suite}.json yet (generate with python -m fisheropt.vectors {suite})")
