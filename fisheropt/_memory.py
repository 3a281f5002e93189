"""Where arrays live: data pointers, and the memory layout an optimizer promises to keep.

The fused kernels write parameters and state in parallel through raw pointers
cached between steps. Two things would make them silently wrong, and both are
checked here before any write:

* **overlap**: two arrays that share bytes (two views of one buffer, a gradient
  that is a view of a parameter, a tied weight listed twice) race in a parallel
  kernel. All arrays the optimizer handles are C-contiguous, so each occupies
  exactly the byte range [pointer, pointer + nbytes) and overlap is an interval
  test: sort by start, compare neighbours. That is exact and costs O(n log n)
  for n arrays, with no per-element work.
* **a changed array**: a parameter reshaped in place (``p.shape = ...``),
  re-strided, made read-only or resized after the optimizer recorded it.
  :class:`Layout` records shape, strides and pointer of every parameter and
  state array once and compares them at each step.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def _probe_data_offset() -> int | None:
    """Offset of ``data`` in CPython's PyArrayObject, verified on probe arrays; None if unusable.

    Reading the pointer straight from the object is ~8x cheaper than
    ``__array_interface__`` (which builds a dict), and a step reads it for
    every parameter, state array and gradient."""
    if sys.implementation.name != "cpython" or getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        return None  # another object header layout: use the portable path
    offset = 2 * np.dtype(np.intp).itemsize  # after ob_refcnt, ob_type
    probes = [np.zeros(5), np.zeros((3, 4), np.float32)[1:], np.zeros(()), np.zeros(0), np.arange(7.0)[::2]]
    try:
        read = [ctypes.c_size_t.from_address(id(a) + offset).value for a in probes]
    except (ValueError, OSError):
        return None
    return offset if read == [a.__array_interface__["data"][0] for a in probes] else None


DATA_OFFSET = _probe_data_offset()
_read_size_t = ctypes.c_size_t.from_address


def data_pointer(a: Any) -> int:
    """Address of the first byte of a NumPy or CuPy array's data."""
    if type(a) is np.ndarray:
        if DATA_OFFSET is not None:
            return _read_size_t(id(a) + DATA_OFFSET).value
        return a.__array_interface__["data"][0]
    return int(a.data.ptr)  # cupy


def data_pointers(arrays: Iterable[Any]) -> list[int]:
    return [data_pointer(a) for a in arrays]


class MemoryOverlap(ValueError):
    """Two arrays given to an optimizer share memory."""


def first_overlap(named_ranges: Iterable[tuple[str, int, int]]) -> tuple[str, str] | None:
    """The first pair of overlapping byte ranges among ``(name, start, nbytes)``, or None.

    Empty arrays occupy no bytes and never overlap."""
    ranges = sorted((start, start + n, name) for name, start, n in named_ranges if n > 0)
    for (_, e0, a), (s1, _, b) in zip(ranges, ranges[1:]):
        if s1 < e0:
            return a, b
    return None


def check_disjoint(named_arrays: Iterable[tuple[str, Any]]) -> None:
    """Refuse arrays that share memory, naming the first pair found."""
    pair = first_overlap((name, data_pointer(a), a.nbytes) for name, a in named_arrays)
    if pair is not None:
        raise MemoryOverlap(
            f"{pair[0]} and {pair[1]} share memory (views of one buffer, or the same array twice); "
            "the optimizer updates in parallel and would race. Pass each parameter once, and "
            "gradients that are separate arrays"
        )


class Layout:
    """The recorded shape, strides, pointer and writeability of an optimizer's own arrays.

    ``named`` is a list of (name, array) for every parameter and state array,
    checked to be pairwise disjoint when recorded. :meth:`verify` raises if any
    of them changed since; :meth:`check_grads` refuses gradients that overlap
    each other or any recorded array. Both are O(n) in the number of arrays
    plus one sort, and read no element."""

    # (start, end, 0, name) of each range: fisheropt.torch.optim sorts them with its gradients' ranges.
    tagged_ranges: list[tuple[int, int, int, str]]

    def __init__(self, named: Sequence[tuple[str, Any]]) -> None:
        self.names = [name for name, _ in named]
        self.arrays = [a for _, a in named]
        check_disjoint(named)
        self._record()

    def _record(self) -> None:
        self.shapes = [(a.shape, a.strides) for a in self.arrays]
        self.pointers = data_pointers(self.arrays)
        self.ranges = sorted(
            (p, p + a.nbytes, name) for name, p, a in zip(self.names, self.pointers, self.arrays) if a.nbytes
        )

    def verify(self) -> None:
        arrays = self.arrays
        if (
            [(a.shape, a.strides) for a in arrays] == self.shapes
            and data_pointers(arrays) == self.pointers
            and all([getattr(a.flags, "writeable", True) for a in arrays])
        ):
            return
        for name, a, (shape, strides), ptr in zip(self.names, arrays, self.shapes, self.pointers):
            if (a.shape, a.strides) != (shape, strides):
                raise ValueError(
                    f"{name} changed shape or strides since the optimizer was built "
                    f"(now {tuple(a.shape)}, was {tuple(shape)}); build a new optimizer"
                )
            if data_pointer(a) != ptr:
                raise ValueError(
                    f"{name} was moved to other memory (resized?) since the optimizer was built; build a new optimizer"
                )
            if not getattr(a.flags, "writeable", True):
                raise ValueError(f"{name} is read-only; the optimizer updates it in place")

    def check_grads(self, grads: Sequence[Any], what: str = "grads") -> None:
        """Gradients must not share memory with each other nor with any recorded array."""
        extra = [
            (p, p + g.nbytes, f"{what}[{i}]") for i, (p, g) in enumerate(zip(data_pointers(grads), grads)) if g.nbytes
        ]
        ranges = sorted(self.ranges + extra)
        for (_, e0, a), (s1, _, b) in zip(ranges, ranges[1:]):
            if s1 < e0:
                a, b = sorted((a, b), key=lambda name: name.startswith(what))  # the gradient second
                raise MemoryOverlap(
                    f"{a} and {b} share memory; a gradient must be its own array, not a view of a "
                    "parameter, of optimizer state or of another gradient (the update runs in parallel and would race)"
                )
