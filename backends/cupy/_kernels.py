"""CUDA source of the cupy backend's kernels, generated per dtype (NumPy-free, CuPy-free).

The kernels themselves live beside their rules: each module of this package
that defines ``KERNELS`` (``finite``, ``adam``, ``fadam``, ``coupled_adam``,
``lion``, one per rule of :data:`fisheropt.refimpl.RULES` that has a fused GPU
kernel, and ``esimcse``, the momentum encoder's update) contributes
:class:`Kernel` entries (signature and body) and, where it needs one,
``DEVICE_CODE`` (its ``__device__`` helpers). This module holds
what they share: the header (types, vector loads and stores, the block
reduction, the chunk loop), the skeleton of the kernels that stream tensors
through the chunk table (:func:`streaming_kernel`), the layout constants of the
planner's tables, the compile options, and the assembly of one translation
unit per dtype.
``_device.load_module`` compiles it with NVRTC (options below), ``_emulate``
compiles the same text with g++ to run it on the CPU in the tests.

One source per parameter dtype: ``T`` is ``float`` or ``double`` and every
elementwise operation is written once, in ``T``, in the reference's order of
operations. Only the global reductions are ``double`` (explicit casts), as the
spec requires. Kept importable without CuPy so the text can be checked (and
compiled with NVRTC, or run by the CPU emulator in ``_emulate``) anywhere.

Numerics
--------
* Compiled with ``--fmad=false``: ``b*m + c*g`` must round twice, as NumPy
  does; contracting it to an FMA changes the last bit of m, v and θ and then
  the trajectories drift apart from the reference. With no contraction, and
  NVRTC's defaults (IEEE division and square root, no flush-to-zero), Adam,
  AdamW, Lion and the Coupled Adam update are bit-for-bit the reference's
  arithmetic (``--ftz=false`` too: float32 subnormals are kept, as NumPy
  keeps them); only ``pow`` (FAdam with p ≠ 0.5, 1) and the float64 summation
  order of the reductions may differ in the last bits. The kernels are
  memory bound, so giving up FMA costs nothing measurable.
* Reductions are deterministic: every thread accumulates a fixed set of
  elements in a fixed order, blocks reduce through a fixed shared-memory tree
  into one partial per chunk, and a second kernel sums a tensor's partials in
  a fixed tree. No floating-point atomics anywhere.

Layout shared with the planner (``_plan``)
------------------------------------------
* chunk table, int64 rows of ``CHUNK_ROW`` = 4: (tensor, start, stop, start % cols);
  one block per row; a block's threads take groups of ``VEC`` consecutive
  elements, group j of the chunk at ``start + (j*BLOCK + tid)*VEC`` (16-byte
  vector loads when every pointer of the tensor is 16-byte aligned; the same
  element-to-thread mapping otherwise, so results never depend on alignment);
* meta, int64 rows of ``META_ROW`` = 8 per tensor: (size, first chunk, end chunk,
  rows, cols, then for coupled tensors: partial base, row tiles, first column of the
  column totals);
* pointer tables: one uint64 array per role (params, grads, m, v / f).
"""

from __future__ import annotations

import importlib
import re
import textwrap
from typing import NamedTuple

CHUNK_ROW = 4  # int64 per row of the chunk table: tensor, start, stop, start % cols
META_ROW = 8  # int64 per row of the meta table (one row per tensor)
TILE_ROW = 5  # int64 per row tile of the coupled column sums: tensor, first row, end row, first column,
#                   offset of the tile's partial sums
COL_TILE_ROW = 2  # int64 per column tile of the coupled column finalize: tensor, first column

BLOCK = 256
#: elements per chunk (a multiple of every VEC); 64 KiB of float32 per array.
CHUNK = 16384

# Passed to NVRTC as they are. Not through cupy.RawModule: CuPy appends -ftz=true to every
# compile, and flushing float32 subnormals to zero changes results versus NumPy (e.g. Adam's
# v = (1-β2)·g² for |g| ~ 1e-18 is subnormal in float32). _device.py compiles with NVRTC itself.
COMPILE_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++17")

_TYPES = {"float32": ("float", "f32", 4), "float64": ("double", "f64", 2)}


class Kernel(NamedTuple):
    """One ``__global__`` function, written once for both dtypes.

    ``signature``: (C type, name) pairs, the single source of truth for argument order
    and types: ``"T"`` is the parameter dtype, ``"int"``, ``"long long"`` and
    ``"double"`` are scalars, a type ending in ``*`` a device array. ``body``: the
    function body; ``{SQRT}`` becomes ``sqrtf`` or ``sqrt``. ``kind``:
    ``"elementwise"`` (arithmetic in T; float64 only as explicit reduction
    accumulators and casts, which the tests check) or ``"finalize"`` (per-tensor
    float64 scalar math, the spec's host-side formulas done on the device)."""

    signature: list
    body: str
    kind: str = "elementwise"


def streaming_kernel(arrays: dict, scalars: str, loop: str, *, written=(), before="", after="") -> Kernel:
    """An elementwise kernel over the chunk table (one block per chunk): each thread loads a
    group of VEC consecutive elements of every array, runs ``loop`` for each element ``k`` of
    the group, stores the ``written`` arrays back and moves to its next group.

    ``arrays``: the name of each array in the body (its group is ``<name>_group``) and its
    pointer table; ``scalars``: the parameters after the pointer tables, in C
    (``"int mode, T eps"``); ``before`` / ``after``: statements before and after the loop
    over groups (accumulators, a flag). Alignment decides vector or scalar access per
    tensor, never which elements a thread takes."""
    names, tables = list(arrays), list(arrays.values())
    signature = [
        ("const long long*", "chunks"),
        *[("const unsigned long long*", table) for table in tables],
        *[tuple(parameter.strip().rsplit(" ", 1)) for parameter in scalars.split(",") if parameter.strip()],
    ]
    lines = [
        "CHUNK_HEADER",
        *[f"TENSOR({'T' if name in written else 'const T'}, {name}, {arrays[name]});" for name in names],
        f"const bool aligned = aligned16({' | '.join(f'{table}[t]' for table in tables)});",
        *_statements(before),
        "FOR_GROUPS(base) {",
        "    const bool full = aligned && base + VEC <= stop;",
        "    T " + ", ".join(f"{name}_group[VEC]" for name in names) + ";",
        *[f"    load_group({name}, base, stop, full, {name}_group);" for name in names],
        "#pragma unroll",
        "    for (int k = 0; k < VEC; ++k) {",
        *["        " + statement for statement in _statements(loop)],
        "    }",
        *[f"    store_group({name}, base, stop, full, {name}_group);" for name in written],
        "}",
        *_statements(after),
    ]
    body = "\n".join(line if line.startswith("#") else "    " + line for line in lines)
    return Kernel(signature, f"\n{body}\n")


def _statements(text: str) -> list[str]:
    """The lines of a piece of kernel text, without their common indentation."""
    return textwrap.dedent(text).strip("\n").splitlines() if text.strip() else []


def kernel_modules() -> tuple[str, ...]:
    """The modules of this package that may hold kernels: the pre-step check, one per rule
    of the registry (a rule without a module, or whose module has no ``KERNELS``, has no
    kernels here; ``adamw`` runs Adam's), then ``esimcse``."""
    from fisheropt.refimpl import RULES

    # esimcse is no update rule, so RULES does not name it; its momentum-encoder EMA is a
    # streaming kernel all the same, and must be compiled here with COMPILE_OPTIONS (no
    # flush-to-zero, no contraction), emulated and checked with the others.
    return ("finite", *RULES, "esimcse")


_REGISTRY: dict | None = None


def _collect() -> dict:
    """{"kernels": {name: Kernel}, "device_code": [text]}, from the modules of
    :func:`kernel_modules`; built on first use (the rule modules import this one)."""
    global _REGISTRY
    if _REGISTRY is None:
        kernels, device_code = {}, []
        for module_name in kernel_modules():
            try:
                module = importlib.import_module(f"{__package__}.{module_name}")
            except ModuleNotFoundError as exc:
                if exc.name == f"{__package__}.{module_name}":
                    continue  # no GPU kernel for this rule
                raise
            for name, kernel in getattr(module, "KERNELS", {}).items():
                if name in kernels:
                    raise ImportError(f"kernel {name!r} is defined twice (again in {module_name}.py)")
                kernels[name] = kernel
            if getattr(module, "DEVICE_CODE", ""):
                device_code.append(module.DEVICE_CODE)
        _REGISTRY = {"kernels": kernels, "device_code": device_code}
    return _REGISTRY


def kernels() -> dict:
    """name -> :class:`Kernel`, every kernel of the backend."""
    return _collect()["kernels"]


def __getattr__(name):
    # SIGNATURES / ELEMENTWISE / FINALIZE, computed from the rule modules on first access.
    if name == "SIGNATURES":
        return {n: k.signature for n, k in kernels().items()}
    if name == "ELEMENTWISE":
        return tuple(n for n, k in kernels().items() if k.kind == "elementwise")
    if name == "FINALIZE":
        return tuple(n for n, k in kernels().items() if k.kind == "finalize")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ctype(dtype: str) -> str:
    return _TYPES[str(dtype)][0]


def suffix(dtype: str) -> str:
    return _TYPES[str(dtype)][1]


def vec(dtype: str) -> int:
    """Elements per 16-byte vector access."""
    return _TYPES[str(dtype)][2]


def kernel_name(name: str, dtype: str) -> str:
    return f"fo_{name}_{suffix(dtype)}"


def parameters(name: str, dtype: str) -> str:
    """The C parameter list of kernel ``name`` for ``dtype`` (pointers ``__restrict__``)."""
    param_type = ctype(dtype)
    out = []
    for c_type, arg in kernels()[name].signature:
        c_type = param_type if c_type == "T" else c_type
        if c_type.endswith("*"):
            c_type = c_type + " __restrict__"
        out.append(f"{c_type} {arg}")
    return ", ".join(out)


_HEADER = r"""
// fisheropt cupy backend, dtype {DTYPE}: generated by fisheropt.backends.cupy._kernels
typedef {CT} T;
#define VEC {VEC}
#define BLOCK {BLOCK}
#define CHUNK_ROW {CHUNK_ROW}
#define META_ROW {META_ROW}
#define TILE_ROW {TILE_ROW}
#define COL_TILE_ROW {COL_TILE_ROW}

struct __align__(16) VecT {{ T x[VEC]; }};

// Pointers read from the tables are generic to the compiler; saying they are global
// gives ld.global / st.global (vector) instructions instead of generic ones.
#ifndef FO_ASSUME_GLOBAL
#define FO_ASSUME_GLOBAL(ptr) __builtin_assume(__isGlobal(ptr))
#endif

__device__ __forceinline__ bool aligned16(unsigned long long a) {{ return (a & 15ull) == 0ull; }}

// Load / store one group of VEC consecutive elements; `full`: whole group in range and aligned.
__device__ __forceinline__ void load_group(const T* a, long long base, long long stop, bool full, T* out) {{
    if (full) {{
        const VecT w = *reinterpret_cast<const VecT*>(a + base);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = w.x[k];
    }} else {{
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (base + k < stop) ? a[base + k] : (T)0;
    }}
}}

__device__ __forceinline__ void store_group(T* a, long long base, long long stop, bool full, const T* in) {{
    if (full) {{
        VecT w;
#pragma unroll
        for (int k = 0; k < VEC; ++k) w.x[k] = in[k];
        *reinterpret_cast<VecT*>(a + base) = w;
    }} else {{
#pragma unroll
        for (int k = 0; k < VEC; ++k) if (base + k < stop) a[base + k] = in[k];
    }}
}}

// Deterministic block sum (fixed tree) through `shared` (BLOCK doubles); all BLOCK threads must call it.
__device__ __forceinline__ double block_sum(double x, double* shared) {{
    shared[threadIdx.x] = x;
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half >>= 1) {{
        if ((int)threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
        __syncthreads();
    }}
    const double sum = shared[0];
    __syncthreads();
    return sum;
}}

// This block's row of the chunk table: tensor t, elements [start, stop).
#define CHUNK_HEADER \
    const long long* chunk = chunks + (long long)CHUNK_ROW * blockIdx.x; \
    const int t = (int)chunk[0]; \
    const long long start = chunk[1]; \
    const long long stop = chunk[2];

// Tensor t of a pointer table as a `type*` into global memory.
#define TENSOR(type, name, table) \
    type* name = (type*)(table)[t]; \
    FO_ASSUME_GLOBAL(name)

#define FOR_GROUPS(base) \
    for (long long base = start + (long long)threadIdx.x * VEC; base < stop; base += (long long)BLOCK * VEC)
"""


def _math(text: str, dtype: str) -> str:
    f32 = str(dtype) == "float32"
    return text.replace("{SQRT}", "sqrtf" if f32 else "sqrt").replace("{POW}", "powf" if f32 else "pow")


def kernel_source(name: str, dtype: str) -> str:
    """The definition of one kernel for one dtype (no header)."""
    dtype = str(dtype)
    body = _math(kernels()[name].body, dtype)
    return (
        f'extern "C" __global__ void __launch_bounds__(BLOCK) '
        f"{kernel_name(name, dtype)}({parameters(name, dtype)})\n{{{body}}}\n"
    )


def header(dtype: str, block: int = BLOCK) -> str:
    """The shared header for ``dtype``, then the rule modules' ``__device__`` helpers."""
    dtype = str(dtype)
    text = _HEADER.format(
        DTYPE=dtype,
        CT=ctype(dtype),
        VEC=vec(dtype),
        BLOCK=int(block),
        CHUNK_ROW=CHUNK_ROW,
        META_ROW=META_ROW,
        TILE_ROW=TILE_ROW,
        COL_TILE_ROW=COL_TILE_ROW,
    )
    return text + "".join(_math(code, dtype) for code in _collect()["device_code"])


def source(dtype: str, block: int = BLOCK) -> str:
    """The whole CUDA translation unit for one dtype."""
    if block < 32 or block & (block - 1):
        raise ValueError("block must be a power of two >= 32")
    return header(dtype, block) + "\n".join(kernel_source(n, dtype) for n in kernels())


_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+[eE][-+]?\d+)([fFlL]?)(?![\w.])")


def float_literals(text: str) -> list[str]:
    """Floating-point literals in C source text (``1.0``, ``2e-3``, ``0.5f``); used by the tests."""
    return [m.group(0) for m in _FLOAT_LITERAL.finditer(text)]
