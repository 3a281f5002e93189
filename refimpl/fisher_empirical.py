r"""Per-sample gradients and the empirical Fisher (EF) — spec/fisher.md §2–3.

For softmax cross-entropy with logits Jacobians :math:`J_n\in\mathbb R^{C\times P}`,
probabilities :math:`p_n` and labels :math:`y_n`:

.. math::
    g_n = \nabla_\theta l_n = J_n^\top (p_n - e_{y_n}),\qquad
    s_n = \lVert\nabla_{z_n} l_n\rVert^2 = \lVert p_n - e_{y_n}\rVert^2,\qquad
    \mathrm{EF} = \sum_n g_n g_n^\top = G^\top G .

Inputs are assumed valid (fisheropt.fisher validates).
"""

from typing import Any

import numpy as np
import numpy.typing as npt


def logit_residuals(probs: npt.NDArray[Any], labels: npt.NDArray[Any]):
    """R (N, C): r_n = p_n - e_{y_n} = d l_n / d z_n."""
    R = probs.copy()
    R[np.arange(R.shape[0]), labels] -= 1
    return R


def per_sample_grads(J: npt.NDArray[Any], probs: npt.NDArray[Any], labels: npt.NDArray[Any]):
    """G (N, P): g_n = J_n^T (p_n - e_{y_n})."""
    return np.einsum("ncp,nc->np", J, logit_residuals(probs, labels))


def logit_grad_sq_norms(probs: npt.NDArray[Any], labels: npt.NDArray[Any]):
    """s (N,): s_n = ||p_n - e_{y_n}||^2 (the logits-level gradient norms squared)."""
    R = logit_residuals(probs, labels)
    return np.einsum("nc,nc->n", R, R)


def empirical(G: npt.NDArray[Any]):
    """EF = G^T G, dense (P, P), accumulated in float64 and returned in G's dtype."""
    G64 = G.astype(np.float64)
    return (G64.T @ G64).astype(G.dtype)


def empirical_bruteforce(G):
    """EF by the per-sample loop sum_n g_n g_n^T (tests only)."""
    F = np.zeros((G.shape[1], G.shape[1]))
    for g in G.astype(np.float64):
        F += np.outer(g, g)
    return F
