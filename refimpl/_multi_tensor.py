"""The multi-tensor, in-place form shared by every reference step function.

A step first computes the new value of every tensor (the pure ``<rule>_update``
functions, which allocate), then writes them all. Writing an array of the same
shape and dtype allocates nothing and cannot fail, so a step that raises (a
MemoryError, say) has written nothing: the backends' all-or-nothing contract.

The step index and every hyperparameter may be one value for all tensors or a
sequence with one value per tensor (param groups with their own learning rate,
parameters with their own step count, as in torch.optim): :func:`per_tensor`.

Every rule's multi-tensor step, ``<rule>_step``, is :func:`rule_step` of its descriptor: the
per-tensor ``update`` holds the math, and the step's signature follows from the descriptor's
state and hyperparameters, so it is written nowhere by hand.
"""

import inspect


def step_tensors(update, params, grads, state, **values) -> None:
    """The multi-tensor in-place step: ``update(θ_i, g_i, *state_i, **values_i)`` for every tensor
    (``update`` may be a list, one function per tensor), all computed, then all written."""
    updates = update if isinstance(update, list) else [update] * len(params)
    apply_updates(
        (params, *state),
        [
            fn(theta, g, *(s[i] for s in state), **hp)
            for i, (fn, theta, g, hp) in enumerate(zip(updates, params, grads, per_tensor(len(params), **values)))
        ],
    )


def apply_updates(targets, updates) -> None:
    """``targets``: tuple of lists (params, state...); ``updates``: per tensor, a tuple of new values."""
    for i, new_values in enumerate(updates):
        for target, new in zip(targets, new_values):
            target[i][...] = new


def per_tensor(n: int, **values) -> list[dict]:
    """n keyword dicts: each value as is, or its i-th element where it is a list or tuple of n.

    (A pair hyperparameter is split into scalars before it reaches a step function,
    so a tuple here is always one value per tensor.)"""
    for name, value in values.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} tensors")
    return [
        {name: value[i] if isinstance(value, (list, tuple)) else value for name, value in values.items()}
        for i in range(n)
    ]


def rule_step(rule):
    """``<rule>_step(params, grads, *state, *, step, <kernel hyperparameters>[, <tensor flag>])``:
    the backend interface of ``rule``, in place, all tensors computed, then written.

    Where the rule has a tensor flag (Coupled Adam's ``coupled``), a flagged tensor takes
    ``rule.update`` and the others ``rule.update_unflagged``."""
    flag = rule.tensor_flag.name if rule.tensor_flag else None

    # Every keyword arrives in ``keywords``: the signature below is what callers and tools see.
    def step(params, grads, *state, **keywords):
        t = keywords.pop("step")
        update = rule.update
        if flag is not None:
            update = [rule.update if f else rule.update_unflagged for f in keywords.pop(flag)]
        step_tensors(update, params, grads, state, t=t, **keywords)

    positional = ["params", "grads", *rule.state_names]
    keywords = ["step", *(n for h in rule.hyperparams for n in h.kernel_names), *([flag] if flag else [])]
    step.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in positional]
        + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in keywords]
    )
    step.__name__ = step.__qualname__ = rule.step_function
    step.__module__ = rule.update.__module__
    step.__doc__ = f"{rule.title}, multi-tensor and in place: the backend interface (``rule_step`` of its RULE)."
    return step
