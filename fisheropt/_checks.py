"""Input checks shared by the optimizer classes and the Fisher API.

Everything here runs before any array is written, so a rejected call leaves
parameters and optimizer state exactly as they were.
"""
from __future__ import annotations

import math
import numbers

FLOAT_DTYPES = ("float32", "float64")


def check_float_array(a, what: str, *, writeable: bool = False) -> None:
    """A float32/float64 C-contiguous array (NumPy or CuPy); writeable if asked."""
    dtype = getattr(a, "dtype", None)
    flags = getattr(a, "flags", None)
    if dtype is None or flags is None or not hasattr(a, "shape"):
        raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(a).__name__}")
    if dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{what} has dtype {dtype.name}; only float32 and float64 are supported")
    if not flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; pass a contiguous array (e.g. numpy.ascontiguousarray)")
    if writeable and not _is_writeable(a):
        raise ValueError(f"{what} is read-only; the optimizer updates parameters in place")


def _is_writeable(a) -> bool:
    # CuPy arrays have no writeable flag: device memory is always writeable.
    return bool(getattr(a.flags, "writeable", True))


def check_params(params, what: str = "params") -> list:
    params = list(params)
    if not params:
        raise ValueError(f"{what} is empty; give at least one parameter array")
    seen = set()
    for i, p in enumerate(params):
        check_float_array(p, f"{what}[{i}]", writeable=True)
        if id(p) in seen:
            raise ValueError(f"{what}[{i}] is the same array as an earlier parameter")
        seen.add(id(p))
    return params


def check_grads(grads, params, what: str = "grads") -> list:
    """grads aligned with params: same count, shapes and dtypes (no mixing)."""
    if isinstance(grads, (str, bytes)) or not hasattr(grads, "__len__"):
        raise TypeError(f"{what} must be a sequence of arrays aligned with params")
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} {what} for {len(params)} params")
    for i, (g, p) in enumerate(zip(grads, params)):
        # Fast path (a model has hundreds of tensors): params were fully checked at
        # construction, so a grad of the same array type, dtype object and shape that is
        # C-contiguous is valid. Anything else takes the detailed path, which names the problem.
        if type(g) is type(p) and getattr(g, "dtype", None) is p.dtype and g.shape == p.shape \
                and g.flags.c_contiguous:
            continue
        _explain_bad_grad(g, p, f"{what}[{i}]", f"params[{i}]")
    return grads


def _explain_bad_grad(g, p, what: str, param_what: str) -> None:
    check_float_array(g, what)
    if type(g) is not type(p):
        raise TypeError(f"{what} is a {type(g).__module__} array but {param_what} is a "
                        f"{type(p).__module__} array")
    if g.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(g.shape)} but {param_what} has shape {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise TypeError(f"{what} has dtype {g.dtype} but {param_what} has dtype {p.dtype}; "
                        "mixed dtypes are not supported")
    # equal but not identical dtype objects (e.g. a non-native byte order): accepted


def recheck_params(params) -> None:
    """Re-check the flags of already-validated params before a step: a caller may have
    made one read-only since construction, and a failed write halfway through a
    multi-tensor step would leave the earlier tensors updated."""
    for i, p in enumerate(params):
        flags = p.flags
        if not (flags.c_contiguous and getattr(flags, "writeable", True)):
            check_float_array(p, f"params[{i}]", writeable=True)


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number in the given interval; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    b2 = check_real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return b1, b2
