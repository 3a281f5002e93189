r"""Diagonal Fisher estimators — spec/fisher.md §5 (the link to Adam / FAdam).

All return a (P,) vector in the input dtype, accumulated in float64:

* diag EF  = :math:`\sum_n g_n\odot g_n`;
* diag SF  = :math:`\frac1K\sum_{k,n}\hat g_{kn}\odot\hat g_{kn}`;
* diag F   = :math:`\operatorname{diag}\sum_n J_n^\top H_n J_n = \sum_{n,c} (B_nJ_n)_{c}^{\odot2}`;
* diag iEF = :math:`\sum_n g_n\odot g_n / s_n`.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

from .fisher_exact import fisher_factor
from .fisher_improved import scaled_rows
from .fisher_sampled import sampled_grads


def diag_empirical(G: npt.NDArray[Any]):
    G64 = G.astype(np.float64)
    return np.einsum("np,np->p", G64, G64).astype(G.dtype)


def diag_sampled(J: npt.NDArray[Any], probs: npt.NDArray[Any], labels_sampled: npt.NDArray[Any]):
    Gh = sampled_grads(J, probs, labels_sampled).astype(np.float64)
    return np.einsum("np,np->p", Gh, Gh).astype(J.dtype)


def diag_exact(J: npt.NDArray[Any], probs: npt.NDArray[Any]):
    A = fisher_factor(J, probs)
    return np.einsum("np,np->p", A, A).astype(J.dtype)


def diag_improved(G: npt.NDArray[Any], s: npt.NDArray[Any]):
    Gt = scaled_rows(G, s)  # g_n/√s_n: no overflow of g_n/s_n for a subnormal s_n
    return np.einsum("np,np->p", Gt, Gt).astype(G.dtype)
