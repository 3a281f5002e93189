"""ESimCSE momentum-encoder update, Numba: θ_k ← λ·θ_k + (1 − λ)·θ_q, fused over tensors.

Same signature and arithmetic as fisheropt.refimpl.esimcse_momentum.ema_update
(spec/esimcse.md): the coefficients are computed in float64 on the host and
rounded to the parameter dtype, then every element is two products and one sum
in that dtype. No fastmath, so LLVM does not contract them into a fused
multiply-add and the result equals the reference bit for bit.

All tensors of one dtype go to a single compiled call (a typed list of flat
views of the targets, which ``check_ema_args`` requires C-contiguous and writeable;
sources of any strides are flattened, copying only when strided). Calls with fewer
than ``PARALLEL_THRESHOLD`` elements in all run the serial kernel: for small
models (a momentum encoder of a few hundred thousand numbers) waking the thread
pool costs more than the update, and on a busy machine far more.
"""
from __future__ import annotations

import numba
import numpy as np
from fisheropt.refimpl.esimcse_momentum import check_ema_args, ema_coefficients
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


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets``: the backend interface (see the reference)."""
    decay = check_ema_args(targets, sources, decay)        # everything, before any write
    groups: dict[np.dtype, tuple[list, list]] = {}
    for k, q in zip(targets, sources):
        if k.size == 0:
            continue
        ks, qs = groups.setdefault(k.dtype, ([], []))
        ks.append(k.reshape(-1))                           # C-contiguous: a view, written in place
        qs.append(np.ascontiguousarray(q).reshape(-1))
    for dtype, (ks, qs) in groups.items():
        a, b = ema_coefficients(decay, dtype)
        kernel = _ema_fused_parallel if sum(k.size for k in ks) >= PARALLEL_THRESHOLD else _ema_fused_serial
        kernel(List(ks), List(qs), a, b)
