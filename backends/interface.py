"""The contract every backend implements.

The reference backend (``fisheropt.backends.reference``, name "numpy") defines
the signatures; every other backend must expose the same function names with
identical signatures (checked by tests/test_interface.py).

Conventions shared by all step functions
----------------------------------------
* Multi-tensor and in place: ``params``, ``grads`` and every state list are
  sequences of arrays, aligned by index, updated in place. A fused backend
  may update all tensors in one pass; nothing is returned.
* ``step`` is the 1-based index t of the update being applied (the optimizer
  increments its counter before calling, as torch.optim does).
* ``step`` and every hyperparameter are either one value for all tensors or a
  list/tuple with one value per tensor (torch param groups with their own
  learning rate, parameters with their own step count): one call still
  updates every tensor. Pairs such as ``betas`` arrive split (``beta1``,
  ``beta2``). The host scalars derived from them (bias corrections, β̂₂, step
  size) come from the rule's ``coefficients`` function in its descriptor
  (fisheropt.refimpl.rule), computed per tensor in float64.
* Arithmetic is elementwise in the parameter dtype (float32 or float64);
  scalar coefficients (bias corrections, lr·wd, ...) are computed in float64
  on the host and rounded to the parameter dtype. Global reductions (RMS,
  column means) are accumulated in float64.
* The step functions do not validate: the optimizer classes in
  fisheropt.optim check shapes, dtypes, flags, memory overlap, finiteness
  and hyperparameters before any backend call, so a rejected step changes
  nothing.
* All or nothing: a step function allocates every temporary and converts
  every argument before its first write (the reference computes every
  tensor's new values, then writes them; the fused backends prepare every
  kernel launch, then run them), so an exception such as MemoryError leaves
  every array unchanged. The optimizer makes one backend call per step and
  defers Ctrl-C while it runs (fisheropt._atomic).
* ``coupled_adam_step`` takes ``coupled`` (one bool per tensor): coupled
  tensors keep a per-column ``v`` of shape (d,), the others are updated by
  AdamW in the same call.
"""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A backend was asked for but cannot run here; the message says why."""


def _rule_functions() -> tuple[str, ...]:
    from fisheropt.refimpl import RULES

    return ("all_finite", *(rule.step_function for rule in RULES.values()))


SHARDED_FUNCTIONS = ("fadam_partials", "fadam_apply", "coupled_adam_partials", "coupled_adam_apply")

# The contract in families. A backend that lacks a function is unusable for that
# function only (fisheropt.backends.get(name, function) says so), not refused whole.
FAMILIES = {
    "update rules": _rule_functions(),  # one <rule>_step per rule of the registry, and the pre-step check
    "fisher": ("fisher_gram", "fisher_sample_space_direction"),
    "workloads": ("ema_update",),  # ESimCSE's momentum-encoder update
    # The two passes of the rules whose reductions span a whole tensor, for sharded tensors (FSDP2,
    # DTensor): partial sums of the local shard, then the update from the sums added over the shards
    # (spec/distributed.md §5). Loaded with the rule's step where the rule's module has them.
    "sharded": SHARDED_FUNCTIONS,
}
#: Every function name of the interface, family by family (a backend implements a subset).
FUNCTIONS = tuple(f for family in FAMILIES.values() for f in family)


def load_rule_functions(package: str, namespace: dict[str, object]) -> None:
    """Put ``<rule>_step`` (and ``<rule>_step_checked``, ``<rule>_partials``, ``<rule>_apply`` where
    they exist) of every registry rule into ``namespace``, from the backend's module
    ``<package>.<rule>``; a rule without a module there is left out (unavailable on that backend only)."""
    import importlib

    from fisheropt.refimpl import RULES

    for rule in RULES.values():
        try:
            module = importlib.import_module(f"{package}.{rule.name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{package}.{rule.name}":
                continue  # no kernel for this rule on this backend (yet)
            raise
        for name in (
            rule.step_function,
            rule.step_function + "_checked",
            rule.name + "_partials",
            rule.name + "_apply",
        ):
            if hasattr(module, name):
                namespace[name] = getattr(module, name)
