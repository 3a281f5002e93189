"""The NumPy reference: the executable specification of every rule.

One module per update rule or estimator, written to be read next to its paper.
Each rule has a pure single-tensor function ``<rule>_update`` that returns new
arrays (the math) and a multi-tensor in-place ``<rule>_step`` with the backend
signature (what the optimizer classes and the other backends implement).
Speed is not a goal here; clarity and exactness are.
"""
from .adam import adam_step, adam_update
from .adamw import adamw_step, adamw_update
from .coupled_adam import coupled_adam_step, coupled_adam_update
from .fadam import fadam_step, fadam_update
from .finite import all_finite

__all__ = [
    "adam_update", "adam_step",
    "adamw_update", "adamw_step",
    "fadam_update", "fadam_step",
    "coupled_adam_update", "coupled_adam_step",
    "all_finite",
]
