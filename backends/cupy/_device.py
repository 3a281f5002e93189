"""The cupy backend's device side: NVRTC compilation, the kernel cache, launches through CuPy.

:class:`CupyLauncher` is the launcher of ``_plan.Engine`` on CuPy arrays: it
compiles the per-dtype CUDA source of ``_kernels`` with NVRTC (exactly
``_kernels.COMPILE_OPTIONS``; not cupy.RawModule, which forces -ftz=true),
caches the binary on disk, and launches on CuPy's current stream. ``engine``
is the engine every ``<rule>_step`` of this package runs on. Importing this
module imports cupy.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import cupy

from . import _kernels
from ._plan import Engine, set_default

__all__ = ["CupyLauncher", "load_module", "engine", "from_dlpack_list"]


class CupyLauncher:
    """The launcher interface of ``_plan.Engine`` on CuPy arrays and RawModules."""

    block = _kernels.BLOCK
    host_arrays = False  # its kernels take CuPy arrays

    def __init__(self):
        self._modules: dict = {}
        self._functions: dict = {}

    def device_key(self):
        return cupy.cuda.runtime.getDevice()

    def upload(self, host):
        # from NumPy: staged through pinned memory, asynchronous on the current stream
        return cupy.asarray(host)

    def empty_f64(self, n):
        return cupy.empty(int(n), dtype=cupy.float64)

    def zeros_i32(self, n):
        return cupy.zeros(int(n), dtype=cupy.int32)

    def read_i32(self, a):
        return int(a.get()[0])

    def ptr(self, a):
        return a.data.ptr

    def ptrs(self, arrays):
        return tuple([a.data.ptr for a in arrays])

    def function(self, dtype, name):
        key = (self.device_key(), dtype, name)
        fn = self._functions.get(key)
        if fn is None:
            module_key = key[:2]
            module = self._modules.get(module_key)
            if module is None:
                module = self._modules[module_key] = load_module(dtype, self.block)
            fn = self._functions[key] = module.get_function(_kernels.kernel_name(name, dtype))
        return fn

    def launch(self, dtype, name, grid, args):
        self.function(dtype, name)((grid,), (self.block,), tuple(args))


def _arch_option() -> tuple[str, str]:
    """NVRTC target for the current device: SASS when NVRTC knows the arch, else PTX for
    the newest arch it knows that is not newer than the device (the driver JITs it)."""
    from cupy.cuda import nvrtc

    cc = int(cupy.cuda.Device().compute_capability)
    try:
        archs = tuple(int(a) for a in nvrtc.getSupportedArchs())
    except Exception:  # very old NVRTC: trust the device arch
        archs = ()
    if not archs or cc in archs:
        return f"--gpu-architecture=sm_{cc}", "cubin"
    older = [a for a in archs if a <= cc]
    return f"--gpu-architecture=compute_{max(older) if older else min(archs)}", "ptx"


def _cache_dir() -> Path:
    return Path(
        os.environ.get(
            "FISHEROPT_KERNEL_CACHE",
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fisheropt" / "cuda",
        )
    )


def load_module(dtype: str, block: int = _kernels.BLOCK):
    """Compile (or load from the disk cache) the kernels for ``dtype`` on the current device.

    NVRTC is called directly with exactly ``_kernels.COMPILE_OPTIONS``; see there for why
    not ``cupy.RawModule`` (it forces -ftz=true)."""
    from cupy.cuda import function, nvrtc

    src = _kernels.source(dtype, block)
    arch, kind = _arch_option()
    options = [arch, *_kernels.COMPILE_OPTIONS]
    digest = hashlib.sha256("\0".join([src, *options, repr(nvrtc.getVersion())]).encode()).hexdigest()[:24]
    path = _cache_dir() / f"fo_{_kernels.suffix(dtype)}_{digest}.{kind}"
    data = None
    try:
        data = path.read_bytes()
    except OSError:
        pass
    if not data:
        prog = nvrtc.createProgram(src, f"fisheropt_{dtype}.cu", [], [])
        try:
            try:
                nvrtc.compileProgram(prog, options)
            except Exception as exc:
                raise RuntimeError(
                    f"NVRTC failed to compile the fisheropt {dtype} kernels ({exc}):\n{nvrtc.getProgramLog(prog)}"
                ) from exc
            data = nvrtc.getCUBIN(prog) if kind == "cubin" else nvrtc.getPTX(prog)
        finally:
            nvrtc.destroyProgram(prog)
        try:  # best effort; a read-only home just means compiling again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        except OSError:
            pass
    module = function.Module()
    module.load(data)
    return module


engine = Engine(CupyLauncher())
set_default(engine)


def from_dlpack_list(tensors) -> list:
    """CuPy views of GPU tensors (PyTorch, JAX, ...) through DLPack, zero-copy.

    PyTorch tensors that require grad are detached first (same storage). Each
    view is checked to share memory with its tensor where the tensor exposes
    its address (``data_ptr()`` or ``unsafe_buffer_pointer()``); a copy would
    make in-place optimizer updates silently miss the model, so it is an error.
    """
    out = []
    for i, t in enumerate(tensors):
        src = t.detach() if getattr(t, "requires_grad", False) and hasattr(t, "detach") else t
        a = cupy.from_dlpack(src)
        address = None
        if hasattr(src, "data_ptr"):
            address = src.data_ptr()
        elif hasattr(src, "unsafe_buffer_pointer"):
            address = src.unsafe_buffer_pointer()
        if address is not None and a.size and a.data.ptr != address:
            raise RuntimeError(f"tensor {i}: DLPack produced a copy, not a view (addresses differ)")
        if not a.flags.c_contiguous:
            raise ValueError(f"tensor {i} is not contiguous; call .contiguous() first")
        out.append(a)
    return out
