"""Plumbing shared by the fused Numba kernels: raw pointers, chunk tables, plan cache.

A multi-tensor step is ONE call into one parallel kernel, whatever the number of
tensors. The host passes, per dtype group, int64 arrays of base addresses (one
per tensor and per operand) and a fixed chunk table ``(tensor, start, stop)``;
the kernel ``prange``s over the chunks and turns each address into a typed
pointer with :func:`as_pointer` (an ``inttoptr``, nothing else).

Determinism: chunk boundaries depend only on the tensor sizes (never on the
thread count), every reduction is a per-chunk partial with a fixed lane
structure, and partials are combined in chunk order on one thread. Results are
therefore bitwise identical for any ``numba.set_num_threads``.

Plan cache: the addresses of params and state arrays and the chunk tables are
cached, keyed on the identities of those arrays (the optimizer passes the same
arrays every step; only grads change, and their addresses are read each call).
A cache entry holds only *weak* references to the arrays, whose callbacks drop
the entry as soon as any of them is freed, so a recycled ``id`` can never be
mistaken for a cached array, and the cache never keeps a model's memory alive. The cache holds at most
``_CACHE_MAX`` entries (least recently used evicted).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, cast

import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from fisheropt._memory import DATA_OFFSET

# Elements per chunk of the elementwise passes: 2^16 (256 KiB of float32) keeps
# each chunk's working set in L2 and balances big and small tensors.
CHUNK = 1 << 16

_CACHE_MAX = 32

# Below this many elements a kernel runs on the calling thread only: waking a
# thread team costs more than it saves (and much more on a busy machine).
# Results are the same bits either way (fixed chunks, fixed combination order).
SERIAL_BELOW = 2 * CHUNK

# Numba's "workqueue" threading layer aborts the process when two Python threads
# enter parallel kernels at once, and set_num_threads below is process-wide state.
# One lock around every parallel launch makes concurrent optimizers safe under every
# layer; it costs nothing measurable since each launch already uses every core.
KERNEL_LOCK = threading.RLock()


def launch(kernel, n_elements, *args):
    """Run a parallel kernel under the lock (one thread below SERIAL_BELOW elements).

    numba's OpenMP layer sets OpenMP's thread count to numba's when it starts (in the first
    launch of a process), and where PyTorch's OpenMP runtime is the one numba calls, that
    count is ``torch.get_num_threads()``: it is put back afterwards, whichever launch starts
    the layer, so a step never changes torch's thread count."""
    get_openmp_threads, set_openmp_threads = _openmp_thread_count()
    with KERNEL_LOCK:
        openmp_threads = get_openmp_threads()
        try:
            if n_elements < SERIAL_BELOW:
                threads = numba.get_num_threads()
                if threads != 1:
                    numba.set_num_threads(1)
                    try:
                        return kernel(*args)
                    finally:
                        numba.set_num_threads(threads)
            return kernel(*args)
        finally:
            if get_openmp_threads() != openmp_threads:
                set_openmp_threads(openmp_threads)


@functools.cache
def _openmp_thread_count():
    """(get, set) of the OpenMP thread count that numba's "omp" layer changes; no-ops where
    there is no OpenMP runtime."""
    for library in _openmp_libraries():
        if hasattr(library, "omp_get_max_threads"):
            return library.omp_get_max_threads, library.omp_set_num_threads
    return (lambda: 0), (lambda threads: None)


def _openmp_libraries():
    """Where numba's OpenMP layer finds the OpenMP functions it calls, in the order it looks:
    the process's global scope (PyTorch loads its own libgomp there), then the layer's library
    and the runtime it links."""
    try:
        yield ctypes.CDLL(None)
    except (OSError, TypeError):  # no global scope to search on this platform
        pass
    spec = importlib.util.find_spec("numba.np.ufunc.omppool")
    if spec is not None and spec.origin:
        try:
            yield ctypes.CDLL(spec.origin)
        except OSError:  # its OpenMP runtime is missing: numba cannot run that layer either
            pass


def run_phases(reduce, apply, check: bool) -> bool:
    """Run every read-only reduction launch, then (unless ``check`` and one of them found a
    NaN/Inf, returning False) every update launch: a step that writes nothing or everything."""
    with KERNEL_LOCK:
        finite = [launch(kernel, n, *args) for kernel, n, args in reduce]
        if check and not all(finite):
            return False
        for kernel, n, args in apply:
            launch(kernel, n, *args)
    return True


def run_all(launches) -> None:
    """Run prepared ``(kernel, n_elements, args)`` launches in order, under one lock hold.

    The step functions allocate every argument before calling this, so a step
    fails before its first write or not at all (backends/interface.py)."""
    with KERNEL_LOCK:
        for kernel, n, args in launches:
            launch(kernel, n, *args)


_Args = ParamSpec("_Args")


def _intrinsic(typing: Callable[Concatenate[Any, _Args], object]) -> Callable[_Args, Any]:
    """numba's ``@intrinsic``, with the signature numba gives the function it returns: the typing
    function's without its first argument, the typing context (numba ships no annotations, so a
    checker would see the typing function's own signature at every call)."""
    return cast("Callable[_Args, Any]", intrinsic(typing))


@_intrinsic
def as_pointer(typingctx, address, like):
    """``as_pointer(addr, x)``: the int ``addr`` as a pointer to ``typeof(x)`` elements."""
    if not isinstance(address, types.Integer):
        return None
    ptrty = types.CPointer(like)
    sig = ptrty(address, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return sig, codegen


@_intrinsic
def fma64(typingctx, a, b, c):
    """``fma64(a, b, c)``: a·b + c in float64 with a single rounding (``llvm.fma``).

    For the float64 reductions only, whose order of accumulation the spec leaves
    free: ``acc = fma64(x, x, acc)`` is one vector instruction where ``acc + x*x``
    is two (numba never contracts on its own, which keeps the elementwise
    arithmetic identical to the reference)."""
    if not all(isinstance(x, types.Float) for x in (a, b, c)):
        return None
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


def address(a: np.ndarray) -> int:
    """Base address of a (C-contiguous) NumPy array."""
    return a.__array_interface__["data"][0]


@njit(cache=True)
def _read_data_fields(ids, offset, out):
    # out[i] = ((PyArrayObject *) ids[i])->data
    for i in range(ids.size):
        out[i] = as_pointer(ids[i] + offset, offset)[0]


def _slow_addresses(arrays, idx):
    if idx is None:
        return np.fromiter((a.__array_interface__["data"][0] for a in arrays), np.int64, len(arrays))
    return np.fromiter((arrays[i].__array_interface__["data"][0] for i in idx), np.int64, len(idx))


# Offset of ``data`` in CPython's PyArrayObject, probed and verified once (fisheropt._memory).
_DATA_OFFSET = None if DATA_OFFSET is None else np.int64(DATA_OFFSET)
_ndarray = np.ndarray


def addresses(arrays, idx=None) -> np.ndarray:
    """int64 array of the base addresses of ``arrays`` (or of ``arrays[i] for i in idx``).

    For plain ndarrays on CPython the data pointers are read straight from the
    array objects (one compiled loop over their ids, verified at import), which
    is ~20x cheaper per tensor than ``__array_interface__``; anything else takes
    the portable path."""
    selected = arrays if idx is None else [arrays[i] for i in idx]
    if _DATA_OFFSET is None or not all(type(a) is _ndarray for a in selected):
        return _slow_addresses(arrays, idx)
    ids = np.fromiter(map(id, selected), np.int64, len(selected))
    out = np.empty(len(selected), dtype=np.int64)
    _read_data_fields(ids, _DATA_OFFSET, out)
    return out


def flat_chunks(sizes, chunk: int = CHUNK):
    """Chunk table over tensors of the given sizes.

    Returns (chunk_tensor, start, stop, first): chunk c covers elements [start[c], stop[c])
    of tensor chunk_tensor[c]; tensor t owns chunks first[t] .. first[t+1]-1 (none if empty).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = (sizes + chunk - 1) // chunk
    first = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    n_chunks = int(first[-1])
    chunk_tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    local = np.arange(n_chunks, dtype=np.int64) - first[chunk_tensor]
    start = local * chunk
    stop = np.minimum(start + chunk, sizes[chunk_tensor])
    return chunk_tensor, start, stop, first


def row_chunks(rows, cols, *, target: int = CHUNK, max_blocks=None):
    """Chunk table over the rows of 2-D tensors (rows[t] x cols[t]).

    Each chunk is a range of whole rows of one tensor, about ``target`` elements
    (at least one row). With ``max_blocks`` the number of chunks per tensor is
    capped (bigger row blocks), which bounds the memory of per-chunk column partials.
    Returns (chunk_tensor, row_start, row_stop, first).
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    rows_per_chunk = np.maximum(1, target // np.maximum(cols, 1))
    if max_blocks is not None:
        rows_per_chunk = np.maximum(rows_per_chunk, (rows + max_blocks - 1) // max_blocks)
    rows_per_chunk = np.maximum(rows_per_chunk, 1)
    counts = np.where(rows * cols > 0, (rows + rows_per_chunk - 1) // rows_per_chunk, 0)
    first = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    n_chunks = int(first[-1])
    chunk_tensor = np.repeat(np.arange(rows.size, dtype=np.int64), counts)
    local = np.arange(n_chunks, dtype=np.int64) - first[chunk_tensor]
    start = local * rows_per_chunk[chunk_tensor]
    stop = np.minimum(start + rows_per_chunk[chunk_tensor], rows[chunk_tensor])
    return chunk_tensor, start, stop, first


def dtype_groups(arrays):
    """[(dtype, [indices])] grouping the arrays by dtype, in first-seen order."""
    groups: dict = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.dtype, []).append(i)
    return list(groups.items())


class PlanCache:
    """LRU of plans keyed on the identities of the arrays they were built for.

    Every cached array carries a weak reference whose callback drops the entry
    the moment the array is freed, so an entry found under a key of ids always
    refers to live arrays that are the very objects it was built for (an id can
    only be reused after its object is freed). No strong references are held."""

    def __init__(self, maxsize: int = _CACHE_MAX):
        self._maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.RLock()

    def get(self, tag, lists, build):
        """The plan for ``lists`` (a tuple of lists of arrays), built by ``build(lists)`` if needed."""
        key = (tag,) + tuple(tuple(map(id, lst)) for lst in lists)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[1]
        plan = build(lists)
        drop = self._dropper(key)
        refs = [weakref.ref(a, drop) for a in _chain(lists)]
        with self._lock:
            self._entries[key] = (refs, plan)
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        return plan

    def _dropper(self, key):
        entries_ref = weakref.ref(self._entries)
        lock = self._lock

        def drop(_ref):
            entries = entries_ref()
            if entries is not None:
                with lock:
                    entries.pop(key, None)

        return drop

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


PLANS = PlanCache()  # one cache for every rule module's plans


@njit(cache=True)
def all_finite_at(p, n):
    """No NaN or Inf among the n elements at pointer p (the slow path of the fused checks)."""
    for i in range(n):
        if not np.isfinite(p[i]):
            return False
    return True


def per_tensor_table(idx, row, values: dict, dtype, columns=None) -> np.ndarray:
    """(len(idx), number of scalars) array of ``dtype``: row i is ``row(**values_i)`` for tensor idx[i].

    A value in ``values`` is one for all tensors or a list/tuple with one per tensor
    (backends/interface.py). ``row`` returns the tensor's host scalars, computed in
    float64 by the rule's descriptor; they are rounded to the parameter dtype here,
    once per distinct set of inputs (one in the usual case, a few with param groups).
    With ``columns``, ``row`` returns them by name (backends/_host.py) and the table
    holds the named ones, in that order."""
    if columns is not None:
        row = _named_columns(row, columns)
    varying = [k for k, v in values.items() if isinstance(v, (list, tuple))]
    if not varying:
        return np.tile(np.array(row(**values), dtype=dtype), (len(idx), 1))
    rows = {}
    table = []
    for i in idx:
        key = tuple(values[k][i] for k in varying)
        if key not in rows:
            rows[key] = row(**{**values, **dict(zip(varying, key))})
        table.append(rows[key])
    return np.array(table, dtype=dtype)


def _named_columns(scalars, columns):
    """A ``row`` for :func:`per_tensor_table`: the ``columns`` of the dict ``scalars(**values)``."""

    def row(**values):
        named = scalars(**values)
        return [named[name] for name in columns]

    return row


def _chain(lists):
    for lst in lists:
        yield from lst
