"""The "cupy" backend: fused CUDA kernels through CuPy, on CuPy arrays.

Same function names and signatures as the reference backend; arrays are
cupy.ndarray (PyTorch/JAX GPU tensors go in zero-copy via cupy.from_dlpack).
Unusable (with the reason) when cupy is missing or no CUDA device is present.
"""
import cupy  # noqa: F401  (an ImportError here is the registry's "why not")

from ..interface import BackendUnavailable

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


# --- update rules (issue: CuPy GPU backend) --------------------------------------
from .optim import (  # noqa: E402,F401
    adam_step,
    adamw_step,
    all_finite,
    coupled_adam_step,
    fadam_step,
    from_dlpack_list,
)

# --- Fisher directions (issue: Fisher estimators) --------------------------------
from .fisher import fisher_gram, fisher_sample_space_direction  # noqa: E402,F401

# --- ESimCSE momentum encoder (issue: ESimCSE) -----------------------------------
from .esimcse import ema_update  # noqa: E402,F401
