"""In-process memory-bandwidth ceiling: ``a += s*b`` as a Numba parallel kernel (benchmarks only).

Memory-bound kernels are judged against what this machine, in this process, with
these threads, can stream *now*: ``a += s*b`` reads a and b and writes a back
(12 bytes per float32 element, no write-allocate penalty since a was read).
Measure it next to the kernel under test and report the ratio
``achieved GB/s / ceiling GB/s``; absolute GB/s on a shared machine mean little.

Physical placement matters on some machines (VMs especially): the same kernel
can stream 1.5-1.7x faster through one set of buffers than through another of the
same size. :func:`ceiling_on` therefore runs the ceiling over the *same*
arrays the kernel under test uses (``a += 0*b`` over lists of tensors, one
fused call, the same chunking and launch as the numba backend's kernels), and
``fisheropt.bench.interleaved_medians`` times it round-robin with them so that
load drift hits all of them alike.

Used by ``fisheropt bench``. Importing it needs numba (ImportError otherwise).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .backends.numba._core import addresses, as_pointer, dtype_groups, flat_chunks, launch
from .bench import median_time

BYTES_PER_ELEMENT = 3  # itemsizes moved per element: read a, read b, write a


@njit(parallel=True, cache=True)
def axpy_inplace(a, b, s):
    """a += s * b, in parallel (the ceiling kernel)."""
    for i in prange(a.size):
        a[i] += s * b[i]


def measure_ceiling_gbs(n: int = 1 << 25, dtype=np.float32, repeats: int = 7, warmup: int = 1) -> float:
    """Achieved GB/s (1e9 bytes/s) of ``a += s*b`` on n elements of ``dtype``: the median over repeats."""
    dtype = np.dtype(dtype)
    a = np.ones(n, dtype=dtype)
    b = np.ones(n, dtype=dtype)
    s = dtype.type(1e-7)
    t = median_time(lambda: axpy_inplace(a, b, s), repeats=repeats, warmup=warmup)
    return BYTES_PER_ELEMENT * dtype.itemsize * n / t / 1e9


@njit(parallel=True, cache=True)
def _axpy_multi(a_addr, b_addr, chunk_tensor, chunk_start, chunk_stop, s):
    for c in prange(chunk_tensor.size):
        t = chunk_tensor[c]
        a = as_pointer(a_addr[t], s)
        b = as_pointer(b_addr[t], s)
        for i in range(chunk_start[c], chunk_stop[c]):
            a[i] += s * b[i]


def ceiling_on(a_list, b_list, scale: float = 0.0):
    """A callable doing ``a += scale*b`` over aligned lists of C-contiguous arrays in one fused call
    per dtype, and the bytes it moves. With the default scale 0 the arrays keep their values
    (x + 0·y == x for finite y), so it can run on live parameters and gradients."""
    a_list, b_list = list(a_list), list(b_list)
    calls = []
    nbytes = 0
    for dt, idx in dtype_groups(a_list):
        chunk_tensor, start, stop, _ = flat_chunks([a_list[i].size for i in idx])
        calls.append((addresses(a_list, idx), addresses(b_list, idx), chunk_tensor, start, stop, dt.type(scale)))
        nbytes += BYTES_PER_ELEMENT * dt.itemsize * sum(a_list[i].size for i in idx)
    keep = (a_list, b_list)  # the addresses are valid while these live

    n = sum(a.size for a in a_list)

    def run():
        for args in calls:
            launch(_axpy_multi, n, *args)
        return keep

    return run, nbytes
