r"""The quality indicator γ of an update direction (Wu et al. 2024, §5) — spec/fisher.md §6.

.. math::
    \gamma(d) = \frac{\sqrt{d^\top F d}}{\lvert d^\top\nabla L\rvert}

is invariant to the scale of d; by Cauchy–Schwarz in the F-inner product it is minimised,
over d with :math:`d^\top\nabla L\ne0`, by the exact natural gradient
:math:`d\propto F^{+}\nabla L`, where :math:`\gamma_{\min} = (\nabla L^\top F^{+}\nabla L)^{-1/2}`.
It is reported relative to SGD, :math:`\gamma(d)/\gamma(\nabla L)`; below 1 beats SGD.
"""

from typing import Any

import numpy as np
import numpy.typing as npt


def _apply(F, d):
    if hasattr(F, "matvec") and not isinstance(F, np.ndarray):
        return np.asarray(F.matvec(d), dtype=np.float64).ravel()
    return np.asarray(F, dtype=np.float64) @ d


def quality_indicator(d: npt.NDArray[Any], F: Any, grad: npt.NDArray[Any]) -> float:
    r"""γ(d) = sqrt(d^T F d) / \|d^T grad\| in float64 (inf when d^T grad = 0)."""
    d = np.asarray(d, dtype=np.float64)
    grad = np.asarray(grad, dtype=np.float64)
    dFd = max(float(d @ _apply(F, d)), 0.0)
    dg = abs(float(d @ grad))
    if dg == 0.0:
        return float("inf")
    return float(np.sqrt(dFd) / dg)


def relative_quality(d: npt.NDArray[Any], F: Any, grad: npt.NDArray[Any]) -> float:
    """γ(d) / γ(grad): the indicator relative to plain gradient descent."""
    return quality_indicator(d, F, grad) / quality_indicator(grad, F, grad)
