r"""The improved empirical Fisher (iEF; Wu et al., NeurIPS 2024) — spec/fisher.md §2.

.. math::
    \tilde F = G^\top \operatorname{diag}(s)^{-1} G = \sum_n \frac{g_n g_n^\top}{s_n},
    \qquad s_n = \lVert\nabla_{z_n} l_n\rVert^2 .

Each per-sample gradient is rescaled by the inverse norm of its logits-level
gradient, undoing the "inversely-scaled projection" of EF (well-fitted samples,
with small :math:`s_n`, no longer dominate the update). The paper uses the same sum
convention (its Eq. 1 and Eq. 14), so there is no factor of N.
"""

from typing import Any

import numpy as np
import numpy.typing as npt


def scaled_rows(G, s):
    """G̃ (N, P) float64 with rows g_n / √s_n, so that iEF = G̃ᵀG̃. Never forms 1/s_n or g_n/s_n,
    which overflow for a subnormal s_n even when g_n g_nᵀ/s_n is representable. Needs s > 0."""
    return G.astype(np.float64) / np.sqrt(s.astype(np.float64))[:, None]


def improved_empirical(G: npt.NDArray[Any], s: npt.NDArray[Any]):
    """iEF = G^T diag(s)^{-1} G, dense (P, P), float64 accumulation, G's dtype. Needs s > 0."""
    Gt = scaled_rows(G, s)
    return (Gt.T @ Gt).astype(G.dtype)


def improved_empirical_bruteforce(G, s):
    F = np.zeros((G.shape[1],) * 2)
    for g, sn in zip(G.astype(np.float64), s.astype(np.float64)):
        F += np.outer(g, g) / sn
    return F
