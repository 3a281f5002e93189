r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

Spec: spec/lion.md. The update is the sign of an interpolation between the
momentum and the gradient; the momentum itself is updated with a second, slower
factor:

.. math::
    c &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t \\
    \theta_t &= \theta_{t-1} - \alpha\,(\mathrm{sign}(c) + \lambda\,\theta_{t-1}) \\
    m_t &= \beta_2 m_{t-1} + (1-\beta_2)\,g_t

sign(0) = 0 (a coordinate whose interpolation is exactly 0 does not move, apart
from the decay). Every \|update\| is α (or 0), so Lion wants a smaller learning rate
than Adam (default 1e-4) and a larger decay. There is no bias correction: the step
index does not enter.
"""

import numpy as np

from .rule import Rule, StateArray, betas_param, lr_param, weight_decay_param


def lion_update(theta, g, m, *, t, lr, beta1, beta2, weight_decay):
    """One Lion step on one tensor. Pure: returns (theta, m) as new arrays."""
    dtype = theta.dtype.type
    c = dtype(beta1) * m + dtype(1 - beta1) * g  # before m is updated
    theta = theta - dtype(lr) * (np.sign(c) + dtype(weight_decay) * theta)
    m = dtype(beta2) * m + dtype(1 - beta2) * g
    return theta, m


def lion_coefficients(t, **_):
    """No step-dependent scalars: Lion has no bias correction."""
    return {}


RULE = Rule(
    title="Lion",
    summary="the sign of an interpolated momentum, with decoupled weight decay",
    paper="Chen et al., 2023",
    update=lion_update,
    state=(StateArray("m", "momentum (EMA of g with β2)"),),
    hyperparams=(
        lr_param(1e-4, typical=(1e-6, 1e-2)),
        betas_param((0.9, 0.99)),
        weight_decay_param(0.0, "decoupled decay λ: θ ← θ − αλθ"),
    ),
    coefficients=lion_coefficients,
    items_per_element=5,  # read θ, g, m; write θ, m
)

lion_step = RULE.step  # the multi-tensor, in-place form: refimpl/_multi_tensor.py
