r"""FAdam (Hwang, 2024): Adam read as natural-gradient descent with a diagonal
empirical Fisher, and corrected accordingly.

Spec: spec/fadam.md (also the history of the epsilon across the paper's versions).
Per tensor, with RMS(x) = \sqrt{\mathrm{mean}(x^2)} over the whole tensor:

.. math::
    \hat\beta_2 &= \beta_2\,\frac{1-\beta_2^{t-1}}{1-\beta_2^{t}}
        && \text{debiased EMA weight (0 at t=1, so } f_1 = g_1^2)\\
    f_t &= \hat\beta_2 f_{t-1} + (1-\hat\beta_2)\,g_t^2
        && \text{diagonal empirical Fisher}\\
    \epsilon_t &= \min(\epsilon,\ \epsilon_2\,\mathrm{RMS}(g_t))^{2p}
        \ \ (\epsilon^{2p}\text{ where that is 0}) && \text{adaptive epsilon}\\
    \bar g &= g_t / (f_t^{\,p} + \epsilon_t),\quad
    \bar g \leftarrow \bar g / \max(1, \mathrm{RMS}(\bar g)/c)
        && \text{natural gradient, RMS-clipped}\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,\bar g
        && \text{momentum after preconditioning, no bias correction}\\
    \bar w &= \theta / (f_t^{\,p} + \epsilon_t),\quad
    \bar w \leftarrow \bar w / \max(1, \mathrm{RMS}(\bar w)/c)
        && \text{Fisher-preconditioned weight decay}\\
    \theta_t &= \theta_{t-1} - \alpha\,(m_t + \lambda\,\bar w)
"""

import math

import numpy as np
from numpy.typing import DTypeLike

from ._multi_tensor import per_tensor, step_tensors
from .rule import Hyperparam, Rule, StateArray, adam_hyperparams, weight_decay_param


def sum_of_squares(x) -> float:
    """Σx² over all elements, accumulated in float64 (what the shards of a tensor add up)."""
    x64 = np.asarray(x, dtype=np.float64)
    return float(np.sum(x64 * x64))


def rms_of_sum(total, n) -> float:
    """√(total/n): the root mean square of n elements from their sum of squares (0 when n = 0)."""
    return math.sqrt(total / n) if n else 0.0


def rms(x) -> float:
    """Root mean square over all elements, accumulated in float64 (0 for an empty tensor)."""
    return rms_of_sum(sum_of_squares(x), x.size)


def debiased_beta2(beta2, t):
    r"""\hat\beta_2 = \beta_2 (1-\beta_2^{t-1}) / (1-\beta_2^t)."""
    return beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)


def adaptive_epsilon(rms_g, *, eps, eps2, p, dtype: DTypeLike = np.float64):
    r"""\epsilon_t = \min(\epsilon, \epsilon_2 RMS(g))^{2p}, as a value of ``dtype``.

    Computed in float64, rounded to the parameter dtype. Where it comes out 0,
    because RMS(g) = 0 or because it underflows (a subnormal gradient, or
    rounding to float32), \epsilon^{2p} is used instead; the result is then
    at least the dtype's smallest normal number, so f^p + \epsilon_t > 0 and
    g / (f^p + \epsilon_t) is never 0/0.

    The guard matters: v3 of the paper wrote \epsilon\min(1, RMS(g)), which is 0
    for an all-zero gradient and turns 0/(0+0) into NaN."""
    dtype = np.dtype(dtype).type
    eps_t = dtype(min(eps, eps2 * rms_g) ** (2 * p))
    if eps_t == 0:
        eps_t = dtype(eps ** (2 * p))
    return max(eps_t, np.finfo(dtype).tiny)


def fisher_ema(f, g, *, t, beta2):
    r"""f_t = \hat\beta_2 f_{t-1} + (1-\hat\beta_2)\,g^2, in f's dtype (the scalars from float64)."""
    dtype = f.dtype.type
    beta2_hat = debiased_beta2(beta2, t)
    return dtype(beta2_hat) * f + dtype(1 - beta2_hat) * (g * g)


def clip_scale(rms_x, c):
    """max(1, RMS(x)/c): divide by this to cap RMS(x) at c (the paper's form)."""
    return max(1.0, rms_x / c)


def fadam_update(theta, g, m, f, *, t, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, sums=None, count=None):
    """One FAdam step on one tensor. Pure: returns (theta, m, f) as new arrays.

    Where θ is a shard of a whole tensor (spec/distributed.md §5), ``sums`` are the whole tensor's
    (Σg², Σḡ², Σw̄²) (:func:`fadam_partial_sums` added over the shards) and ``count`` its size: the
    three RMS values come from them instead of from this shard."""

    def whole_rms(k, x):
        return rms(x) if sums is None else rms_of_sum(sums[k], count)

    dtype = theta.dtype.type
    f = fisher_ema(f, g, t=t, beta2=beta2)
    eps_t = adaptive_epsilon(whole_rms(0, g), eps=eps, eps2=eps2, p=p, dtype=theta.dtype)
    denom = f ** dtype(p) + eps_t

    g_bar = g / denom
    g_bar = g_bar / dtype(clip_scale(whole_rms(1, g_bar), clip))
    m = dtype(beta1) * m + dtype(1 - beta1) * g_bar

    w_bar = theta / denom
    w_bar = w_bar / dtype(clip_scale(whole_rms(2, w_bar), clip))
    theta = theta - dtype(lr) * (m + dtype(weight_decay) * w_bar)
    return theta, m, f


def fadam_partial_sums(theta, g, f, *, t, beta2, p, eps_t):
    """This shard's (Σg², Σḡ², Σw̄²) in float64, ḡ and w̄ before clipping formed with ``eps_t``
    (as :func:`fadam_update` forms them): its share of the sums behind the three RMS values."""
    dtype = theta.dtype.type
    denom = fisher_ema(f, g, t=t, beta2=beta2) ** dtype(p) + dtype(eps_t)
    return sum_of_squares(g), sum_of_squares(g / denom), sum_of_squares(theta / denom)


def fadam_partials(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, eps_t=None):
    """Pass 1 of a sharded step: (T, 3) float64, :func:`fadam_partial_sums` of every tensor, with
    ``eps_t`` (one per tensor; None: the guess ε^{2p}, which holds unless RMS(g) < ε/ε₂)."""
    hp = per_tensor(len(params), t=step, beta2=beta2, eps=eps, eps2=eps2, p=p)
    if eps_t is None:
        eps_t = [
            adaptive_epsilon(math.inf, eps=h["eps"], eps2=h["eps2"], p=h["p"], dtype=x.dtype)
            for h, x in zip(hp, params)
        ]
    rows = [
        fadam_partial_sums(theta, g, f_i, t=h["t"], beta2=h["beta2"], p=h["p"], eps_t=e)
        for theta, g, f_i, h, e in zip(params, grads, f, hp, eps_t)
    ]
    return np.array(rows, dtype=np.float64).reshape(len(params), 3)


def fadam_apply(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay, sums, counts):
    """Pass 2 of a sharded step: :func:`fadam_update` of every tensor with its whole tensor's sums
    (row of ``sums``) and size (``counts``); in place, all computed, then written."""
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2, clip=clip, p=p, weight_decay=weight_decay)
    sums = [tuple(row) for row in np.asarray(sums, np.float64)]
    step_tensors(fadam_update, params, grads, (m, f), t=step, sums=sums, count=list(counts), **hp)


def fadam_coefficients(t, *, beta2, **_):
    r"""\hat\beta_2 of step t, in float64."""
    return {"beta2_hat": debiased_beta2(beta2, t)}


RULE = Rule(
    title="FAdam",
    summary="Adam corrected as natural-gradient descent with a diagonal Fisher",
    paper="Hwang, 2024",
    update=fadam_update,
    state=(
        StateArray("m", "momentum of the clipped natural gradient", reduced=True),
        StateArray("f", "diagonal empirical Fisher (debiased EMA of g²)", second_moment=True),
    ),
    hyperparams=adam_hyperparams(
        Hyperparam(
            "eps2",
            0.01,
            "scale of the adaptive epsilon ε₂·RMS(g)",
            low=0.0,
            low_open=True,
            normal=True,
            typical=(1e-4, 1.0),
        ),
        Hyperparam(
            "clip",
            1.0,
            "cap c on the RMS of the natural gradient and of w̄",
            low=0.0,
            low_open=True,
            typical=(1e-2, 10.0),
        ),
        Hyperparam(
            "p",
            0.5,
            "Fisher power (0.5: square root, as in Adam)",
            low=0.0,
            high=1.0,
            low_open=True,
            typical=(0.05, 1.0),
        ),
        weight_decay_param(0.1, "weight decay λ, preconditioned by the Fisher"),
    ),
    coefficients=fadam_coefficients,
    items_per_element=10,  # pass 1 read θ, g, f, write f; pass 2 read θ, g, f, m, write θ, m
)

fadam_step = RULE.step  # the multi-tensor, in-place form: refimpl/_multi_tensor.py
