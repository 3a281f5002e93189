r"""ESimCSE momentum encoder update (Wu et al., 2021, eq. 4; MoCo, He et al. 2020).

Spec: spec/esimcse.md. The queue's embeddings come from a momentum encoder whose
parameters θ_k follow the trained encoder's θ_q by an exponential moving average:

.. math::
    \theta_k \leftarrow \lambda\,\theta_k + (1-\lambda)\,\theta_q, \qquad \lambda = 0.995 .

Arithmetic is elementwise in the parameter dtype: λ and 1 − λ are computed in
float64 on the host and rounded to that dtype, then each element is
``round(round(λ·θ_k) + round((1−λ)·θ_q))`` — two products and a sum, no
fused multiply-add — so every backend can agree bit for bit.
"""
from __future__ import annotations

import numpy as np

MOMENTUM = 0.995


def ema_coefficients(decay: float, dtype):
    """(λ, 1 − λ) as scalars of ``dtype``; 1 − λ is computed in float64 first."""
    t = np.dtype(dtype).type
    return t(decay), t(1.0 - float(decay))


def ema_update_tensor(theta_k, theta_q, *, decay: float = MOMENTUM):
    """One tensor, pure: returns λ·θ_k + (1 − λ)·θ_q as a new array of θ_k's dtype."""
    a, b = ema_coefficients(decay, theta_k.dtype)
    return a * theta_k + b * theta_q


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets`` (θ_k): the backend interface."""
    for k, q in zip(targets, sources):
        k[...] = ema_update_tensor(k, q, decay=decay)
