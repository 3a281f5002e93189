"""Run the cupy backend's CUDA source on the CPU, for tests on machines without a GPU.

The generated kernel text (``_kernels.source``: the shared header and every rule
module's kernels) is compiled unchanged by the host C++ compiler behind a small
prelude that maps CUDA's names onto C++:
one block at a time, ``BLOCK`` std::threads per block (so ``__syncthreads`` is a
real barrier and ``__shared__`` arrays are shared by the block's threads),
``threadIdx``/``blockIdx`` thread-local. Floating point is IEEE single/double
(SSE) with ``-ffp-contract=off``, the counterpart of ``--fmad=false``.

:class:`CpuLauncher` plugs into ``_plan.Engine`` exactly where the CuPy
launcher does, so the whole host path (tables, caches, grouping, scalar
coefficients, order of launches) and every kernel body run here on NumPy
arrays. What this cannot show: GPU memory-model or occupancy problems, NVRTC
specifics, real misaligned-access faults, speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import _kernels

_PRELUDE = r"""
#include <cmath>
#include <math.h>
#include <cstdint>
#include <thread>
#include <barrier>
#include <vector>
struct fo_dim3 { unsigned x, y, z; };
static thread_local fo_dim3 threadIdx, blockIdx;
static fo_dim3 blockDim, gridDim;
static std::barrier<>* fo_bar = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define FO_ASSUME_GLOBAL(ptr) ((void)0)
static inline void __syncthreads() { fo_bar->arrive_and_wait(); }
using std::isfinite;
"""

_RUNNER = r"""
template <class F> static void fo_run_grid(int grid, F f) {
    blockDim = {BLOCK, 1, 1};
    gridDim = {(unsigned)grid, 1, 1};
    for (int b = 0; b < grid; ++b) {
        std::barrier<> bar(BLOCK);
        fo_bar = &bar;
        std::vector<std::thread> ts;
        ts.reserve(BLOCK);
        for (int i = 0; i < BLOCK; ++i)
            ts.emplace_back([&f, b, i] { blockIdx = {(unsigned)b, 0, 0}; threadIdx = {(unsigned)i, 0, 0}; f(); });
        for (auto& th : ts) th.join();
    }
}
"""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _wrapper(name: str, dtype: str) -> str:
    kernel = _kernels.kernel_name(name, dtype)
    parameters = _kernels.parameters(name, dtype)
    args = ", ".join(a for _, a in _kernels.kernels()[name].signature)
    return (
        f'extern "C" void emu_{kernel}(int grid, {parameters}) {{ fo_run_grid(grid, [=] {{ {kernel}({args}); }}); }}\n'
    )


def emulation_source(dtype: str, block: int) -> str:
    src = _kernels.source(dtype, block)
    return _PRELUDE + src + _RUNNER + "".join(_wrapper(n, dtype) for n in _kernels.kernels())


def _build(dtype: str, block: int, transform=None) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    src = emulation_source(dtype, block)
    if transform is not None:  # tests: a deliberately broken kernel must be caught
        src = transform(src)
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FISHEROPT_EMU_CACHE", Path(tempfile.gettempdir()) / "fisheropt_cuda_emu"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"emu_{dtype}_{block}_{digest}.so"
    if not lib.exists():
        cu = cache / f"emu_{dtype}_{block}_{digest}.cc"
        cu.write_text(src)
        tmp = cache / f"{lib.name}.{os.getpid()}.tmp"
        cmd = [
            cxx,
            "-std=c++20",
            "-O1",
            "-shared",
            "-fPIC",
            "-pthread",
            "-ffp-contract=off",
            "-fno-strict-aliasing",
            "-fno-fast-math",
            "-Wno-unknown-pragmas",
            "-o",
            str(tmp),
            str(cu),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulation build failed:\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


_CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "double": ctypes.c_double}


class CpuLauncher:
    """The launcher interface of ``_plan.Engine`` on NumPy arrays and the CPU emulation."""

    host_arrays = True  # its kernels take NumPy arrays (what ema_update's argument check accepts)

    def __init__(self, block: int = 32, transform=None):
        self.block = int(block)
        self.transform = transform
        self._libs: dict[str, ctypes.CDLL] = {}
        self.calls: list[tuple[str, str, int]] = []

    def _fn(self, dtype, name):
        lib = self._libs.get(dtype)
        if lib is None:
            lib = self._libs[dtype] = _build(dtype, self.block, self.transform)
        fn = getattr(lib, f"emu_{_kernels.kernel_name(name, dtype)}")
        t = ctypes.c_float if dtype == "float32" else ctypes.c_double
        fn.argtypes = [ctypes.c_int] + [
            t if c == "T" else _CTYPES.get(c, ctypes.c_void_p) for c, _ in _kernels.kernels()[name].signature
        ]
        fn.restype = None
        return fn

    # -- launcher interface --
    def device_key(self):
        return "cpu-emulation"

    def upload(self, host):
        return np.array(host, copy=True, order="C")

    def empty_f64(self, n):
        return np.full(int(n), np.nan)  # NaN, so a missing write shows

    def zeros_i32(self, n):
        return np.zeros(int(n), dtype=np.int32)

    def read_i32(self, a):
        return int(a[0])

    def ptr(self, a):
        return a.ctypes.data

    def ptrs(self, arrays):
        return tuple([a.ctypes.data for a in arrays])

    def launch(self, dtype, name, grid, args):
        self.calls.append((dtype, name, grid))
        c_args = []
        for (c_type, _), value in zip(_kernels.kernels()[name].signature, args):
            if c_type.endswith("*"):
                c_args.append(ctypes.c_void_p(value.ctypes.data))
            else:
                c_args.append(value.item() if hasattr(value, "item") else value)
        self._fn(dtype, name)(grid, *c_args)


def compile_check(dtype: str, block: int = _kernels.BLOCK) -> None:
    """Build the emulation library (a syntax/type check of the kernel text with a host compiler)."""
    _build(dtype, block)


__all__ = ["CpuLauncher", "compiler", "emulation_source", "compile_check"]
