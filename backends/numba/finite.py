"""all_finite on the CPU: the optimizers' pre-step check, one parallel pass over the gradients."""

from functools import lru_cache

import numpy as np
from numba import njit, prange

from ._core import addresses, as_pointer, flat_chunks, launch

__all__ = ["all_finite"]


@njit(parallel=True, cache=True)
def _finite_kernel(addrs, chunk_tensor, chunk_start, chunk_stop, mask, limit):
    # Integer view of the floats: |x| bits >= the exponent-all-ones pattern <=> NaN or Inf.
    # An integer max reduction vectorizes exactly (no float reassociation involved).
    n_chunks = chunk_tensor.size
    bad = np.zeros(n_chunks, np.uint8)
    for c in prange(n_chunks):
        p = as_pointer(addrs[chunk_tensor[c]], mask)
        largest = mask - mask
        for i in range(chunk_start[c], chunk_stop[c]):
            largest = max(largest, p[i] & mask)
        if largest >= limit:
            bad[c] = 1
    for c in range(n_chunks):
        if bad[c] != 0:
            return False
    return True


# (mask, limit) as *signed* integers: |x|'s bit pattern is non-negative, and a signed max
# maps to one vector instruction (vpmaxsd) where an unsigned one may not.
_FINITE_BITS = {
    np.dtype(np.float32): (np.int32(0x7FFFFFFF), np.int32(0x7F800000)),
    np.dtype(np.float64): (np.int64(0x7FFFFFFFFFFFFFFF), np.int64(0x7FF0000000000000)),
}


@lru_cache(maxsize=64)
def _finite_plan(signature):
    """signature: tuple of (dtype, size) per array -> [(dtype, idx, ctens, cstart, cstop)]."""
    groups: dict = {}
    for i, (dt, _size) in enumerate(signature):
        groups.setdefault(dt, []).append(i)
    plan = []
    for dt, idx in groups.items():
        chunk_tensor, start, stop, _ = flat_chunks([signature[i][1] for i in idx])
        plan.append((dt, idx, chunk_tensor, start, stop, sum(signature[i][1] for i in idx)))
    return plan


def all_finite(arrays) -> bool:
    """True when every element of every array is finite (no NaN, no ±Inf)."""
    arrays = list(arrays)
    if not arrays:
        return True
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype not in _FINITE_BITS or not a.flags.c_contiguous:
            # Not a layout the fused kernel reads: fall back to NumPy (never wrong).
            return all(bool(np.isfinite(x).all()) for x in arrays)
    plan = _finite_plan(tuple((a.dtype, a.size) for a in arrays))
    for dt, idx, chunk_tensor, start, stop, n in plan:
        mask, limit = _FINITE_BITS[dt]
        if not launch(_finite_kernel, n, addresses(arrays, idx), chunk_tensor, start, stop, mask, limit):
            return False
    return True


def clear_cache() -> None:
    _finite_plan.cache_clear()
