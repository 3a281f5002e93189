r"""The sampled (Monte-Carlo) Fisher (SF) — spec/fisher.md §2.

Labels are drawn from the model, :math:`\hat y_{kn}\sim p_n` for
:math:`k = 1..K`, ``labels_sampled`` has shape (K, N), and

.. math::
    \hat g_{kn} = J_n^\top (p_n - e_{\hat y_{kn}}),\qquad
    \mathrm{SF} = \frac1K\sum_{k,n} \hat g_{kn}\hat g_{kn}^\top = \hat G^\top\hat G,

with :math:`\hat G\in\mathbb R^{KN\times P}` the rows :math:`\hat g_{kn}/\sqrt K`
(row index k*N + n). :math:`\mathbb E[\mathrm{SF}] = F`.
"""

from typing import Any

import numpy as np
import numpy.typing as npt


def sample_labels(probs: npt.NDArray[Any], n_samples: int, rng: np.random.Generator):
    """(K, N) int64 labels with labels[k, n] ~ Categorical(probs[n]) (inverse-CDF sampling)."""
    p = probs.astype(np.float64)
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random((n_samples, p.shape[0]))
    out = np.empty((n_samples, p.shape[0]), dtype=np.int64)
    for k in range(n_samples):
        out[k] = (u[k][:, None] >= cdf).sum(axis=1)
    return np.minimum(out, p.shape[1] - 1)


def sampled_grads(J, probs, labels_sampled, xp=np, dtype=None):
    """Ĝ (K*N, P) = rows J_n^T (p_n - e_{ŷ_kn}) / sqrt(K), in ``dtype`` (default J's), NumPy or CuPy."""
    K, N = labels_sampled.shape
    C = probs.shape[1]
    dtype = np.dtype(J.dtype if dtype is None else dtype)
    R = xp.broadcast_to(probs, (K, N, C)).astype(dtype, copy=True)  # (K, N, C)
    R[xp.arange(K)[:, None], xp.arange(N)[None, :], labels_sampled] -= 1
    R *= dtype.type(1.0 / np.sqrt(K))
    if J.dtype == dtype:
        Gh = xp.einsum("ncp,knc->knp", J, R)
    else:  # upcasting: accumulate over classes, never a converted copy of J
        Gh = xp.zeros((K, N, J.shape[2]), dtype=dtype)
        for c in range(C):
            Gh += R[:, :, c, None] * J[None, :, c, :]
    return Gh.reshape(K * N, J.shape[2])


def sampled(J: npt.NDArray[Any], probs: npt.NDArray[Any], labels_sampled: npt.NDArray[Any]):
    """SF = Ĝ^T Ĝ, dense (P, P), float64 accumulation, J's dtype."""
    Gh = sampled_grads(J, probs, labels_sampled).astype(np.float64)
    return (Gh.T @ Gh).astype(J.dtype)


def sampled_bruteforce(J, probs, labels_sampled):
    """SF by the loop (1/K) sum_{k,n} ĝ ĝ^T (tests only), float64."""
    K, N = labels_sampled.shape
    F = np.zeros((J.shape[2],) * 2)
    for k in range(K):
        for n in range(N):
            r = probs[n].astype(np.float64).copy()
            r[labels_sampled[k, n]] -= 1
            g = J[n].astype(np.float64).T @ r
            F += np.outer(g, g) / K
    return F
