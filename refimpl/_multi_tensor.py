"""The multi-tensor, in-place form shared by every reference step function.

A step first computes the new value of every tensor (the pure ``<rule>_update``
functions, which allocate), then writes them all. Writing an array of the same
shape and dtype allocates nothing and cannot fail, so a step that raises (a
MemoryError, say) has written nothing: the backends' all-or-nothing contract.
"""


def apply_updates(targets, updates) -> None:
    """``targets``: tuple of lists (params, state...); ``updates``: per tensor, a tuple of new values."""
    for i, new_values in enumerate(updates):
        for target, new in zip(targets, new_values):
            target[i][...] = new
