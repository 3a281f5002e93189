"""The "cupy" backend: fused CUDA kernels through CuPy, on CuPy arrays.

One module per update rule, beside its reference and its Numba version
(backends/cupy/fadam.py next to refimpl/fadam.py and backends/numba/fadam.py):
the rule's CUDA kernels (signature and body), how it plans its launches, and
its ``<rule>_step`` (plus ``<rule>_step_checked`` where the finiteness check
fuses into a pass the step makes anyway, and ``<rule>_partials`` / ``<rule>_apply``,
the two passes of a sharded step, where the rule reduces over whole tensors:
spec/distributed.md §5). ``finite`` has the pre-step check.
The shared machinery is in the underscore modules: ``_kernels`` (the CUDA
header, table layouts and compile options, one translation unit per dtype),
``_plan`` (chunk and column tables, caches, grouping by dtype and host scalars,
the launch engine; NumPy only), ``_device`` (NVRTC, the kernel cache, CuPy
launches, DLPack) and ``_emulate`` (the same CUDA source run on the CPU, for
tests without a GPU).

Same function names and signatures as the reference backend; arrays are
cupy.ndarray (PyTorch/JAX GPU tensors go in zero-copy via cupy.from_dlpack).
Unusable (with the reason) when cupy is missing or no CUDA device is present; a
rule without a module here is unavailable on this backend only.

* One or a few kernel launches per step, dtype and set of host scalars,
  whatever the number of tensors: a chunk table (tensor, start, stop) spreads
  large and small tensors evenly over the blocks; per-tensor pointers are
  device uint64 arrays. Tables are cached by layout, pointer tables by pointer
  values (so only a new set of grads costs one small asynchronous
  host-to-device copy).
* ``step`` and every hyperparameter may be one value or one per tensor (param
  groups, per-parameter step counts): tensors of one dtype whose host scalars
  (float64, from the rule's descriptor; those shared with the numba backend in
  ``backends/_host.py``) are bit-identical share a launch, and
  every launch of the step is prepared before the first one runs (all or nothing).
* No host synchronisation inside an unchecked step: FAdam's ε_t and clip
  scales, and Coupled Adam's column means, are computed on the device from
  deterministic float64 two-stage reductions (fixed order, no atomics).
  ``all_finite`` reads back one int; so do the checked steps, once, in place
  of it. The sharded steps' pass 1 reads its float64 sums back.
* Kernels run on CuPy's current stream. The cached scratch buffers belong to
  the layout, so do not run two steps with the same layout concurrently on
  different streams.
* Float32 and float64 tensors may be mixed in one list (one launch group per
  dtype). Arrays must be C-contiguous (the optimizer classes check it).
"""

import cupy  # noqa: F401  (an ImportError here is the registry's "why not")

from ..interface import BackendUnavailable, load_rule_functions
from . import _device
from ._device import from_dlpack_list  # noqa: F401
from .esimcse import ema_update  # noqa: F401,E402  (ESimCSE momentum encoder)
from .finite import all_finite  # noqa: F401
from .fisher import fisher_gram, fisher_sample_space_direction  # noqa: F401  (Fisher directions)

NAME = "cupy"
array_module = cupy


def owns(array) -> bool:
    return isinstance(array, cupy.ndarray)


def check_usable() -> None:
    """Raise BackendUnavailable saying why no kernel can run here."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken: say what CuPy said
        raise BackendUnavailable(f"cupy is installed but CUDA is not usable: {exc}") from exc
    if count == 0:
        raise BackendUnavailable("cupy is installed but no CUDA device is present")


load_rule_functions(__name__, globals())

engine = _device.engine


def clear_cache() -> None:
    """Drop cached tables, scratch and pointer arrays (e.g. after freeing a model)."""
    _device.engine.clear_cache()
