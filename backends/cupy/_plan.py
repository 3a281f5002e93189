"""Host-side planning and launch orchestration for the cupy backend (NumPy only).

Nothing here imports CuPy: the device is reached through a *launcher* object
(``_device.CupyLauncher`` on CuPy arrays; ``_emulate.CpuLauncher`` runs the
very same CUDA source on the CPU for tests). That keeps the logic that decides
what runs where — chunk tables, column tiles, grouping by dtype and by host
scalars, caches, the order of launches — testable on a machine without a GPU.
The rule modules (``adam``, ``fadam``, ...) build their launches with the
:class:`Engine` they are given; their ``<rule>_step`` functions run on
:func:`current`, the CuPy engine unless a test selected another with
:func:`using`.

Per step, per dtype and per set of host scalars (one set unless param groups or
per-parameter step counts differ), the launches are (independent of the tensor
count):

* Adam / AdamW: 1 kernel (28 B/param in float32); Lion: 1 kernel (20 B/param);
* FAdam: 3 passes (44 B/param), each of the first two followed by its per-tensor sums,
  and 2 kernels of per-tensor scalars;
* Coupled Adam: column sums per row tile, their column totals, v̄, update (24 B/param +
  the float64 partial column sums, about 1/rows_per_tile of g);
* all_finite: 1 kernel and one 4-byte device-to-host read (its only sync).

Tables depend only on shapes, so they are built and uploaded once per layout
(cached by dtype, shapes and the group's slot in the step). Pointer tables are
cached by the tuple of data pointers: the params' and states' never change,
and the grads' upload (one small asynchronous host-to-device copy) happens only
when the grads live at new addresses. Neither cache evicts an entry used by the
step being prepared, so a model with many hyperparameter groups does not thrash.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from . import _kernels

_DTYPE_NAMES = {np.dtype("float32"): "float32", np.dtype("float64"): "float64"}


# ---- tables (pure functions of shapes) -------------------------------------------
def chunk_table(sizes, chunk: int = _kernels.CHUNK, cols=None):
    """Split tensors of the given sizes into chunks of at most ``chunk`` elements.

    Returns ``(table, first)``: ``table`` is int64 of shape (n_chunks, CHUNK_ROW) with rows
    (tensor, start, stop, start % cols[tensor]) — the last column is 0 when
    ``cols`` is None — ordered by tensor then start; ``first`` (n_tensors + 1)
    gives each tensor's chunk range ``first[i]:first[i+1]``. Every element of
    every tensor is in exactly one chunk; every chunk but a tensor's last is
    full; chunk starts are multiples of ``chunk`` (so 16-byte alignment of a
    tensor carries over to all its chunks when ``chunk`` is a multiple of 4).
    """
    if chunk <= 0 or chunk % 4:
        raise ValueError("chunk must be a positive multiple of 4")
    sizes = [int(s) for s in sizes]
    counts = [-(-s // chunk) for s in sizes]
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    table = np.zeros((int(first[-1]), _kernels.CHUNK_ROW), dtype=np.int64)
    for i, (size, n) in enumerate(zip(sizes, counts)):
        if n == 0:
            continue
        rows = table[first[i] : first[i + 1]]
        starts = np.arange(n, dtype=np.int64) * chunk
        rows[:, 0] = i
        rows[:, 1] = starts
        rows[:, 2] = np.minimum(starts + chunk, size)
        if cols is not None and cols[i] > 0:
            rows[:, 3] = starts % int(cols[i])
    return table, first


def rows_per_tile(
    rows: int, cols: int, block: int, *, min_rows: int = 32, max_rows: int = 256, target_blocks: int = 4096
) -> int:
    """Rows summed by one block of the column-sum kernel: enough blocks to fill the
    GPU, few enough partial rows that they cost little next to reading g."""
    col_tiles = max(1, -(-cols // block))
    want = -(-max(rows, 1) * col_tiles // target_blocks)
    return int(min(max_rows, max(min_rows, want)))


def coupled_tables(shapes, block: int = _kernels.BLOCK, **tile_kw):
    """Tables of the coupled column reduction for V×d tensors.

    Returns ``(tiles, col_tiles, partial_base, n_row_tiles, n_partial)``: ``tiles`` (TILE_ROW
    columns: tensor, first row, end row, first column, partial offset of this row tile) — one
    block each, a thread per column; ``col_tiles`` (tensor, first column) — one block per
    ``block`` columns for the finalize; per tensor the float64 partial array offset
    ``partial_base`` and the number of row tiles ``n_row_tiles`` (partial[partial_base + k*d + c]
    is the sum over row tile k of column c); ``n_partial`` the total length.
    """
    tiles, col_tiles, partial_base, row_tile_counts = [], [], [], []
    offset = 0
    for i, shape in enumerate(shapes):
        if len(shape) != 2:
            raise ValueError(f"coupled tensor {i} has shape {tuple(shape)}; it must be 2-D (V×d)")
        rows, cols = int(shape[0]), int(shape[1])
        rows_in_tile = rows_per_tile(rows, cols, block, **tile_kw)
        n_row_tiles = -(-rows // rows_in_tile) if cols > 0 else 0
        partial_base.append(offset)
        row_tile_counts.append(n_row_tiles)
        for k in range(n_row_tiles):
            r0, r1 = k * rows_in_tile, min(rows, (k + 1) * rows_in_tile)
            for c0 in range(0, cols, block):
                tiles.append((i, r0, r1, c0, offset + k * cols))
        for c0 in range(0, cols, block):
            col_tiles.append((i, c0))
        offset += n_row_tiles * cols
    tiles = np.array(tiles, dtype=np.int64).reshape(-1, _kernels.TILE_ROW)
    col_tiles = np.array(col_tiles, dtype=np.int64).reshape(-1, _kernels.COL_TILE_ROW)
    return tiles, col_tiles, np.array(partial_base, np.int64), np.array(row_tile_counts, np.int64), offset


def meta_table(shapes, first, partial_base=None, n_row_tiles=None):
    """Per-tensor rows of META_ROW int64: size, first chunk, end chunk, rows, cols, and for coupled tensors
    (``partial_base`` given) partial base, row tiles, first column (of the plan's column totals)."""
    meta = np.zeros((len(shapes), _kernels.META_ROW), dtype=np.int64)
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        meta[i, 0] = size
        meta[i, 1] = first[i]
        meta[i, 2] = first[i + 1]
        if len(shape) == 2:
            meta[i, 3], meta[i, 4] = int(shape[0]), int(shape[1])
    if partial_base is not None and n_row_tiles is not None:
        meta[:, 5] = partial_base
        meta[:, 6] = n_row_tiles
        meta[1:, 7] = np.cumsum(meta[:-1, 4])
    return meta


_CONVERTERS: dict = {}


def _converters(name: str, dtype: str):
    converters = _CONVERTERS.get((name, dtype))
    if converters is None:
        by_c_type = {"T": np.dtype(dtype).type, "double": np.float64, "int": np.int32, "long long": np.int64}
        converters = _CONVERTERS[(name, dtype)] = [
            (arg, by_c_type.get(c_type)) for c_type, arg in _kernels.kernels()[name].signature
        ]
    return converters


def kernel_args(name: str, dtype: str, values: dict) -> list:
    """Arguments of kernel ``name`` in signature order, scalars converted to the exact
    C type (``T`` -> numpy float32/float64 scalar, ``double`` -> float64,
    ``int`` -> int32, ``long long`` -> int64): a Python float passed to a ``float``
    parameter would be sent as a double and read as garbage."""
    converters = _converters(name, dtype)
    if len(values) != len(converters) or any(arg not in values for arg, _ in converters):
        sig = [a for a, _ in converters]
        missing = [a for a in sig if a not in values]
        extra = sorted(set(values) - set(sig))
        raise TypeError(f"kernel {name}: missing {missing}, unexpected {extra}")
    return [values[arg] if c is None else c(values[arg]) for arg, c in converters]


# ---- hyperparameters: one value for all tensors, or one per tensor ------------------
def _key(value):
    # Equal values with different signs of zero give different bits downstream: keep them apart.
    try:
        return value, math.copysign(1.0, value)
    except TypeError:
        return value, None


def check_per_tensor(n: int, values: dict) -> list[str]:
    """The names whose value is a list/tuple (one per tensor); ValueError when one has the
    wrong length (backends/interface.py: before anything runs)."""
    varying = [k for k, v in values.items() if isinstance(v, (list, tuple))]
    for k in varying:
        if len(values[k]) != n:
            raise ValueError(f"{k} has {len(values[k])} values for {n} tensors")
    return varying


def pick(idx, values: dict) -> dict:
    """``values`` for the tensors ``idx`` of a call (per-tensor lists subset, shared values kept)."""
    return {k: ([v[i] for i in idx] if isinstance(v, (list, tuple)) else v) for k, v in values.items()}


def select(idx, *lists):
    """``lists`` restricted to the indices ``idx`` (None: all)."""
    if idx is None:
        return lists
    return tuple([lst[i] for i in idx] for lst in lists)


class Plan:
    """Device tables (and scratch) for one layout: kind, dtype and shapes."""

    def __init__(self, launcher, kind, dtype, shapes, *, chunk, block, tile_kw):
        self.kind, self.dtype, self.shapes = kind, dtype, shapes
        self.n_tensors = len(shapes)
        cols = [int(s[1]) if len(s) == 2 else 0 for s in shapes] if kind == "coupled" else None
        sizes = [int(np.prod(s, dtype=np.int64)) if len(s) else 1 for s in shapes]
        table, first = chunk_table(sizes, chunk, cols)
        self.n_chunks = int(table.shape[0])
        self.host = {"chunks": table, "first": first}
        self.n_partial = self.n_columns = 0
        if kind == "coupled":
            tiles, col_tiles, partial_base, n_row_tiles, n_partial = coupled_tables(shapes, block, **tile_kw)
            meta = meta_table(shapes, first, partial_base, n_row_tiles)
            self.n_tiles, self.n_col_tiles = int(tiles.shape[0]), int(col_tiles.shape[0])
            self.n_partial, self.n_columns = int(n_partial), int(meta[:, 4].sum())
            self.host.update(tiles=tiles, col_tiles=col_tiles, meta=meta)
            self.tiles = launcher.upload(tiles if len(tiles) else np.zeros((1, _kernels.TILE_ROW), np.int64))
            self.col_tiles = launcher.upload(
                col_tiles if len(col_tiles) else np.zeros((1, _kernels.COL_TILE_ROW), np.int64)
            )
        else:
            meta = meta_table(shapes, first)
            self.host["meta"] = meta
        self.chunks = launcher.upload(table if len(table) else np.zeros((1, _kernels.CHUNK_ROW), np.int64))
        self.meta = launcher.upload(meta)
        # what the per-tensor scalars are means of: elements (FAdam's RMS), rows (Coupled Adam's column means)
        self.host["counts"] = meta[:, 3].copy() if kind == "coupled" else meta[:, 0].copy()
        self._counts = None
        self._launcher = launcher
        self._scratch: dict = {}

    @property
    def counts(self):
        """Device int64 per tensor: its element count (coupled: its row count), uploaded on first use."""
        if self._counts is None:
            self._counts = self._launcher.upload(self.host["counts"])
        return self._counts

    @property
    def tables(self) -> dict:
        """The device tables by the kernels' argument names: chunks and meta (and, coupled, the
        row tiles and column tiles)."""
        tables = {"chunks": self.chunks, "meta": self.meta}
        if self.kind == "coupled":
            tables.update(tiles=self.tiles, col_tiles=self.col_tiles)
        return tables

    def scratch(self, name: str, *sizes: int) -> tuple:
        """float64 device buffers of the given lengths (at least 1 each), allocated on first use
        and kept with the plan (the rules' reduction partials and per-tensor scalars)."""
        bufs = self._scratch.get(name)
        if bufs is None:
            bufs = self._scratch[name] = tuple(self._launcher.empty_f64(max(1, int(n))) for n in sizes)
        return bufs


class LaunchGroup:
    """The tensors of a step that share their launches (one dtype, one set of host scalars): their
    indices in the step's lists, their plan, and every kernel argument by name in ``args`` (the
    plan's tables, the pointer tables of their slices, the host scalars; a rule adds its scratch)."""

    def __init__(self, engine, dtype, scalars, plan, pointers, indices):
        self.engine, self.dtype, self.scalars, self.plan, self.indices = engine, dtype, scalars, plan, indices
        self.args = {**plan.tables, **pointers, **scalars}

    def launch(self, name, grid, **given):
        """Kernel ``name`` over ``grid`` blocks, its arguments from ``args`` and ``given``; nothing runs yet."""
        return self.engine.prepared_from(name, self.dtype, grid, {**self.args, **given})


class Engine:
    """Caches and launches over one launcher (CuPy, or the CPU emulator); the rule modules
    build the launches of a step with it."""

    def __init__(
        self, launcher, *, chunk: int = _kernels.CHUNK, tile_kw=None, max_plans: int = 32, max_pointer_tables: int = 64
    ):
        if chunk % 4:
            raise ValueError("chunk must be a multiple of 4")
        self.launcher = launcher
        # the kernels are compiled for the launcher's block size; the column tiles must match it
        self.chunk, self.block = int(chunk), int(launcher.block)
        self.tile_kw = dict(tile_kw or {})
        self._plans: OrderedDict = OrderedDict()
        self._ptrs: OrderedDict = OrderedDict()
        self.max_plans, self.max_pointer_tables = max_plans, max_pointer_tables
        self._generation = 0  # advances after each run: entries used since are never evicted
        self.stats = {"plans_built": 0, "pointer_uploads": 0, "launches": 0}

    def clear_cache(self) -> None:
        self._plans.clear()
        self._ptrs.clear()

    # ---- caches ---------------------------------------------------------------
    def _cached(self, cache: OrderedDict, key, build, limit: int):
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = [build(), self._generation]
            while len(cache) > limit:
                oldest_key, oldest = next(iter(cache.items()))
                if oldest[1] == self._generation:
                    break  # everything left is used by the step being prepared
                del cache[oldest_key]
        else:
            entry[1] = self._generation
            cache.move_to_end(key)
        return entry[0]

    def plan(self, kind: str, dtype: str, arrays, slot: int = 0) -> Plan:
        """The tables of ``arrays`` (one dtype). ``slot``: the group's index in the step, so
        that two groups of one step never share scratch buffers (tables would do)."""
        shapes = tuple([a.shape for a in arrays])  # (cupy and numpy shapes are tuples)

        def build():
            self.stats["plans_built"] += 1
            return Plan(self.launcher, kind, dtype, shapes, chunk=self.chunk, block=self.block, tile_kw=self.tile_kw)

        return self._cached(self._plans, (self.launcher.device_key(), kind, dtype, shapes, slot), build, self.max_plans)

    def pointers(self, arrays):
        """Device uint64 array of the arrays' data pointers (cached by the pointer values)."""
        launcher = self.launcher
        ptrs = launcher.ptrs(arrays)

        def build():
            for i, a in enumerate(arrays):
                if not a.flags.c_contiguous:
                    raise ValueError(
                        f"array {i} (shape {tuple(a.shape)}) is not C-contiguous; "
                        "the cupy backend needs contiguous arrays"
                    )
            self.stats["pointer_uploads"] += 1
            return launcher.upload(np.array(ptrs, dtype=np.uint64))

        return self._cached(self._ptrs, (launcher.device_key(), ptrs), build, self.max_pointer_tables)

    # ---- grouping ----------------------------------------------------------------
    @staticmethod
    def groups(arrays):
        """[(dtype name, indices or None for all)]: one group per dtype, in first-seen order."""
        kinds = {a.dtype for a in arrays}  # (dtype.name is slow; dtype hashing is not)
        for d in kinds:
            if d not in _DTYPE_NAMES:
                raise TypeError(f"the cupy backend supports float32 and float64, got {d}")
        if len(kinds) == 1:
            return [(_DTYPE_NAMES[kinds.pop()], None)]
        out: dict[str, list[int]] = {}
        for i, a in enumerate(arrays):
            out.setdefault(_DTYPE_NAMES[a.dtype], []).append(i)
        return list(out.items())

    def scalar_groups(self, arrays, values: dict, scalars):
        """[(dtype name, host scalars, indices or None for all)]: the launch groups of a step.

        ``values``: the step's ``step`` and hyperparameters, each one value or a list/tuple
        with one per tensor; ``scalars(**values_i)`` gives a tensor's kernel scalars as a
        dict of float64 host values (from the rule's descriptor). Tensors of one dtype with
        bit-identical scalars share a launch: one group per dtype unless param groups or
        per-parameter step counts differ."""
        varying = check_per_tensor(len(arrays), values)
        by_dtype = self.groups(arrays)
        if not varying:
            row = scalars(**values)
            return [(dtype, row, idx) for dtype, idx in by_dtype]
        rows: dict = {}
        out: dict = {}
        for dtype, idx in by_dtype:
            for i in range(len(arrays)) if idx is None else idx:
                key = tuple(_key(values[k][i]) for k in varying)
                entry = rows.get(key)
                if entry is None:
                    row = scalars(**{**values, **{k: values[k][i] for k in varying}})
                    entry = rows[key] = (row, np.array(list(row.values()), dtype=np.float64).tobytes())
                out.setdefault((dtype, entry[1]), (entry[0], []))[1].append(i)
        return [(dtype, row, idx) for (dtype, _), (row, idx) in out.items()]

    def launch_groups(self, kind: str, scalars, values: dict, **arrays):
        """The :class:`LaunchGroup` of each launch group of a step (:meth:`scalar_groups`).

        ``arrays`` maps a kernel's pointer-table argument to the step's list for it
        (``param_ptrs=params, grad_ptrs=grads, ...``); the first list decides the groups and the
        plan of ``kind``, and each group gets the device pointer tables of its slice of every list,
        under the same names. Nothing is yielded for an empty step."""
        names = list(arrays)
        lists = [list(arrays[name]) for name in names]
        if not lists[0]:
            return
        for slot, (dtype, row, idx) in enumerate(self.scalar_groups(lists[0], values, scalars)):
            group = select(idx, *lists)
            plan = self.plan(kind, dtype, group[0], slot)
            pointers = {name: self.pointers(part) for name, part in zip(names, group)}
            yield LaunchGroup(self, dtype, row, plan, pointers, list(range(len(lists[0])) if idx is None else idx))

    def streaming_launches(self, name: str, scalars, values: dict, arrays: dict, **extra) -> list:
        """The launches of the streaming kernel ``name`` (``_kernels.streaming_kernel``) for one
        step, one per launch group (:meth:`launch_groups` of ``arrays`` and ``values``), one
        block per chunk; its arguments are the group's chunk table, pointer tables and host
        scalars, and ``extra``. Nothing runs yet."""
        return [
            group.launch(name, group.plan.n_chunks, **extra)
            for group in self.launch_groups("elem", scalars, values, **arrays)
        ]

    # ---- launches ----------------------------------------------------------------
    @staticmethod
    def prepared(name, dtype, grid, **values):
        """One launch with its arguments converted (which can fail); nothing runs yet."""
        return (dtype, name, int(grid), kernel_args(name, dtype, values))

    @classmethod
    def prepared_from(cls, name, dtype, grid, available: dict):
        """:meth:`prepared` with the kernel's arguments taken by name from ``available`` (the
        group's tables, pointer tables, scratch and host scalars, which may hold more)."""
        signature = _kernels.kernels()[name].signature
        return cls.prepared(name, dtype, grid, **{arg: available[arg] for _, arg in signature if arg in available})

    def run(self, launches) -> None:
        """Enqueue prepared launches in order. A step prepares all of its launches, every
        buffer allocated, before the first one runs, so it fails before writing or not at all."""
        for dtype, name, grid, args in launches:
            if grid > 0:
                self.stats["launches"] += 1
                self.launcher.launch(dtype, name, grid, args)
        self._generation += 1

    def run_checked(self, reads, writes, flag, recheck) -> bool:
        """Run ``reads``, then ``writes``, and return True; with a ``flag`` (set by check launches among
        ``reads``), read it back in between, once: where it is set and ``recheck()`` (a closer look at
        the input) returns False as well, return False instead, ``writes`` not run, nothing written."""
        self.run(reads)
        if flag is not None and self.flag_set(flag) and not recheck():
            return False
        self.run(writes)
        return True

    def upload(self, host):
        """A device copy of the host array ``host`` (asynchronous)."""
        return self.launcher.upload(np.ascontiguousarray(host))

    @staticmethod
    def download(buffer) -> np.ndarray:
        """A float64 device buffer on the host (waits for the launches before it). ``tolist`` is the
        one copy to the host that CuPy arrays (which refuse implicit conversion) and the emulator's
        NumPy arrays both have; the buffers read back are small (per-tensor sums, column sums)."""
        return np.array(buffer.tolist(), dtype=np.float64)

    def new_flag(self):
        """A device int, 0: set to 1 by the check kernels that see a non-finite value."""
        return self.launcher.zeros_i32(1)

    def flag_set(self, flag) -> bool:
        """Read the flag back (the one host synchronisation of a checked step)."""
        return self.launcher.read_i32(flag) != 0


# ---- the engine the step functions run on ----------------------------------------------
_DEFAULT: list = []
_ACTIVE: ContextVar = ContextVar("fisheropt_cupy_engine", default=None)


def set_default(engine: Engine) -> None:
    """Make ``engine`` the one the step functions use (``_device`` installs the CuPy engine)."""
    _DEFAULT[:] = [engine]


def current() -> Engine:
    """The engine of the step functions: the one selected by :func:`using`, else the default."""
    engine = _ACTIVE.get()
    if engine is not None:
        return engine
    if not _DEFAULT:
        raise RuntimeError("no cupy engine: import fisheropt.backends.cupy (or select one with using())")
    return _DEFAULT[0]


@contextmanager
def using(engine: Engine):
    """Run the step functions on ``engine`` inside the block (the tests' emulated engine)."""
    token = _ACTIVE.set(engine)
    try:
        yield engine
    finally:
        _ACTIVE.reset(token)
