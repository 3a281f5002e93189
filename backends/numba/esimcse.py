"""ESimCSE momentum-encoder update, Numba: θ_k ← λ·θ_k + (1 − λ)·θ_q, fused over tensors.

Same signature and arithmetic as fisheropt.refimpl.esimcse_momentum.ema_update
(spec/esimcse.md): the coefficients are computed in float64 on the host and
rounded to the parameter dtype, then every element is two products and one sum
in that dtype. No fastmath, so LLVM does not contract them into a fused
multiply-add and the result equals the reference bit for bit.

All tensors of one dtype go to a single compiled call (a typed list of flat
views); ``sources`` must have the targets' shapes and dtypes. Calls with fewer
than ``PARALLEL_THRESHOLD`` elements in all run the serial kernel: for small
models (a momentum encoder of a few hundred thousand numbers) waking the thread
pool costs more than the update, and on a busy machine far more.
"""
from __future__ import annotations

import numba
import numpy as np
from fisheropt.refimpl.esimcse_momentum import ema_coefficients
from numba import prange
from numba.typed import List

PARALLEL_THRESHOLD = 1 << 19


@numba.njit(parallel=True, cache=True)
def _ema_fused_parallel(targets, sources, a, b):  # pragma: no cover - compiled
    for t in range(len(targets)):
        k = targets[t]
        q = sources[t]
        for i in prange(k.shape[0]):
            k[i] = a * k[i] + b * q[i]


@numba.njit(cache=True)
def _ema_fused_serial(targets, sources, a, b):  # pragma: no cover - compiled
    for t in range(len(targets)):
        k = targets[t]
        q = sources[t]
        for i in range(k.shape[0]):
            k[i] = a * k[i] + b * q[i]


def _flat_view(k):
    """A 1-D view sharing k's memory, or None when k is not C-contiguous."""
    if k.flags.c_contiguous:
        return k.reshape(-1)
    return None


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets``: the backend interface (see the reference)."""
    groups: dict[np.dtype, tuple[list, list]] = {}
    copy_back = []
    for k, q in zip(targets, sources):
        if k.size == 0:
            continue
        flat = _flat_view(k)
        if flat is None:  # strided target: update a contiguous copy, then write it back
            flat = np.ascontiguousarray(k).reshape(-1)
            copy_back.append((k, flat))
        src = np.ascontiguousarray(q).reshape(-1)
        ks, qs = groups.setdefault(k.dtype, ([], []))
        ks.append(flat)
        qs.append(src)
    for dtype, (ks, qs) in groups.items():
        a, b = ema_coefficients(decay, dtype)
        kernel = _ema_fused_parallel if sum(k.size for k in ks) >= PARALLEL_THRESHOLD else _ema_fused_serial
        kernel(List(ks), List(qs), a, b)
    for k, flat in copy_back:
        k[...] = flat.reshape(k.shape)
