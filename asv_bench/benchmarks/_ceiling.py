"""The in-process memory-bandwidth ceiling, for judging memory-bound kernels.

``a += s*b`` as a Numba parallel kernel (reads a and b, writes a: 12 bytes per
float32 element). Measure it in the same process, on the same element count,
right next to the kernel under test, and report ``achieved GB/s / ceiling GB/s``:
on a shared machine only such ratios mean anything. Reusable from any benchmark::

    from ._ceiling import measure_ceiling_gbs, ratio_to_ceiling
    ceiling = measure_ceiling_gbs(n)                       # GB/s (1e9 bytes/s), fresh arrays
    ratio = ratio_to_ceiling(bytes_moved, seconds, n)      # same, as a fraction

On a VM the physical placement of buffers can change streaming speed by 1.5x;
the robust way is the ceiling over *your* buffers, timed round-robin with your
kernel::

    from ._ceiling import ceiling_on, interleaved_medians
    ceil_fn, ceil_bytes = ceiling_on(a_list, b_list)       # a += 0*b, one fused call
    t = interleaved_medians({"ceiling": ceil_fn, "mine": my_kernel}, repeats=7)
    ratio = (my_bytes / t["mine"]) / (ceil_bytes / t["ceiling"])

The kernel lives in the installed package (``fisheropt.backends.numba._ceiling``,
also used by ``fisheropt bench``); without numba these raise NotImplementedError,
which asv reports as a skipped benchmark.
"""
from __future__ import annotations

import numpy as np

__all__ = ["measure_ceiling_gbs", "ratio_to_ceiling", "ceiling_on", "interleaved_medians", "median_time",
           "BYTES_PER_ELEMENT"]

BYTES_PER_ELEMENT = 3  # itemsizes moved per element by a += s*b


def _impl():
    try:
        from fisheropt.backends.numba import _ceiling
    except ImportError as exc:  # numba missing: the ceiling cannot be measured here
        raise NotImplementedError(f"the bandwidth ceiling needs numba: {exc}") from exc
    return _ceiling


def measure_ceiling_gbs(n: int = 1 << 25, dtype=np.float32, repeats: int = 7, warmup: int = 1) -> float:
    """GB/s of ``a += s*b`` on ``n`` elements of ``dtype`` (median over ``repeats``)."""
    return _impl().measure_ceiling_gbs(n, dtype=dtype, repeats=repeats, warmup=warmup)


def ratio_to_ceiling(bytes_moved: float, seconds: float, n: int, dtype=np.float32, repeats: int = 7) -> float:
    """(bytes_moved / seconds) as a fraction of the ceiling measured now on ``n`` elements."""
    return (bytes_moved / seconds / 1e9) / measure_ceiling_gbs(n, dtype=dtype, repeats=repeats)


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    return _impl().median_time(fn, repeats=repeats, warmup=warmup)


def ceiling_on(a_list, b_list, scale: float = 0.0):
    """(callable doing a += scale*b over the lists in one fused call, bytes it moves)."""
    return _impl().ceiling_on(a_list, b_list, scale)


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 1, pause=None) -> dict:
    """{name: median seconds}, the callables timed round-robin."""
    return _impl().interleaved_medians(fns, repeats=repeats, warmup=warmup, pause=pause)
