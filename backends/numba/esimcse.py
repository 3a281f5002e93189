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
from numba import prange
from numba.typed.typedlist import List  # its home: checkers read numba.typed's lazy __getattr__ as a module

from fisheropt.refimpl.esimcse_momentum import check_ema_args, ema_coefficients

from ._core import run_all

PARALLEL_THRESHOLD = 1 << 19


def _ema_kernel(parallel: bool):
    """The fused update over typed lists of flat targets and sources, k ← a·k + b·q per element:
    the element loop a ``prange`` (``parallel``) or a plain ``range`` (the calling thread only).
    The loop is a closure variable, so the two compiled versions have distinct cache entries."""
    element_range = prange if parallel else range

    def ema_fused(targets, sources, a, b):  # pragma: no cover - compiled
        for t in range(len(targets)):
            k = targets[t]
            q = sources[t]
            for i in element_range(k.shape[0]):
                k[i] = a * k[i] + b * q[i]

    return numba.njit(parallel=parallel, cache=True)(ema_fused)


_ema_fused_parallel = _ema_kernel(parallel=True)
_ema_fused_serial = _ema_kernel(parallel=False)


def ema_update(targets, sources, *, decay):
    """Multi-tensor, in place on ``targets``: the backend interface (see the reference)."""
    decay = check_ema_args(targets, sources, decay)  # everything, before any write
    groups: dict[np.dtype, tuple[list, list]] = {}
    for k, q in zip(targets, sources):
        if k.size == 0:
            continue
        ks, qs = groups.setdefault(k.dtype, ([], []))
        ks.append(k.reshape(-1))  # C-contiguous: a view, written in place
        qs.append(np.ascontiguousarray(q).reshape(-1))
    # Every argument of every dtype's call is built before the first call writes (all or nothing).
    launches = []
    for dtype, (ks, qs) in groups.items():
        n = sum(k.size for k in ks)
        kernel = _ema_fused_parallel if n >= PARALLEL_THRESHOLD else _ema_fused_serial
        launches.append((kernel, n, (List(ks), List(qs), *ema_coefficients(decay, dtype))))
    run_all(launches)
