r"""ESimCSE momentum encoder update (Wu et al., 2021, eq. 4; MoCo, He et al. 2020).

Spec: spec/esimcse.md. The queue's embeddings come from a momentum encoder whose
parameters θ_k follow the trained encoder's θ_q by an exponential moving average:

.. math::
    \theta_k \leftarrow \lambda\,\theta_k + (1-\lambda)\,\theta_q, \qquad \lambda = 0.995 .

Arithmetic is elementwise in the parameter dtype: λ and 1 − λ are computed in
float64 on the host and rounded to that dtype, then each element is
``round(round(λ·θ_k) + round((1−λ)·θ_q))`` — two products and a sum, no
fused multiply-add — so every backend can agree bit for bit.

``ema_update`` is a public entry point of every backend; all of them call
:func:`check_ema_args` first, which validates every tensor before anything is written.
"""

from __future__ import annotations

import numpy as np

from fisheropt._checks import check_array_type, check_float_dtype, check_real, check_same_shape_and_dtype, is_cupy_array

MOMENTUM = 0.995


def ema_coefficients(decay: float, dtype):
    """(λ, 1 − λ) as scalars of ``dtype``; 1 − λ is computed in float64 first."""
    t = np.dtype(dtype).type
    return t(decay), t(1.0 - float(decay))


def ema_update_tensor(theta_k, theta_q, *, decay: float = MOMENTUM):
    """One tensor, pure: returns λ·θ_k + (1 − λ)·θ_q as a new array of θ_k's dtype."""
    a, b = ema_coefficients(decay, theta_k.dtype)
    return a * theta_k + b * theta_q


def check_ema_args(targets, sources, decay, *, device=False) -> float:
    """Validate ``ema_update``'s arguments, all of them before any write (every backend calls it).

    ``targets`` and ``sources``: lists or tuples of the same length; ``targets[i]``: a writeable,
    C-contiguous float32/float64 array in native byte order — numpy.ndarray, or cupy.ndarray when
    ``device`` — written in place; ``sources[i]``: an array of the same kind, shape and dtype (any
    strides); ``decay`` in [0, 1]. Flags, shapes and dtypes only: O(number of tensors), never a
    pass over the data. Returns decay as a float."""
    for name, seq in (("targets", targets), ("sources", sources)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of arrays, got {type(seq).__name__}")
    if len(targets) != len(sources):
        raise ValueError(f"got {len(targets)} targets but {len(sources)} sources")
    decay = check_real("decay", decay, low=0.0, high=1.0)
    kind = "cupy" if device else "numpy"
    for i, (k, q) in enumerate(zip(targets, sources)):
        for what, a in ((f"targets[{i}]", k), (f"sources[{i}]", q)):
            check_array_type(a, what)
            if is_cupy_array(a) != device:
                raise TypeError(
                    f"{what} is a {type(a).__module__.split('.')[0]} array; this backend updates {kind}.ndarray arrays"
                )
            check_float_dtype(a.dtype, what)
        if not k.flags.c_contiguous:  # in place: a contiguous copy would not be the caller's array
            raise ValueError(
                f"targets[{i}] is not C-contiguous; ema_update writes it in place and needs "
                "the parameter array itself in C order"
            )
        if not getattr(k.flags, "writeable", True):  # CuPy arrays have no such flag
            raise ValueError(f"targets[{i}] is read-only; ema_update writes it in place")
        check_same_shape_and_dtype(q, k, f"sources[{i}]", f"targets[{i}]")
    return decay


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets`` (θ_k): the backend interface (validated first)."""
    decay = check_ema_args(targets, sources, decay)
    for k, q in zip(targets, sources):
        k[...] = ema_update_tensor(k, q, decay=decay)
