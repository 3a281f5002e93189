"""In-process memory-bandwidth ceiling: ``a += s*b`` as a Numba parallel kernel.

Memory-bound kernels are judged against what this machine, in this process, with
these threads, can stream *now*: ``a += s*b`` reads a and b and writes a back
(12 bytes per float32 element, no write-allocate penalty since a was read).
Measure it next to the kernel under test and report the ratio
``achieved GB/s / ceiling GB/s``; absolute GB/s on a shared machine mean little.

Reused by asv_bench/benchmarks/_ceiling.py and fisheropt.bench.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

BYTES_PER_ELEMENT = 3  # itemsizes moved per element: read a, read b, write a


@njit(parallel=True, cache=True)
def axpy_inplace(a, b, s):
    """a += s * b, in parallel (the ceiling kernel)."""
    for i in prange(a.size):
        a[i] += s * b[i]


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_ceiling_gbs(n: int = 1 << 25, dtype=np.float32, repeats: int = 7, warmup: int = 1) -> float:
    """Achieved GB/s (1e9 bytes/s) of ``a += s*b`` on n elements of ``dtype``: the median over repeats."""
    dtype = np.dtype(dtype)
    a = np.ones(n, dtype=dtype)
    b = np.ones(n, dtype=dtype)
    s = dtype.type(1e-7)
    t = median_time(lambda: axpy_inplace(a, b, s), repeats=repeats, warmup=warmup)
    return BYTES_PER_ELEMENT * dtype.itemsize * n / t / 1e9
