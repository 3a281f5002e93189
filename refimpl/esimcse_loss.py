r"""InfoNCE with cosine similarity over in-batch positives and queue negatives.

Spec: spec/esimcse.md (SimCSE, Gao et al. 2021, eq. 1; ESimCSE, Wu et al. 2021, eq. 5).
Anchors h_i, positives h_i^+ (i = 1..B) and queue negatives h_m^- (m = 1..Q,
from the momentum encoder, treated as constants):

.. math::
    \ell = -\frac1B \sum_{i=1}^{B} \log
      \frac{e^{\cos(h_i, h_i^+)/\tau}}
           {\sum_{j=1}^{B} e^{\cos(h_i, h_j^+)/\tau} + \sum_{m=1}^{Q} e^{\cos(h_i, h_m^-)/\tau}},
    \qquad \tau = 0.05 .

Gradient. With u_i = h_i/\|h_i\|, v_j = h_j^+/\|h_j^+\|, n_m = h_m^-/\|h_m^-\|,
logits S = [U V^T, U N^T]/\tau and P = softmax(S) row-wise, let
G = (P - [I, 0])/B. Then

.. math::
    \partial\ell/\partial U = (G_{:, :B} V + G_{:, B:} N)/\tau,\qquad
    \partial\ell/\partial V = G_{:, :B}^T U/\tau,

and through the normalisation x = h/\|h\|:
\partial\ell/\partial h = (I - x x^T)\,\partial\ell/\partial x\,/\,\|h\| (row by row).
Everything is computed in float64; the queue gets no gradient.
"""

from __future__ import annotations

import numpy as np

TEMPERATURE = 0.05


def _normalize(h):
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    return h / norm, norm


def _logits(u, v, n, tau):
    s = u @ v.T
    if n is not None and n.shape[0]:
        s = np.concatenate([s, u @ n.T], axis=1)
    return s / tau


def info_nce(anchors, positives, negatives=None, *, tau: float = TEMPERATURE) -> float:
    """The loss value (float) for (B, d) anchors/positives and optional (Q, d) negatives."""
    return info_nce_with_grad(anchors, positives, negatives, tau=tau)[0]


def info_nce_with_grad(anchors, positives, negatives=None, *, tau: float = TEMPERATURE):
    """(loss, dloss/danchors, dloss/dpositives); gradients are float64 (B, d) arrays."""
    h = np.asarray(anchors, dtype=np.float64)
    hp = np.asarray(positives, dtype=np.float64)
    if h.ndim != 2 or h.shape != hp.shape:
        raise ValueError(f"anchors and positives must be the same (B, d) shape, got {h.shape}, {hp.shape}")
    u, nu = _normalize(h)
    v, nv = _normalize(hp)
    n = None
    if negatives is not None:
        neg = np.asarray(negatives, dtype=np.float64)
        if neg.ndim != 2 or (neg.shape[0] and neg.shape[1] != h.shape[1]):
            raise ValueError(f"negatives must be (Q, {h.shape[1]}), got {neg.shape}")
        n = _normalize(neg)[0] if neg.shape[0] else None
    B = h.shape[0]
    s = _logits(u, v, n, tau)
    smax = s.max(axis=1, keepdims=True)
    e = np.exp(s - smax)
    z = e.sum(axis=1, keepdims=True)
    diag = np.arange(B)
    loss = float(np.mean(np.log(z[:, 0]) + smax[:, 0] - s[diag, diag]))
    g = e / z
    g[diag, diag] -= 1.0
    g /= B
    du = g[:, :B] @ v
    if n is not None:
        du += g[:, B:] @ n
    du /= tau
    dv = g[:, :B].T @ u / tau
    dh = (du - u * np.sum(u * du, axis=1, keepdims=True)) / nu
    dhp = (dv - v * np.sum(v * dv, axis=1, keepdims=True)) / nv
    return loss, dh, dhp
