r"""Embedding-geometry measures used by the Coupled Adam paper (Stollenwerk &
Stollenwerk, 2025) and, before it, Mu & Viswanath (2018, "All-but-the-Top").

``E`` is a V×d embedding matrix, one row e_i per vocabulary item.

.. math::
    Z(u) &= \sum_{i=1}^{V} \exp(u^\top e_i) \\
    \mathrm{Iso}(E) &= \frac{\min_{u \in U} Z(u)}{\max_{u \in U} Z(u)} \in (0, 1]
        && U = \text{unit eigenvectors of } E^\top E\ (\text{both signs}) \\
    \mu &= \frac1V \sum_i e_i, \qquad
        \frac{\lVert\mu\rVert}{\frac1V\sum_i \lVert e_i\rVert}
        && \text{mean-embedding norm, absolute and relative} \\
    \kappa(E) &= \sigma_{\max}(E) / \sigma_{\min}(E)
        && \text{condition number (2-norm)}

Iso(E) = 1 means the partition function Z(u) is the same in every principal
direction (isotropic); a common mean shift of all embeddings drives it to 0.
Everything is computed in float64; these are measurements, not training code.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["isotropy", "log_partition", "mean_embedding_norm", "condition_number", "embedding_report"]


def _as_matrix(E) -> np.ndarray:
    E = np.asarray(E, dtype=np.float64)
    if E.ndim != 2 or E.shape[0] == 0 or E.shape[1] == 0:
        raise ValueError(f"E must be a non-empty 2-D array (V×d), got shape {E.shape}")
    if not np.all(np.isfinite(E)):
        raise ValueError("E has non-finite values")
    return E


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    amax = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(amax, axis=axis) + np.log(np.sum(np.exp(a - amax), axis=axis))


def log_partition(E, U) -> np.ndarray:
    r"""\log Z(u) = \log\sum_i \exp(u^\top e_i) for each column u of U (d×k), stably."""
    E = _as_matrix(E)
    U = np.asarray(U, dtype=np.float64)
    return _logsumexp(E @ U, axis=0)


def isotropy(E) -> float:
    r"""Iso(E) = \min_u Z(u) / \max_u Z(u) over the unit eigenvectors u of E^\top E.

    Z(u) = \sum_i \exp(u^\top e_i). An eigenvector's sign is arbitrary (u and -u
    are both unit eigenvectors), so both signs are included: the result does
    not depend on the eigensolver's sign convention. Computed in log space
    (log-sum-exp), so large embeddings do not overflow; the ratio is
    \exp(\min\log Z - \max\log Z). Returns a float in (0, 1] (it may
    underflow to 0.0 for extremely anisotropic E)."""
    E = _as_matrix(E)
    # Eigenvectors of E^T E are E's right singular vectors; eigh on the d×d Gram
    # matrix is cheap and exact enough for a measurement.
    _, U = np.linalg.eigh(E.T @ E)
    logz = log_partition(E, np.concatenate([U, -U], axis=1))
    return float(math.exp(float(np.min(logz) - np.max(logz))))


def mean_embedding_norm(E) -> tuple[float, float]:
    r"""(\lVert\mu\rVert,\ \lVert\mu\rVert / \mathrm{mean}_i\lVert e_i\rVert) with \mu = \frac1V\sum_i e_i.

    The second value is scale-free: 1 when all embeddings are equal, near
    1/\sqrt{V} for V random isotropic vectors. It is NaN when every row is zero."""
    E = _as_matrix(E)
    mu_norm = float(np.linalg.norm(E.mean(axis=0)))
    mean_row_norm = float(np.mean(np.linalg.norm(E, axis=1)))
    ratio = mu_norm / mean_row_norm if mean_row_norm > 0 else float("nan")
    return mu_norm, ratio


def condition_number(E) -> float:
    r"""\kappa(E) = \sigma_{\max}(E) / \sigma_{\min}(E), from the singular values of E.

    \sigma_{\min} is the smallest of the min(V, d) singular values; the result
    is ``inf`` when E is rank deficient: \sigma_{\min} \le \max(V, d)\,\epsilon\,\sigma_{\max}
    (the rank tolerance of ``numpy.linalg.matrix_rank``). An exactly singular matrix
    rarely gives \sigma_{\min} = 0 in floating point, and whether it does depends on
    the LAPACK build, so a plain ``> 0`` test would not be reproducible."""
    E = _as_matrix(E)
    s = np.linalg.svd(E, compute_uv=False)
    singular = s[-1] <= max(E.shape) * np.finfo(s.dtype).eps * s[0]
    return float("inf") if singular else float(s[0] / s[-1])


def embedding_report(E) -> dict:
    """All measures at once: isotropy, mu_norm, mu_ratio, condition_number."""
    mu_norm, mu_ratio = mean_embedding_norm(E)
    return {"isotropy": isotropy(E), "mu_norm": mu_norm, "mu_ratio": mu_ratio, "condition_number": condition_number(E)}
