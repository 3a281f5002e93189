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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fisheropt.refimpl import RULES
from fisheropt.refimpl.rule import Rule

from . import TRANSFORMS, natural_gradient, transforms

__all__ = ["functional_steps", "functional_step"]


#: step(params, grads, state, *, step, **hyperparams) -> (params, state), as the vectors call it.
FunctionalStep = Callable[..., tuple[list[Any], dict[str, list[Any]]]]


def _registry_hyperparams(rule: Rule, kernel_hp: Mapping[str, Any]) -> dict[str, Any]:
    """The case's kernel keyword arguments (beta1, beta2, ...) as the registry names them (betas)."""
    out: dict[str, Any] = {}
    for h in rule.hyperparams:
        out[h.name] = tuple(kernel_hp[n] for n in h.names) if h.names else kernel_hp[h.name]
    return out


def functional_step(rule: Rule, *, jit: bool = True) -> FunctionalStep:
    """``step(params, grads, state, *, step, **hyperparams) -> (params, state)`` for ``rule``
    through ``fisheropt.optax.<rule>`` and ``optax.apply_updates``."""
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

            cache[key] = (tx, jax.jit(apply) if jit else apply)
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


def functional_steps(*, jit: bool = True) -> dict[str, Callable[..., Any]]:
    """{reference function name: functional JAX implementation} for the update-rule suites
    (every rule of the registry) and the Fisher suite."""
    out: dict[str, Callable[..., Any]] = {
        rule.step_function: functional_step(rule, jit=jit) for name, rule in RULES.items() if name in TRANSFORMS
    }
    out["fisher_gram"] = jax.jit(_fisher_gram) if jit else _fisher_gram
    out["fisher_sample_space_direction"] = (
        jax.jit(_fisher_sample_space_direction) if jit else _fisher_sample_space_direction
    )
    return out
