"""Every fused backend against the reference, for every rule of the registry.

One parametrised suite over rule × backend: random multi-tensor problems (mixed
float32/float64, empty and odd shapes, magnitudes from 1e-30 to 1e30, zero
gradients, per-tensor hyperparameters and step counts, the rule's tensor flags),
several steps, each checked from identical inputs. Arrays that the spec makes
purely elementwise must agree bit for bit; those that depend on a float64
reduction (the descriptor's ``StateArray.reduced``, and θ for such a rule) within
the tolerance derived in tests/agreement.py. The spec vectors run over every
backend in tests/test_vectors.py, the signatures in tests/test_interface.py.
"""

import numpy as np
import pytest
from agreement import assert_close, assert_exact, make_tensor, problems, tol
from hypothesis import given
from hypothesis import strategies as st
from rules import RULE_NAMES, kernel_hyperparams

import fisheropt as fo
from fisheropt.refimpl import RULES

FUSED_HOST_BACKENDS = [b for b in fo.backends.KNOWN if b not in ("numpy", "cupy")]


def _backend_params():
    reasons = fo.backends.unavailable()
    return [
        pytest.param(b, marks=pytest.mark.skipif(b in reasons, reason=f"{b}: {reasons.get(b)}"))
        for b in FUSED_HOST_BACKENDS
    ]


@pytest.mark.parametrize("backend_name", _backend_params())
@pytest.mark.parametrize("rule_name", RULE_NAMES)
@given(data=st.data())
def test_fused_backend_matches_the_reference(backend_name, rule_name, data):
    rule = RULES[rule_name]
    backend, ref = fo.backends.get(backend_name), fo.backends.get("numpy")
    if rule.step_function not in fo.backends.functions(backend_name):
        pytest.skip(f"{backend_name} has no {rule.step_function}")
    flagged = rule.tensor_flag is not None
    shapes, dtypes, p_exp, g_exp, steps, zero_grads, seed = data.draw(
        problems(matrices=flagged, max_tensors=4 if flagged else 6)
    )
    n = len(shapes)
    hp = data.draw(kernel_hyperparams(rule, n))
    first = data.draw(st.one_of(st.just(1), st.integers(1, 2000)))
    per_tensor_steps = n > 1 and data.draw(st.booleans())
    rng = np.random.default_rng(seed)
    extra = {}
    flags = [False] * n
    if flagged:  # flagged and unflagged tensors in one call, as the optimizer class makes it
        flags = [bool(x) and s[0] > 0 for x, s in zip(rng.random(n) < 0.7, shapes)]
        extra[rule.tensor_flag.name] = flags
    params = [make_tensor(rng, s, d, e) for s, d, e in zip(shapes, dtypes, p_exp)]
    state = [
        [np.zeros(p.shape[1], p.dtype) if spec.per_column and f else np.zeros_like(p) for p, f in zip(params, flags)]
        for spec in rule.state
    ]
    params_r, state_r = [p.copy() for p in params], [[a.copy() for a in s] for s in state]
    exact = [not rule.reduces] + [not spec.reduced for spec in rule.state]
    names = ["params", *rule.state_names]
    for k in range(steps):
        t = [first + k + i for i in range(n)] if per_tensor_steps else first + k
        grads = [make_tensor(rng, s, d, e, zero=z) for s, d, e, z in zip(shapes, dtypes, g_exp, zero_grads[k])]
        before = [[a.copy() for a in lst] for lst in [params_r] + state_r]
        getattr(backend, rule.step_function)(params, grads, *state, step=t, **hp, **extra)
        getattr(ref, rule.step_function)(params_r, grads, *state_r, step=t, **hp, **extra)
        for j, (got_list, want_list) in enumerate(zip([params] + state, [params_r] + state_r)):
            for i, (got, want) in enumerate(zip(got_list, want_list)):
                what = f"{rule.name} step {k} {names[j]}[{i}] {want.dtype} {want.shape}"
                if exact[j]:
                    assert_exact(got, want, what)
                else:
                    assert_close(got, want, tol(want.dtype, 1), what, before=before[j][i])
        # Re-synchronise (a no-op where results are exact): each step is checked from identical
        # inputs. Without it an ill-conditioned trajectory (θ cancelled to near 0 by a clipped
        # decay, renormalised by RMS(θ) at the next step) amplifies a last-bit difference of a
        # float64 sum by the cancellation ratio, which says nothing about the step.
        for got_list, want_list in zip([params] + state, [params_r] + state_r):
            for got, want in zip(got_list, want_list):
                got[...] = want
