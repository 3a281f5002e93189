"""The golden vectors for functional implementations: ones that return new arrays instead of
updating their arguments in place (JAX/optax, functional ports in other languages).

The vector format (spec/vectors.md) states every case as calls of the in-place reference
functions. A functional implementation runs the same cases with the same inputs and is
held to the same per-array tolerances; only the calling convention changes
(spec/vectors.md, "Functional implementations"):

* ``"optimizer"``: ``step(params, grads, state, *, step=t, **hyperparams) -> (params, state)``,
  with ``state`` a dict {state name: list of arrays} (``case["state_order"]`` names them) and
  ``hyperparams`` the case's keyword arguments as they are (``coupled`` included). The
  returned params and state feed the next step and are compared after every step.
* ``"function"``: as in place: ``function(**args)`` returns the values.
* ``"inplace"``: ``function(**args)`` returns {argument name: new value} for the arguments the
  in-place function would have updated (at least the ones in ``expected``).

Uses only the public helpers of :mod:`fisheropt.vectors` (``load_suite``, ``decode``, ``compare``),
so it follows the format as they do::

    from fisheropt.vectors.functional import run_functional_suite
    failures = run_functional_suite("fadam", {"fadam_step": my_fadam_step}, to_array=jnp.asarray)
    # {case name: [mismatch messages]} (empty lists for cases that pass)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import VECTOR_DIR, compare, convert_arrays, decode, load_suite

__all__ = ["run_functional_case", "run_functional_suite", "lookup"]


def lookup(implementations, function: str) -> Callable:
    """The implementation of ``function`` (a reference function name such as "fadam_step") in a
    mapping or as an attribute of a namespace; KeyError naming it when absent."""
    if isinstance(implementations, Mapping):
        if function in implementations:
            return implementations[function]
    elif hasattr(implementations, function):
        return getattr(implementations, function)
    raise KeyError(f"no functional implementation of {function!r}")


def _step_tolerance(case):
    """The tolerance of one step's {params, state} (optimizer cases) or of ``expected``."""
    return case["tolerance"]


def run_functional_case(case: dict, implementations, *, to_array: Callable | None = None) -> list[str]:
    """Run one case through a functional implementation; the mismatch messages (empty: it passes).

    ``to_array`` converts the decoded NumPy input arrays to the implementation's arrays
    (e.g. ``jax.numpy.asarray``); results are compared through ``numpy.asarray`` by
    :func:`fisheropt.vectors.compare`, dtype and shape included."""
    conv = to_array or (lambda a: a)
    fn = lookup(implementations, case["function"])
    kind = case["kind"]
    tol = _step_tolerance(case)
    if kind == "optimizer":
        inputs = decode(case["inputs"])
        order = case["state_order"]
        params = convert_arrays(inputs["params"], conv)
        state = {k: convert_arrays(inputs["state"][k], conv) for k in order}
        hp = dict(case["hyperparams"])
        messages = []
        for offset, (grads, want) in enumerate(zip(inputs["grads"], decode(case["expected"]))):
            t = inputs["first_step"] + offset
            try:
                params, state = fn(params, convert_arrays(grads, conv), state, step=t, **hp)
            except Exception as exc:  # an implementation that raises fails the case, with the reason
                return messages + [f"{case['name']} step {t}: raised {type(exc).__name__}: {exc}"]
            params, state = list(params), {k: list(state[k]) for k in order}
            got = {"params": params, "state": state}
            messages += compare(got, want, tol, f"{case['name']} step {t}")
        return messages
    args = convert_arrays(decode(case["args"]), conv)
    expected = decode(case["expected"])
    try:
        out = fn(**args)
    except Exception as exc:
        return [f"{case['name']}: raised {type(exc).__name__}: {exc}"]
    if kind == "function":
        out = list(out) if isinstance(out, tuple) else [out]
        return compare(out, expected, tol, case["name"])
    if kind == "inplace":
        if not isinstance(out, Mapping):
            return [
                f"{case['name']}: a functional in-place case must return {{argument: new value}}, "
                f"got {type(out).__name__}"
            ]
        missing = [k for k in expected if k not in out]
        if missing:
            return [f"{case['name']}: no new value for {', '.join(missing)}"]
        return compare({k: out[k] for k in expected}, expected, tol, case["name"])
    raise ValueError(f"unknown case kind {kind!r}")


def run_functional_suite(
    suite,
    implementations,
    *,
    directory=VECTOR_DIR,
    to_array: Callable | None = None,
    select: Callable[[dict], bool] | None = None,
) -> dict[str, list[str]]:
    """Run every case of a suite (a name in ``directory`` or a loaded suite dict) whose function
    the implementation provides (and that ``select(case)`` accepts): {case name: messages}."""
    data = load_suite(suite, directory) if isinstance(suite, str) else suite
    results = {}
    for case in data["cases"]:
        if select is not None and not select(case):
            continue
        results[case["name"]] = run_functional_case(case, implementations, to_array=to_array)
    return results
