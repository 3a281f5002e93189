"""The in-process memory-bandwidth ceiling: the fixed instrument of the tracked ratios.

``a += s*b`` as a Numba parallel kernel (reads a and b, writes a: 3 itemsizes per
element). Measure it in the same process, over the same buffers, timed round-robin
with the kernel under test, and report ``achieved GB/s / ceiling GB/s`` (or its
inverse, step time / ceiling time): on a shared machine only such ratios mean
anything. Reusable from any benchmark::

    from ._ceiling import measure_ceiling_gbs, ratio_to_ceiling
    ceiling = measure_ceiling_gbs(n)                       # GB/s (1e9 bytes/s), fresh arrays
    ratio = ratio_to_ceiling(bytes_moved, seconds, n)      # same, as a fraction

On a VM the physical placement of buffers can change streaming speed by 1.5x;
the robust way is the ceiling over *your* buffers, timed round-robin with your
kernel::

    from ._ceiling import ceiling_on, interleaved_times, paired_ratio
    ceil_fn, ceil_bytes = ceiling_on(a_list, b_list)       # a += 0*b, one fused call
    t = interleaved_times({"ceiling": ceil_fn, "mine": my_kernel}, repeats=7)
    ratio = paired_ratio(t["ceiling"], t["mine"]) * my_bytes / ceil_bytes   # GB/s / ceiling GB/s

The kernel is defined *here*, not imported from fisheropt: asv runs this file against
every commit of the history, and a ratio is only comparable across commits when the
ruler stays the same (fisheropt's own copy, ``fisheropt.backends.numba._ceiling``, has
changed with the package and does not exist in the oldest commits). Without numba
these functions raise NotImplementedError, which asv reports as a skipped benchmark.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = [
    "measure_ceiling_gbs",
    "ratio_to_ceiling",
    "ceiling_on",
    "interleaved_times",
    "interleaved_medians",
    "paired_ratio",
    "median_time",
    "BYTES_PER_ELEMENT",
    "CHUNK",
]

BYTES_PER_ELEMENT = 3  # itemsizes moved per element by a += s*b
CHUNK = 1 << 16  # elements per parallel work item (one tensor's slice)

_KERNELS = {}


def _kernels():
    """(axpy over one array, axpy over chunks of many arrays given by address), compiled on first use."""
    if not _KERNELS:
        try:
            from numba import njit, prange, types
            from numba.extending import intrinsic
        except ImportError as exc:  # numba missing: the ceiling cannot be measured here
            raise NotImplementedError(f"the bandwidth ceiling needs numba: {exc}") from exc

        @intrinsic
        def as_pointer(typingctx, address, like):
            """The int ``address`` as a pointer to ``typeof(like)`` elements (an inttoptr)."""
            if not isinstance(address, types.Integer):
                return None
            ptrty = types.CPointer(like)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(ptrty))

            return ptrty(address, like), codegen

        @njit(parallel=True, cache=True)
        def axpy(a, b, s):
            for i in prange(a.size):
                a[i] += s * b[i]

        @njit(parallel=True, cache=True)
        def axpy_chunks(a_addr, b_addr, ctens, cstart, cstop, s):
            for c in prange(ctens.size):
                t = ctens[c]
                a = as_pointer(a_addr[t], s)
                b = as_pointer(b_addr[t], s)
                for i in range(cstart[c], cstop[c]):
                    a[i] += s * b[i]

        _KERNELS.update(axpy=axpy, axpy_chunks=axpy_chunks)
    return _KERNELS["axpy"], _KERNELS["axpy_chunks"]


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_ceiling_gbs(n: int = 1 << 25, dtype=np.float32, repeats: int = 7, warmup: int = 1) -> float:
    """GB/s of ``a += s*b`` on ``n`` elements of ``dtype`` (median over ``repeats``), fresh arrays."""
    axpy, _ = _kernels()
    dtype = np.dtype(dtype)
    a = np.ones(n, dtype=dtype)
    b = np.ones(n, dtype=dtype)
    s = dtype.type(1e-7)
    t = median_time(lambda: axpy(a, b, s), repeats=repeats, warmup=warmup)
    return BYTES_PER_ELEMENT * dtype.itemsize * n / t / 1e9


def ratio_to_ceiling(bytes_moved: float, seconds: float, n: int, dtype=np.float32, repeats: int = 7) -> float:
    """(bytes_moved / seconds) as a fraction of the ceiling measured now on ``n`` elements."""
    return (bytes_moved / seconds / 1e9) / measure_ceiling_gbs(n, dtype=dtype, repeats=repeats)


def ceiling_on(a_list, b_list, scale: float = 0.0):
    """(callable doing ``a += scale*b`` over aligned lists of C-contiguous arrays, bytes it moves).

    One fused parallel call per dtype over chunks of every tensor (so 147 small tensors cost
    one launch, like the optimizer's multi-tensor kernels). With the default scale 0 the arrays
    keep their values (x + 0·y == x for finite y), so it can run on live parameters, gradients
    and optimizer state."""
    _, axpy_chunks = _kernels()
    a_list, b_list = list(a_list), list(b_list)
    if len(a_list) != len(b_list):
        raise ValueError("a_list and b_list must have the same length")
    groups = {}
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.shape != b.shape or a.dtype != b.dtype or not (a.flags.c_contiguous and b.flags.c_contiguous):
            raise ValueError(f"pair {i}: a and b must be C-contiguous with the same shape and dtype")
        groups.setdefault(a.dtype, []).append(i)
    calls, nbytes = [], 0
    for dt, idx in groups.items():
        tens, start, stop = [], [], []
        for k, i in enumerate(idx):
            size = a_list[i].size
            for s0 in range(0, size, CHUNK):
                tens.append(k)
                start.append(s0)
                stop.append(min(size, s0 + CHUNK))
        a_addr = np.array([a_list[i].__array_interface__["data"][0] for i in idx], np.int64)
        b_addr = np.array([b_list[i].__array_interface__["data"][0] for i in idx], np.int64)
        calls.append(
            (
                a_addr,
                b_addr,
                np.asarray(tens, np.int64),
                np.asarray(start, np.int64),
                np.asarray(stop, np.int64),
                dt.type(scale),
            )
        )
        nbytes += BYTES_PER_ELEMENT * dt.itemsize * sum(a_list[i].size for i in idx)
    keep = (a_list, b_list)  # the addresses are valid while these live

    def run():
        for args in calls:
            axpy_chunks(*args)
        return keep

    return run, nbytes


def interleaved_times(fns: dict, repeats: int = 7, warmup: int = 1, pause=None) -> dict:
    """{name: [seconds of round 1, round 2, ...]}, the callables timed round-robin (name order).

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
    return times


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 1, pause=None) -> dict:
    """{name: median seconds}, the callables timed round-robin (see :func:`interleaved_times`)."""
    return {name: float(np.median(v)) for name, v in interleaved_times(fns, repeats, warmup, pause).items()}


def paired_ratio(numerator, denominator) -> float:
    """Median over rounds of numerator[i] / denominator[i] (times of one round-robin round).

    Load on a shared machine comes and goes over seconds; two calls of the same round see
    nearly the same machine, so the per-round ratio cancels most of it, where a ratio of
    medians taken over different rounds would not."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))
