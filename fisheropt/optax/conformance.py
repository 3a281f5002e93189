"""fisheropt.optax as a functional implementation of the spec: what the golden vectors run.

:func:`functional_steps` maps every reference function the vectors call to a functional
JAX implementation (see :mod:`fisheropt.vectors.functional`): ``<rule>_step`` through the
rule's optax transformation (state = the case's arrays, ``count = t - 1``), and the Fisher
suite's ``fisher_gram`` / ``fisher_sample_space_direction`` through
:mod:`fisheropt.optax.natural_gradient`. Float64 cases need ``jax_enable_x64``::

    import jax, jax.numpy as jnp
    from fisheropt.vectors.functional import run_functional_suite
    from fisheropt.optax.conformance import functional_steps
    with jax.enable_x64(True):
        failures = run_functional_suite("fadam", functional_steps(), to_array=jnp.asarray)

``functional_steps(interpret=True)`` runs the same lowered programs through the StableHLO
reference interpreter (:func:`interpreted`) instead of compiling them with XLA: IEEE arithmetic,
subnormal numbers included, on any host. XLA:CPU flushes subnormals to zero (spec/vectors.md,
"Functional implementations"), so on a CPU this is how the cases tagged ``subnormal`` check the
program fisheropt.optax emits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from fisheropt.refimpl import RULES
from fisheropt.refimpl.rule import Rule

from . import TRANSFORMS, natural_gradient, transforms

__all__ = ["functional_steps", "functional_step", "interpreted", "interpreter_keeps_subnormals"]


#: step(params, grads, state, *, step, **hyperparams) -> (params, state), as the vectors call it.
FunctionalStep = Callable[..., tuple[list[Any], dict[str, list[Any]]]]


def interpreted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` lowered as ``jax.jit`` lowers it, but run by the StableHLO reference interpreter
    (``stablehlo.eval_module``) instead of an XLA backend; arrays in, NumPy arrays out.

    The interpreter evaluates each op with IEEE semantics in the calling thread: no flushing of
    subnormals (XLA:CPU's runtime flushes them), no fusion, no FMA contraction. It is slow (tiny
    arrays only) and cannot run custom calls (LAPACK on CPU, hence not the Fisher solves): a
    program with one raises ValueError before the interpreter sees it (it would abort the
    process). Arguments are converted to the dtypes ``jit`` gives them (float64 → float32
    without x64); one lowering per argument signature."""
    cache: dict[object, tuple[ir.Module, Any, list[np.dtype[Any]]]] = {}

    def call(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        arrays = [np.asarray(x) for x in leaves]
        key = (treedef, tuple((a.shape, a.dtype) for a in arrays), jax.config.read("jax_enable_x64"))
        if key not in cache:
            # lowered for the CPU whatever the default backend: the interpreter runs on the host
            lowered = jax.jit(fn, keep_unused=True).trace(*args, **kwargs).lower(lowering_platforms=("cpu",))
            module = lowered.compiler_ir("stablehlo")
            if not isinstance(module, ir.Module):
                raise RuntimeError("jax lowered no StableHLO module")
            text = str(module)
            if "stablehlo.custom_call" in text:
                target = text.split("stablehlo.custom_call @", 1)[1].split("(", 1)[0]
                raise ValueError(f"the StableHLO interpreter cannot run the custom call {target!r}")
            dtypes = [np.dtype(a.dtype) for a in jax.tree.leaves(lowered.in_avals)]
            if len(dtypes) != len(arrays) or _main_arity(module) != len(arrays):
                raise RuntimeError(f"the lowered module does not take the {len(arrays)} arguments given")
            cache[key] = (module, lowered.out_tree, dtypes)
        module, out_tree, dtypes = cache[key]
        with module.context:
            # (a C-ordered copy in jit's dtype; Any: NumPy's stubs do not declare the buffer protocol)
            hosts: list[Any] = [np.array(a, dtype=d, order="C") for a, d in zip(arrays, dtypes)]
            attrs = [ir.DenseElementsAttr.get(h) for h in hosts]
            outs = stablehlo.eval_module(module, attrs)
            return jax.tree.unflatten(out_tree, [np.array(o) for o in outs])

    return call


def _main_arity(module: ir.Module) -> int:
    for op in module.body.operations:
        if ir.StringAttr(op.attributes["sym_name"]).value == "main":
            return len(op.regions[0].blocks[0].arguments)
    raise RuntimeError("the lowered module has no main function")


def interpreter_keeps_subnormals() -> bool:
    """Whether :func:`interpreted` keeps float32 subnormals in this thread (2 · 1e-40 ≠ 0): false
    only if something set the CPU's flush-to-zero mode in the calling thread."""
    tiny = np.float32(1e-40)
    return bool(interpreted(lambda x: x * np.float32(2))(tiny) == tiny * np.float32(2))


def _registry_hyperparams(rule: Rule, kernel_hp: Mapping[str, Any]) -> dict[str, Any]:
    """The case's kernel keyword arguments (beta1, beta2, ...) as the registry names them (betas)."""
    out: dict[str, Any] = {}
    for h in rule.hyperparams:
        out[h.name] = tuple(kernel_hp[n] for n in h.names) if h.names else kernel_hp[h.name]
    return out


def _compiled(fn: Callable[..., Any], jit: bool, interpret: bool) -> Callable[..., Any]:
    if interpret:
        return interpreted(fn)
    return jax.jit(fn) if jit else fn


def functional_step(rule: Rule, *, jit: bool = True, interpret: bool = False) -> FunctionalStep:
    """``step(params, grads, state, *, step, **hyperparams) -> (params, state)`` for ``rule``
    through ``fisheropt.optax.<rule>`` and ``optax.apply_updates``; jitted, eager (``jit=False``)
    or run by the StableHLO interpreter (``interpret=True``, :func:`interpreted`)."""
    names = rule.state_names
    flag = rule.tensor_flag
    cache: dict[object, tuple[optax.GradientTransformation, Callable[..., Any]]] = {}

    def step(
        params: Sequence[Any], grads: Sequence[Any], state: Mapping[str, Sequence[Any]], *, step: int, **hp: Any
    ) -> tuple[list[Any], dict[str, list[Any]]]:
        flags = hp.pop(flag.name) if flag is not None else None
        key = (tuple(sorted(hp.items())), tuple(flags) if flags is not None else None)
        if key not in cache:
            kw = _registry_hyperparams(rule, hp)
            lr = kw.pop("lr")
            if flag is not None and flags is not None:
                kw[flag.name] = [bool(c) for c in flags]
            tx = TRANSFORMS[rule.name](learning_rate=lr, **kw)

            def apply(params: list[Any], grads: list[Any], state: Any) -> tuple[Any, Any]:
                updates, new_state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), new_state

            cache[key] = (tx, _compiled(apply, jit, interpret))
        tx, apply = cache[key]
        State = transforms.state_class(f"{rule.title}State", names)
        st = State(jnp.asarray(step - 1, jnp.int32), **{n: list(state[n]) for n in names})
        new_params, new_state = apply(list(params), list(grads), st)
        return list(new_params), {n: list(getattr(new_state, n)) for n in names}

    return step


def _fisher_gram(G: jax.Array) -> jax.Array:
    return natural_gradient.fisher_gram(G)


def _fisher_sample_space_direction(G: jax.Array, rhs: jax.Array, damping: float) -> jax.Array:
    return natural_gradient.fisher_sample_space_direction(G, rhs, damping)


def functional_steps(*, jit: bool = True, interpret: bool = False) -> dict[str, Callable[..., Any]]:
    """{reference function name: functional JAX implementation} for the update-rule suites
    (every rule of the registry) and the Fisher suite; jitted, eager (``jit=False``) or run by
    the StableHLO interpreter (``interpret=True``: without the direction, which needs LAPACK)."""
    out: dict[str, Callable[..., Any]] = {
        rule.step_function: functional_step(rule, jit=jit, interpret=interpret)
        for name, rule in RULES.items()
        if name in TRANSFORMS
    }
    out["fisher_gram"] = _compiled(_fisher_gram, jit, interpret)
    if not interpret:  # a Cholesky solve: a LAPACK custom call on CPU, which the interpreter cannot run
        out["fisher_sample_space_direction"] = _compiled(_fisher_sample_space_direction, jit, interpret)
    return out
