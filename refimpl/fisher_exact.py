r"""The exact Fisher (= the generalised Gauss-Newton for softmax cross-entropy) — spec/fisher.md §2.

.. math::
    F = \sum_n J_n^\top H_n J_n,\qquad H_n = \operatorname{diag}(p_n) - p_n p_n^\top
    \quad(\text{the Hessian of } l_n \text{ w.r.t. the logits, independent of } y_n).

:math:`H_n = B_n^\top B_n` with :math:`B_n = (I - u_n u_n^\top)\operatorname{diag}(u_n)`,
:math:`u_n = \sqrt{p_n}` (a unit vector since :math:`\sum_c p_{nc} = 1`, so
:math:`I - u_nu_n^\top` is a projector). Hence :math:`F = A^\top A` with the
:math:`NC\times P` "Fisher factor" :math:`A` whose block n is :math:`B_n J_n`; the
exact natural-gradient direction is solved in that NC-dimensional space
(fisher_ngd.exact_direction) without forming F.
"""

from typing import Any

import numpy as np
import numpy.typing as npt


def logit_hessians(probs):
    """H (N, C, C): diag(p_n) - p_n p_n^T."""
    C = probs.shape[1]
    H = -np.einsum("nc,nd->ncd", probs, probs)
    H[:, np.arange(C), np.arange(C)] += probs
    return H


def fisher_factor(J, probs, xp=np):
    """A (N*C, P) with A^T A = F: rows B_n J_n, B_n = (I - u u^T) diag(u), u = sqrt(p_n).

    Computed in float64; works for NumPy or CuPy (``xp``)."""
    N, C, P = J.shape
    u = xp.sqrt(xp.maximum(probs.astype(xp.float64), 0.0))  # (N, C)
    A = J.astype(xp.float64)  # the only N*C*P array
    A *= u[:, :, None]  # diag(u) J_n
    proj = xp.einsum("nc,ncp->np", u, A)  # u^T diag(u) J_n, (N, P)
    for c in range(C):  # (I - u u^T) diag(u) J_n,
        A[:, c, :] -= u[:, c, None] * proj  # N x P temporaries only
    return A.reshape(N * C, P)


def exact(J: npt.NDArray[Any], probs: npt.NDArray[Any]):
    """F = sum_n J_n^T (diag p_n - p_n p_n^T) J_n, dense (P, P), float64 accumulation, J's dtype."""
    J64 = J.astype(np.float64)
    H = logit_hessians(probs.astype(np.float64))
    F = np.einsum("ncp,ncd,ndq->pq", J64, H, J64, optimize=True)
    return F.astype(J.dtype)


def exact_bruteforce(J, probs):
    """F by the per-sample loop (tests only), float64."""
    P = J.shape[2]
    F = np.zeros((P, P))
    for Jn, pn in zip(J.astype(np.float64), probs.astype(np.float64)):
        F += Jn.T @ (np.diag(pn) - np.outer(pn, pn)) @ Jn
    return F


def exact_expectation_bruteforce(J, probs):
    """F as the expectation over y ~ p of g(y) g(y)^T (the definition of the Fisher; tests only)."""
    P = J.shape[2]
    F = np.zeros((P, P))
    for Jn, pn in zip(J.astype(np.float64), probs.astype(np.float64)):
        for c, pc in enumerate(pn):
            r = pn.copy()
            r[c] -= 1
            g = Jn.T @ r
            F += pc * np.outer(g, g)
    return F
