"""In-process memory-bandwidth ceiling: ``a += s*b`` as a Numba parallel kernel.

Memory-bound kernels are judged against what this machine, in this process, with
these threads, can stream *now*: ``a += s*b`` reads a and b and writes a back
(12 bytes per float32 element, no write-allocate penalty since a was read).
Measure it next to the kernel under test and report the ratio
``achieved GB/s / ceiling GB/s``; absolute GB/s on a shared machine mean little.

Physical placement matters on some machines (VMs especially): the same kernel
can stream 1.5-1.7x faster through one set of buffers than through another of the
same size. :func:`ceiling_on` therefore runs the ceiling over the *same*
arrays the kernel under test uses (``a += 0*b`` over lists of tensors, one
fused call, the same chunking as the optimizer kernels), and
:func:`interleaved_medians` times several callables round-robin so that load
drift hits all of them alike.

Reused by asv_bench/benchmarks/_ceiling.py and fisheropt.bench.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from ._core import addresses, as_pointer, dtype_groups, flat_chunks, launch

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


@njit(parallel=True, cache=True)
def _axpy_multi(a_addr, b_addr, ctens, cstart, cstop, s):
    for c in prange(ctens.size):
        t = ctens[c]
        a = as_pointer(a_addr[t], s)
        b = as_pointer(b_addr[t], s)
        for i in range(cstart[c], cstop[c]):
            a[i] += s * b[i]


def ceiling_on(a_list, b_list, scale: float = 0.0):
    """A callable doing ``a += scale*b`` over aligned lists of C-contiguous arrays in one fused call
    per dtype, and the bytes it moves. With the default scale 0 the arrays keep their values
    (x + 0·y == x for finite y), so it can run on live parameters and gradients."""
    a_list, b_list = list(a_list), list(b_list)
    calls = []
    nbytes = 0
    for dt, idx in dtype_groups(a_list):
        tens, start, stop, _ = flat_chunks([a_list[i].size for i in idx])
        calls.append((addresses(a_list, idx), addresses(b_list, idx), tens, start, stop, dt.type(scale)))
        nbytes += BYTES_PER_ELEMENT * dt.itemsize * sum(a_list[i].size for i in idx)
    keep = (a_list, b_list)  # the addresses are valid while these live

    n = sum(a.size for a in a_list)

    def run():
        for args in calls:
            launch(_axpy_multi, n, *args)
        return keep
    return run, nbytes


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 1, pause: dict | None = None) -> dict:
    """{name: median seconds} for callables timed round-robin (name order), ``repeats`` rounds.

    ``pause`` maps a name to seconds to sleep after each of its calls (not timed), e.g. to let
    another runtime's spinning threads go quiet before the next measurement."""
    pause = pause or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            fn()
            if pause.get(name):
                time.sleep(pause[name])
    times = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if pause.get(name):
                time.sleep(pause[name])
    return {name: float(np.median(v)) for name, v in times.items()}
