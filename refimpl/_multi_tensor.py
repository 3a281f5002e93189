"""The multi-tensor, in-place form shared by every reference step function.

A step first computes the new value of every tensor (the pure ``<rule>_update``
functions, which allocate), then writes them all. Writing an array of the same
shape and dtype allocates nothing and cannot fail, so a step that raises (a
MemoryError, say) has written nothing: the backends' all-or-nothing contract.

The step index and every hyperparameter may be one value for all tensors or a
sequence with one value per tensor (param groups with their own learning rate,
parameters with their own step count, as in torch.optim): :func:`per_tensor`.
"""


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
