"""Host-side planning and launch orchestration for the cupy backend (NumPy only).

Nothing here imports CuPy: the device is reached through a *launcher* object
(``fisheropt.backends.cupy.optim`` has the CuPy one; ``_emulate`` runs the very
same CUDA source on the CPU for tests). That keeps the logic that decides
what runs where — chunk tables, column tiles, per-dtype grouping, caches,
scalar coefficients, the order of launches — testable on a machine without a
GPU.

Per step and dtype group the launches are (independent of the tensor count):

* Adam / AdamW: 1 kernel (28 B/param in float32);
* FAdam: 3 passes + 2 one-block-per-tensor finalizers (44 B/param);
* Coupled Adam: column sums, column finalize, update (24 B/param + the
  float64 partial column sums, about 1/rows_per_tile of g);
* all_finite: 1 kernel and one 4-byte device-to-host read (its only sync).

Tables depend only on shapes, so they are built and uploaded once per layout
(cached by dtype and shapes). Pointer tables are cached by the tuple of data
pointers: the params' and states' never change, and the grads' upload (one
small asynchronous host-to-device copy) happens only when the grads live at
new addresses.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from fisheropt.refimpl.fadam import debiased_beta2

from . import _kernels as K

_DTYPE_NAMES = {np.dtype("float32"): "float32", np.dtype("float64"): "float64"}


# ---- tables (pure functions of shapes) -------------------------------------------
def chunk_table(sizes, chunk: int = K.CHUNK, cols=None):
    """Split tensors of the given sizes into chunks of at most ``chunk`` elements.

    Returns ``(table, first)``: ``table`` is int64 of shape (n_chunks, CW) with rows
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
    table = np.zeros((int(first[-1]), K.CW), dtype=np.int64)
    for i, (size, n) in enumerate(zip(sizes, counts)):
        if n == 0:
            continue
        rows = table[first[i]:first[i + 1]]
        starts = np.arange(n, dtype=np.int64) * chunk
        rows[:, 0] = i
        rows[:, 1] = starts
        rows[:, 2] = np.minimum(starts + chunk, size)
        if cols is not None and cols[i] > 0:
            rows[:, 3] = starts % int(cols[i])
    return table, first


def rows_per_tile(rows: int, cols: int, block: int, *, min_rows: int = 32, max_rows: int = 256,
                  target_blocks: int = 4096) -> int:
    """Rows summed by one block of the column-sum kernel: enough blocks to fill the
    GPU, few enough partial rows that they cost little next to reading g."""
    col_tiles = max(1, -(-cols // block))
    want = -(-max(rows, 1) * col_tiles // target_blocks)
    return int(min(max_rows, max(min_rows, want)))


def coupled_tables(shapes, block: int = K.BLOCK, **tile_kw):
    """Tables of the coupled column reduction for V×d tensors.

    Returns ``(tiles, ctiles, pbase, nrc, n_partial)``: ``tiles`` (TW columns:
    tensor, r0, r1, c0, partial offset of this row tile) — one block each, a
    thread per column; ``ctiles`` (tensor, c0) — one block per ``block``
    columns for the finalize; per tensor the float64 partial array offset
    ``pbase`` and the number of row tiles ``nrc`` (partial[pbase + k*d + c]
    is the sum over row tile k of column c); ``n_partial`` the total length.
    """
    tiles, ctiles, pbase, nrc = [], [], [], []
    offset = 0
    for i, shape in enumerate(shapes):
        if len(shape) != 2:
            raise ValueError(f"coupled tensor {i} has shape {tuple(shape)}; it must be 2-D (V×d)")
        rows, cols = int(shape[0]), int(shape[1])
        rpt = rows_per_tile(rows, cols, block, **tile_kw)
        n_row_tiles = -(-rows // rpt) if cols > 0 else 0
        pbase.append(offset)
        nrc.append(n_row_tiles)
        for k in range(n_row_tiles):
            r0, r1 = k * rpt, min(rows, (k + 1) * rpt)
            for c0 in range(0, cols, block):
                tiles.append((i, r0, r1, c0, offset + k * cols))
        for c0 in range(0, cols, block):
            ctiles.append((i, c0))
        offset += n_row_tiles * cols
    tiles = np.array(tiles, dtype=np.int64).reshape(-1, K.TW)
    ctiles = np.array(ctiles, dtype=np.int64).reshape(-1, K.CTW)
    return tiles, ctiles, np.array(pbase, np.int64), np.array(nrc, np.int64), offset


def meta_table(shapes, first, pbase=None, nrc=None):
    """Per-tensor rows of MW int64: size, first chunk, end chunk, rows, cols, partial base, row tiles, 0."""
    meta = np.zeros((len(shapes), K.MW), dtype=np.int64)
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        meta[i, 0] = size
        meta[i, 1] = first[i]
        meta[i, 2] = first[i + 1]
        if len(shape) == 2:
            meta[i, 3], meta[i, 4] = int(shape[0]), int(shape[1])
    if pbase is not None:
        meta[:, 5] = pbase
        meta[:, 6] = nrc
    return meta


_CONVERTERS: dict = {}


def _converters(name: str, dtype: str):
    conv = _CONVERTERS.get((name, dtype))
    if conv is None:
        t = np.dtype(dtype).type
        table = {"T": t, "double": np.float64, "int": np.int32}
        conv = _CONVERTERS[(name, dtype)] = [(arg, table.get(ctype)) for ctype, arg in K.SIGNATURES[name]]
    return conv


def kernel_args(name: str, dtype: str, values: dict) -> list:
    """Arguments of kernel ``name`` in signature order, scalars converted to the exact
    C type (``T`` -> numpy float32/float64 scalar, ``double`` -> float64,
    ``int`` -> int32): a Python float passed to a ``float`` parameter would be
    sent as a double and read as garbage."""
    conv = _converters(name, dtype)
    if len(values) != len(conv) or any(arg not in values for arg, _ in conv):
        sig = [a for a, _ in conv]
        missing = [a for a in sig if a not in values]
        extra = sorted(set(values) - set(sig))
        raise TypeError(f"kernel {name}: missing {missing}, unexpected {extra}")
    return [values[arg] if c is None else c(values[arg]) for arg, c in conv]


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
        if kind == "coupled":
            tiles, ctiles, pbase, nrc, n_partial = coupled_tables(shapes, block, **tile_kw)
            meta = meta_table(shapes, first, pbase, nrc)
            self.n_tiles, self.n_ctiles = int(tiles.shape[0]), int(ctiles.shape[0])
            self.host.update(tiles=tiles, ctiles=ctiles, meta=meta)
            self.tiles = launcher.upload(tiles if len(tiles) else np.zeros((1, K.TW), np.int64))
            self.ctiles = launcher.upload(ctiles if len(ctiles) else np.zeros((1, K.CTW), np.int64))
            self.partial = launcher.empty_f64(max(1, n_partial))
        else:
            meta = meta_table(shapes, first)
            self.host["meta"] = meta
            self.partial = None   # FAdam scratch, allocated on first use
        self.chunks = launcher.upload(table if len(table) else np.zeros((1, K.CW), np.int64))
        self.meta = launcher.upload(meta)
        self._launcher = launcher
        self._fadam_scratch = None

    def fadam_scratch(self):
        """(partial per chunk, 2 partials per chunk, 3 scalars per tensor), float64."""
        if self._fadam_scratch is None:
            L = self._launcher
            self._fadam_scratch = (L.empty_f64(max(1, self.n_chunks)), L.empty_f64(max(1, 2 * self.n_chunks)),
                                   L.empty_f64(max(1, 3 * self.n_tensors)))
        return self._fadam_scratch


class Engine:
    """The backend's step functions over one launcher (CuPy, or the CPU emulator)."""

    def __init__(self, launcher, *, chunk: int = K.CHUNK, tile_kw=None,
                 max_plans: int = 32, max_pointer_tables: int = 64):
        if chunk % 4:
            raise ValueError("chunk must be a multiple of 4")
        self.L = launcher
        # the kernels are compiled for the launcher's block size; the column tiles must match it
        self.chunk, self.block = int(chunk), int(launcher.block)
        self.tile_kw = dict(tile_kw or {})
        self._plans: OrderedDict = OrderedDict()
        self._ptrs: OrderedDict = OrderedDict()
        self.max_plans, self.max_pointer_tables = max_plans, max_pointer_tables
        self.stats = {"plans_built": 0, "pointer_uploads": 0, "launches": 0}

    def clear_cache(self) -> None:
        self._plans.clear()
        self._ptrs.clear()

    # ---- caches ---------------------------------------------------------------
    def plan(self, kind: str, dtype: str, arrays) -> Plan:
        shapes = tuple([a.shape for a in arrays])  # (cupy and numpy shapes are tuples)
        key = (self.L.device_key(), kind, dtype, shapes)
        plan = self._plans.get(key)
        if plan is None:
            plan = Plan(self.L, kind, dtype, shapes, chunk=self.chunk, block=self.block, tile_kw=self.tile_kw)
            self.stats["plans_built"] += 1
            self._plans[key] = plan
            if len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def pointers(self, arrays):
        """Device uint64 array of the arrays' data pointers (cached by the pointer values)."""
        L = self.L
        ptrs = L.ptrs(arrays)
        key = (L.device_key(), ptrs)
        table = self._ptrs.get(key)
        if table is None:
            for i, a in enumerate(arrays):
                if not a.flags.c_contiguous:
                    raise ValueError(f"array {i} (shape {tuple(a.shape)}) is not C-contiguous; "
                                     "the cupy backend needs contiguous arrays")
            table = L.upload(np.array(ptrs, dtype=np.uint64))
            self.stats["pointer_uploads"] += 1
            self._ptrs[key] = table
            if len(self._ptrs) > self.max_pointer_tables:
                self._ptrs.popitem(last=False)
        else:
            self._ptrs.move_to_end(key)
        return table

    @staticmethod
    def groups(arrays):
        """[(dtype name, indices or None for all)]: one group per dtype, in first-seen order."""
        kinds = {a.dtype for a in arrays}   # (dtype.name is slow; dtype hashing is not)
        for d in kinds:
            if d not in _DTYPE_NAMES:
                raise TypeError(f"the cupy backend supports float32 and float64, got {d}")
        if len(kinds) == 1:
            return [(_DTYPE_NAMES[kinds.pop()], None)]
        out: dict[str, list[int]] = {}
        for i, a in enumerate(arrays):
            out.setdefault(_DTYPE_NAMES[a.dtype], []).append(i)
        return list(out.items())

    @staticmethod
    def prepared(name, dtype, grid, **values):
        """One launch with its arguments converted (which can fail); nothing runs yet."""
        return (dtype, name, int(grid), kernel_args(name, dtype, values))

    def run(self, launches) -> None:
        """Enqueue prepared launches in order. A step prepares all of its launches, every
        buffer allocated, before the first one runs, so it fails before writing or not at all."""
        for dtype, name, grid, args in launches:
            if grid > 0:
                self.stats["launches"] += 1
                self.L.launch(dtype, name, grid, args)

    def launch(self, name, dtype, grid, **values):
        self.run([self.prepared(name, dtype, grid, **values)])

    # ---- the interface ----------------------------------------------------------
    def all_finite(self, arrays) -> bool:
        arrays = list(arrays)
        if not arrays:
            return True
        flag = None
        for dtype, idx in self.groups(arrays):
            sub = arrays if idx is None else [arrays[i] for i in idx]
            plan = self.plan("elem", dtype, sub)
            if plan.n_chunks == 0:
                continue
            if flag is None:
                flag = self.L.zeros_i32(1)
            self.launch("all_finite", dtype, plan.n_chunks, chunks=plan.chunks, G=self.pointers(sub), flag=flag)
        return True if flag is None else self.L.read_i32(flag) == 0

    def adam(self, params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, decoupled):
        self.run(self.adam_launches(params, grads, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                    eps=eps, weight_decay=weight_decay, decoupled=decoupled))

    def fadam(self, params, grads, m, f, **hyperparams):
        self.run(self.fadam_launches(params, grads, m, f, **hyperparams))

    def coupled(self, params, grads, m, v, *, coupled, **hyperparams):
        """Coupled tensors (v of shape (d,)) and, where ``coupled[i]`` is False, AdamW ones."""
        yes = [i for i, c in enumerate(coupled) if c]
        no = [i for i, c in enumerate(coupled) if not c]
        self.run(self.adam_launches(*_select(no, params, grads, m, v), decoupled=True, **hyperparams)
                 + self.coupled_launches(*_select(yes, params, grads, m, v), **hyperparams))

    def adam_launches(self, params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, decoupled):
        params = list(params)
        if not params:
            return []
        step_size = lr / (1 - beta1**step)          # host scalars, float64 (refimpl.adam.adam_direction)
        bc2s = math.sqrt(1 - beta2**step)
        mode = 2 if decoupled else (1 if weight_decay != 0 else 0)
        grads, m, v = list(grads), list(m), list(v)
        launches = []
        for dtype, idx in self.groups(params):
            P, G, M, V = _select(idx, params, grads, m, v)
            plan = self.plan("elem", dtype, P)
            launches.append(self.prepared(
                "adam", dtype, plan.n_chunks, chunks=plan.chunks,
                P=self.pointers(P), G=self.pointers(G), M=self.pointers(M), V=self.pointers(V),
                mode=mode, wd=weight_decay, decay=1 - lr * weight_decay,
                b1=beta1, omb1=1 - beta1, b2=beta2, omb2=1 - beta2,
                step_size=step_size, bc2s=bc2s, eps=eps))
        return launches

    def fadam_launches(self, params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
        params = list(params)
        if not params:
            return []
        beta2_hat = debiased_beta2(beta2, step)
        pmode = 0 if p == 0.5 else (1 if p == 1 else 2)
        grads, m, f = list(grads), list(m), list(f)
        launches = []
        for dtype, idx in self.groups(params):
            P, G, M, F = _select(idx, params, grads, m, f)
            plan = self.plan("elem", dtype, P)
            partial, partial2, scal = plan.fadam_scratch()
            Pp, Gp, Mp, Fp = self.pointers(P), self.pointers(G), self.pointers(M), self.pointers(F)
            launches += [
                self.prepared("sumsq", dtype, plan.n_chunks, chunks=plan.chunks, G=Gp, partial=partial),
                self.prepared("fadam_eps", dtype, plan.n_tensors, meta=plan.meta, partial=partial, scal=scal,
                              eps=eps, eps2=eps2, two_p=2 * p, two_p_is_one=int(2 * p == 1),
                              eps2p=eps ** (2 * p), tiny=np.finfo(dtype).tiny),
                self.prepared("fadam_precond", dtype, plan.n_chunks, chunks=plan.chunks, P=Pp, G=Gp, F=Fp,
                              scal=scal, partial2=partial2, b2h=beta2_hat, omb2h=1 - beta2_hat, pmode=pmode,
                              pp=p),
                self.prepared("fadam_scales", dtype, plan.n_tensors, meta=plan.meta, partial2=partial2,
                              scal=scal, clip=clip),
                self.prepared("fadam_apply", dtype, plan.n_chunks, chunks=plan.chunks, P=Pp, G=Gp, M=Mp, F=Fp,
                              scal=scal, pmode=pmode, pp=p, b1=beta1, omb1=1 - beta1, lr=lr, wd=weight_decay),
            ]
        return launches

    def coupled_launches(self, params, grads, m, v_col, *, step, lr, beta1, beta2, eps, weight_decay):
        params = list(params)
        if not params:
            return []
        step_size = lr / (1 - beta1**step)
        bc2s = math.sqrt(1 - beta2**step)
        grads, m, v_col = list(grads), list(m), list(v_col)
        launches = []
        for dtype, idx in self.groups(params):
            P, G, M, Vc = _select(idx, params, grads, m, v_col)
            plan = self.plan("coupled", dtype, P)
            Gp, Vp = self.pointers(G), self.pointers(Vc)
            launches += [
                self.prepared("colsumsq", dtype, plan.n_tiles, tiles=plan.tiles, meta=plan.meta, G=Gp,
                              partial=plan.partial),
                self.prepared("coupled_v", dtype, plan.n_ctiles, ctiles=plan.ctiles, meta=plan.meta,
                              partial=plan.partial, Vc=Vp, b2=beta2, omb2=1 - beta2),
                self.prepared("coupled_apply", dtype, plan.n_chunks, chunks=plan.chunks, meta=plan.meta,
                              P=self.pointers(P), G=Gp, M=self.pointers(M), Vc=Vp,
                              decay=1 - lr * weight_decay, b1=beta1, omb1=1 - beta1,
                              step_size=step_size, bc2s=bc2s, eps=eps),
            ]
        return launches


def _select(idx, *lists):
    if idx is None:
        return lists
    return tuple([lst[i] for i in idx] for lst in lists)
