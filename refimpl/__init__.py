"""The NumPy reference: the executable specification of every rule.

One module per update rule or estimator, written to be read next to its paper.
Each rule has a pure single-tensor function ``<rule>_update`` that returns new
arrays (the math) and a multi-tensor in-place ``<rule>_step`` with the backend
signature (what the optimizer classes and the other backends implement).
Speed is not a goal here; clarity and exactness are.
"""

import importlib
import pkgutil

from .finite import all_finite
from .rule import Rule


def _discover_rules() -> dict[str, Rule]:
    """Every module of this package that defines ``RULE`` (a :class:`Rule`), by name.

    Discovery instead of a list: adding a rule is adding its reference file."""
    rules: dict[str, Rule] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "rule":
            continue
        rule = getattr(importlib.import_module(f"{__name__}.{info.name}"), "RULE", None)
        if isinstance(rule, Rule):
            if rule.name != info.name:
                raise ImportError(f"refimpl/{info.name}.py defines RULE named {rule.name!r}; they must match")
            rules[rule.name] = rule
    return rules


#: name -> :class:`Rule`, for every update rule of the reference (sorted by name).
RULES = _discover_rules()

# The step and update functions by their names (adam_step, fadam_update, ...).
for _rule in RULES.values():
    globals()[_rule.step.__name__] = _rule.step
    globals()[_rule.update.__name__] = _rule.update

__all__ = ["RULES", "Rule", "all_finite"]
# The functions' names come from the registry at import, so a type checker cannot list them.
__all__ += [r.step.__name__ for r in RULES.values()]  # pyright: ignore[reportUnsupportedDunderAll]
__all__ += [r.update.__name__ for r in RULES.values()]  # pyright: ignore[reportUnsupportedDunderAll]
