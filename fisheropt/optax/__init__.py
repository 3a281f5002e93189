"""fisheropt's update rules for JAX, as optax gradient transformations.

::

    import optax
    import fisheropt.optax as foo

    tx = foo.fadam(learning_rate=1e-3)                                # optax.GradientTransformation
    tx = foo.coupled_adam(learning_rate=3e-4, coupled=mask_pytree)    # True for V×d embeddings
    tx = optax.chain(optax.clip_by_global_norm(1.0), foo.fadam(optax.cosine_decay_schedule(1e-3, 10_000)))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

One transformation per rule of the registry (:data:`fisheropt.refimpl.RULES`), named as the
rule (``adam``, ``adamw``, ``fadam``, ``coupled_adam``, and ``lion`` where the registry has
it), with the registry's hyperparameters, defaults and valid ranges (``lr`` is optax's
``learning_rate``: a float or a schedule). Pure JAX: jit-able, vmap-able, any pytree.
Building blocks without the learning rate: ``scale_by_adam``, ``scale_by_coupled_adam``,
``scale_by_fadam`` (weight decay included: it does not factorise), ``scale_by_lion``.
Natural-gradient pieces: :mod:`fisheropt.optax.natural_gradient`.

Needs ``pip install "fisheropt[jax]"`` (jax, optax). Numerics: spec/conventions.md, with
x64 disabled as described in ``fisheropt/optax/_numerics.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

try:
    for _dependency in ("jax", "optax"):
        importlib.import_module(_dependency)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"fisheropt.optax needs jax and optax: pip install 'fisheropt[jax]' ({exc})") from exc

import optax

from fisheropt.refimpl import RULES

from . import natural_gradient, transforms
from .natural_gradient import (
    ef_direction,
    exact_direction,
    fisher_matvec,
    ief_direction,
    logit_grad_sq_norms,
    per_sample_grads,
)
from .transforms import BLOCKS, FACTORISATIONS, MATH, MissingRule, compute_dtype

#: name -> constructor, for every rule of the registry that has JAX math (all of them: tested).
TRANSFORMS = {name: transforms.rule_transform(rule) for name, rule in RULES.items() if name in MATH}
#: building blocks whose rule is in the registry.
BUILDING_BLOCKS = {name: transforms.block(name) for name, (rule, _) in BLOCKS.items() if rule in RULES}

globals().update(TRANSFORMS)
globals().update(BUILDING_BLOCKS)

__all__ = [
    "TRANSFORMS",
    "BUILDING_BLOCKS",
    "FACTORISATIONS",
    "compute_dtype",
    "natural_gradient",
    "per_sample_grads",
    "logit_grad_sq_norms",
    "ef_direction",
    "ief_direction",
    "fisher_matvec",
    "exact_direction",
    "MissingRule",
]
# The transformations' names come from the registry at import, so a type checker cannot list them.
__all__ += [*TRANSFORMS, *BUILDING_BLOCKS]  # pyright: ignore[reportUnsupportedDunderAll]


def __getattr__(name: str) -> Callable[..., optax.GradientTransformation]:
    """A rule (or block) with JAX math whose descriptor is not in this installation's registry.

    (Its return type types the transformations made above for type checkers, which cannot see them.)"""
    rule = name if name in MATH else BLOCKS[name][0] if name in BLOCKS else None
    if rule is not None:
        raise MissingRule(
            f"fisheropt.optax.{name} needs the update rule {rule!r} in the registry "
            f"(fisheropt.refimpl.RULES, a refimpl/{rule}.py defining RULE); this installation has only "
            f"{', '.join(RULES)}"
        )
    raise AttributeError(f"module 'fisheropt.optax' has no attribute {name!r}")
