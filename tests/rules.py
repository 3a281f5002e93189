"""Test helpers that read the rule registry: optimizers, problems and hyperparameters for any rule.

Nothing here lists the rules: a rule added to fisheropt.refimpl.RULES is tested by
every test parametrised over RULE_NAMES.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

import fisheropt as fo
from fisheropt.refimpl import RULES

RULE_NAMES = tuple(RULES)
CLASS_NAMES = tuple(rule.title for rule in RULES.values())


def flags_for(rule, params):
    """The rule's tensor flags (Coupled Adam: every V×d matrix with V ≥ 1 coupled), or None."""
    if rule.tensor_flag is None:
        return None
    return [p.ndim == 2 and p.shape[0] > 0 for p in params]


def make_optimizer(rule_name, params, backend="numpy", **kw):
    """fo.<Rule>(params, ...) with the rule's tensor flags filled in unless given."""
    rule = RULES[rule_name] if rule_name in RULES else next(r for r in RULES.values() if r.title == rule_name)
    if rule.tensor_flag is not None and rule.tensor_flag.name not in kw:
        kw[rule.tensor_flag.name] = flags_for(rule, params)
    return getattr(fo, rule.title)(params, backend=backend, **kw)


def snapshot(opt):
    """Everything a refused call must leave as it was: the bytes of params and state, the step count,
    the hyperparameters."""
    return (
        [p.tobytes() for p in opt.params],
        {k: [a.tobytes() for a in v] for k, v in opt.state.items()},
        opt.step_count,
        opt.hyperparams,
    )


def log_uniform(lo, hi):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def _value(h):
    lo, hi = h.typical if h.typical is not None else (h.low, h.high)
    if h.names:  # a pair such as betas: each in [lo, hi]
        return st.one_of(st.sampled_from([lo, 0.9, hi]), st.floats(lo, hi))
    values = log_uniform(lo, hi)
    if h.low == 0.0 and not h.low_open:  # 0 is valid and special (no decay, lr 0)
        values = st.one_of(st.just(0.0), values)
    if h.name == "p":  # the ways f^p is evaluated: sqrt, itself, pow
        values = st.one_of(st.sampled_from([0.5, 1.0]), values)
    return values


@st.composite
def kernel_hyperparams(draw, rule, n_tensors, *, per_tensor=True):
    """Kernel keyword hyperparameters of ``rule`` (pairs split), each one value or, sometimes,
    one per tensor (param groups); ``step`` is added by the caller."""
    out = {}
    for h in rule.hyperparams:
        names = h.kernel_names
        for name in names:
            if per_tensor and n_tensors > 1 and draw(st.integers(0, 3)) == 0:
                out[name] = [draw(_value(h)) for _ in range(n_tensors)]
            else:
                out[name] = draw(_value(h))
    return out
