r"""Matrix-free Fisher estimators as scipy LinearOperators — spec/fisher.md §4.

Each operator is symmetric, float64, of shape (P, P) and optionally damped
(:math:`+\lambda I`); a matvec costs O(N·C·P) (or O(N·P)) and stores nothing P×P.
"""

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.sparse.linalg import LinearOperator


def _damped_operator(P, product, damping):
    """The LinearOperator v -> product(v) + damping·v on float64 vectors of length P."""
    damping = float(damping)

    def matvec(v):
        v = np.asarray(v, dtype=np.float64).ravel()
        out = product(v)
        return out + damping * v if damping else out

    # scipy has no annotations, and pyright takes LinearOperator's factory for its abstract constructor.
    return LinearOperator((P, P), matvec=matvec, rmatvec=matvec, dtype=np.float64)  # pyright: ignore[reportCallIssue]


def exact_operator(J: npt.NDArray[Any], probs: npt.NDArray[Any], damping: float = 0.0):
    """v -> (sum_n J_n^T (diag p_n - p_n p_n^T) J_n + λI) v."""
    J64 = J.astype(np.float64)
    p = probs.astype(np.float64)

    def product(v):
        Jv = J64 @ v  # (N, C)
        HJv = p * Jv - p * np.sum(p * Jv, axis=1, keepdims=True)
        return np.einsum("ncp,nc->p", J64, HJv)

    return _damped_operator(J.shape[2], product, damping)


def empirical_operator(G: npt.NDArray[Any], damping: float = 0.0):
    """v -> (G^T G + λI) v."""
    G64 = G.astype(np.float64)

    def product(v):
        return G64.T @ (G64 @ v)

    return _damped_operator(G.shape[1], product, damping)


def improved_operator(G: npt.NDArray[Any], s: npt.NDArray[Any], damping: float = 0.0):
    """v -> (G^T diag(s)^{-1} G + λI) v = (G̃ᵀG̃ + λI) v with rows g_n/√s_n (no overflow of g_n/s_n)."""
    from .fisher_improved import scaled_rows

    Gt = scaled_rows(G, s)

    def product(v):
        return Gt.T @ (Gt @ v)

    return _damped_operator(G.shape[1], product, damping)


def sampled_operator(
    J: npt.NDArray[Any], probs: npt.NDArray[Any], labels_sampled: npt.NDArray[Any], damping: float = 0.0
):
    """v -> (Ĝ^T Ĝ + λI) v with Ĝ from labels_sampled (K, N)."""
    from .fisher_sampled import sampled_grads

    Gh = sampled_grads(J, probs, labels_sampled).astype(np.float64)

    def product(v):
        return Gh.T @ (Gh @ v)

    return _damped_operator(J.shape[2], product, damping)
