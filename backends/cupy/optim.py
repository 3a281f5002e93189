"""The update rules on the GPU: fused multi-tensor CUDA kernels launched through CuPy.

Same names and signatures as fisheropt.refimpl (multi-tensor lists, in place,
keyword-only hyperparameters, ``step`` = 1-based t). The kernels are in
``_kernels`` (CUDA source generated per dtype, compiled by NVRTC with
``--fmad=false`` on first use), the planning and launch order in ``_plan``.

* One or a few kernel launches per step and dtype, whatever the number of
  tensors: a chunk table (tensor, start, stop) spreads large and small
  tensors evenly over the blocks; per-tensor pointers are device uint64
  arrays. Tables are cached by layout, pointer tables by pointer values (so
  only a new set of grads costs one small asynchronous host-to-device copy).
* No host synchronisation inside a step: FAdam's ε_t and clip scales, and
  Coupled Adam's column means, are computed on the device from deterministic
  float64 two-stage reductions (fixed order, no atomics). ``all_finite`` is
  the only function that reads back (one int), as the optimizer's pre-step
  check.
* Kernels run on CuPy's current stream. The cached scratch buffers belong to
  the layout, so do not run two steps with the same layout concurrently on
  different streams.
* Float32 and float64 tensors may be mixed in one list (one launch group per
  dtype). Arrays must be C-contiguous (the optimizer classes check it).
"""

import hashlib
import os
import tempfile
from pathlib import Path

import cupy

from . import _kernels as K
from ._plan import Engine

__all__ = ["all_finite", "adam_step", "adamw_step", "fadam_step", "coupled_adam_step",
           "from_dlpack_list", "clear_cache", "engine"]


class CupyLauncher:
    """The launcher interface of ``_plan.Engine`` on CuPy arrays and RawModules."""

    block = K.BLOCK

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
            mkey = key[:2]
            module = self._modules.get(mkey)
            if module is None:
                module = self._modules[mkey] = load_module(dtype, self.block)
            fn = self._functions[key] = module.get_function(K.kernel_name(name, dtype))
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
    return Path(os.environ.get("FISHEROPT_KERNEL_CACHE",
                               Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fisheropt" / "cuda"))


def load_module(dtype: str, block: int = K.BLOCK):
    """Compile (or load from the disk cache) the kernels for ``dtype`` on the current device.

    NVRTC is called directly with exactly ``_kernels.COMPILE_OPTIONS``; see there for why
    not ``cupy.RawModule`` (it forces -ftz=true)."""
    from cupy.cuda import function, nvrtc
    src = K.source(dtype, block)
    arch, kind = _arch_option()
    options = [arch, *K.COMPILE_OPTIONS]
    digest = hashlib.sha256("\0".join([src, *options, repr(nvrtc.getVersion())]).encode()).hexdigest()[:24]
    path = _cache_dir() / f"fo_{K.suffix(dtype)}_{digest}.{kind}"
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
                raise RuntimeError(f"NVRTC failed to compile the fisheropt {dtype} kernels ({exc}):\n"
                                   f"{nvrtc.getProgramLog(prog)}") from exc
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


def clear_cache() -> None:
    """Drop cached tables and pointer arrays (e.g. after freeing a model)."""
    engine.clear_cache()


def all_finite(arrays) -> bool:
    """True when every element of every array is finite (one kernel per dtype, one 4-byte read)."""
    return engine.all_finite(arrays)


def adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: Adam with L2 weight decay (torch.optim.Adam)."""
    engine.adam(params, grads, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, decoupled=False)


def adamw_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """Multi-tensor, in place: AdamW, decoupled weight decay (torch.optim.AdamW)."""
    engine.adam(params, grads, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, decoupled=True)


def fadam_step(params, grads, m, f, *, step, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """Multi-tensor, in place: FAdam (per-tensor RMS reductions on the device)."""
    engine.fadam(params, grads, m, f, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps2=eps2,
                 clip=clip, p=p, weight_decay=weight_decay)


def coupled_adam_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled):
    """Multi-tensor, in place: Coupled Adam. ``coupled[i]`` True: a V×d tensor, v[i] of shape (d,);
    False: AdamW, v[i] like params[i]."""
    engine.coupled(params, grads, m, v, coupled=coupled, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=weight_decay)


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
