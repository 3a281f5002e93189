"""Input checks shared by the optimizer classes and the Fisher API.

Everything here runs before any array is written, so a rejected call leaves
parameters and optimizer state exactly as they were.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from ._memory import check_disjoint
from ._types import FloatArray, Hyperparameter

FLOAT_DTYPES = ("float32", "float64")


def check_float_array(a: Any, what: str, *, writeable: bool = False) -> None:
    """A float32/float64 C-contiguous array (NumPy or CuPy); writeable if asked."""
    check_array_type(a, what)
    check_float_dtype(a.dtype, what)
    flags = a.flags
    if not flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; pass a contiguous array (e.g. numpy.ascontiguousarray)")
    if writeable and not _is_writeable(a):
        raise ValueError(f"{what} is read-only; the optimizer updates parameters in place")


def check_array_type(a: object, what: str) -> None:
    """A plain NumPy ndarray or a CuPy ndarray: not a subclass (``np.matrix`` changes
    what ``*`` and indexing mean), not a NumPy scalar, not another framework's tensor."""
    if type(a) is np.ndarray or is_cupy_array(a):
        return
    if isinstance(a, np.ndarray):
        raise TypeError(
            f"{what} is a {type(a).__module__}.{type(a).__name__} (an ndarray subclass); "
            "pass a plain numpy.ndarray (e.g. numpy.asarray(x))"
        )
    hint = ""
    if type(a).__module__.startswith("torch"):
        hint = " (for torch tensors use .numpy() on CPU tensors, or fisheropt.torch)"
    elif type(a).__module__.startswith(("jax", "jaxlib")):
        hint = " (JAX arrays are immutable: use fisheropt.optax, or numpy.asarray for a copy)"
    raise TypeError(
        f"{what} must be a NumPy or CuPy array (numpy.ndarray or cupy.ndarray), got "
        f"{type(a).__module__}.{type(a).__name__}{hint}"
    )


def check_float_dtype(dtype: np.dtype[Any], what: str) -> None:
    """float32 or float64 in the machine's native byte order.

    Kernels read memory as native floats, so a big-endian array on a little-endian
    machine would be read as garbage; refusing it is the only safe answer."""
    if dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{what} has dtype {dtype.name}; only float32 and float64 are supported")
    if not dtype.isnative:
        raise TypeError(
            f"{what} has non-native byte order (dtype {dtype.str!r}); convert it with "
            f"a.astype(a.dtype.newbyteorder('=')) before passing it"
        )


def is_dict(value: object) -> TypeGuard[dict[Any, Any]]:
    """``isinstance(value, dict)``, for input checked at run time (a state dict, JSON): a type
    checker then sees a dict whose contents are still to be checked, not of unknown type."""
    return isinstance(value, dict)


def is_sequence(value: object) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    """``isinstance(value, (list, tuple))``, for input checked at run time (see :func:`is_dict`)."""
    return isinstance(value, (list, tuple))


def is_ndarray(value: object) -> TypeGuard[npt.NDArray[Any]]:
    """``isinstance(value, numpy.ndarray)``, for input checked at run time (see :func:`is_dict`)."""
    return isinstance(value, np.ndarray)


def is_named_pair(value: object) -> TypeGuard[tuple[str, Any]]:
    """A ``(name, value)`` pair, as torch's named parameters are (``named_parameters()`` items)."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)


def is_cupy_array(a: object) -> bool:
    """True for a CuPy ndarray, judged by type so that cupy is never imported here."""
    t = type(a)
    return t.__name__ == "ndarray" and t.__module__.startswith("cupy")


def array_module(a: object) -> ModuleType:
    """The array module of ``a``: cupy for a CuPy array (imported only then), else numpy."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


def _is_writeable(a: Any) -> bool:
    # CuPy arrays have no writeable flag: device memory is always writeable.
    return bool(getattr(a.flags, "writeable", True))


def check_params(params: Iterable[FloatArray], what: str = "params") -> list[FloatArray]:
    """Writeable float arrays, pairwise disjoint in memory (see fisheropt._memory)."""
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(f"{what} must be an iterable of arrays, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError(f"{what} is empty; give at least one parameter array")
    for i, p in enumerate(params):
        check_float_array(p, f"{what}[{i}]", writeable=True)
    check_disjoint((f"{what}[{i}]", p) for i, p in enumerate(params))
    return params


def check_grads(grads: Sequence[FloatArray], params: Sequence[FloatArray], what: str = "grads") -> list[FloatArray]:
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
        if type(g) is type(p) and getattr(g, "dtype", None) is p.dtype and g.shape == p.shape and g.flags.c_contiguous:
            continue
        _explain_bad_grad(g, p, f"{what}[{i}]", f"params[{i}]")
    return grads


def _explain_bad_grad(g: Any, p: FloatArray, what: str, param_what: str) -> None:
    check_float_array(g, what)
    if type(g) is not type(p):
        raise TypeError(f"{what} is a {type(g).__module__} array but {param_what} is a {type(p).__module__} array")
    check_same_shape_and_dtype(g, p, what, param_what)
    # Equal but not identical dtype objects (both native, e.g. np.dtype('<f4') and
    # np.dtype('float32')) are the same type: accepted.


def check_same_shape_and_dtype(a: Any, like: Any, what: str, like_what: str) -> None:
    """ValueError where ``a``'s shape differs from ``like``'s, TypeError where its dtype does."""
    if a.shape != like.shape:
        raise ValueError(f"{what} has shape {tuple(a.shape)} but {like_what} has shape {tuple(like.shape)}")
    if a.dtype != like.dtype:
        raise TypeError(
            f"{what} has dtype {a.dtype} but {like_what} has dtype {like.dtype}; mixed dtypes are not supported"
        )


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
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


def positive_int(value: object) -> int | None:
    """``value`` as an int when it is an integer >= 1 (Python or NumPy, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    n = int(value)
    return n if n >= 1 else None


def is_zero_number(value: object) -> bool:
    """Whether ``value`` is a number equal to 0 (an option that is off), without comparing
    anything else to 0 (a tensor's ``== 0`` is a tensor)."""
    return isinstance(value, numbers.Number) and value == 0


def check_bool(name: str, value: object) -> bool:
    """A Python or NumPy bool (not a truthy string such as "no")."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def bool_property(name: str, doc: str) -> property:
    """A bool attribute that is checked when set (anything but a bool raises TypeError), kept in
    ``_<name>`` (the option ``check_finite`` of both optimizer families)."""
    attr = "_" + name

    def get(self: object) -> bool:
        return getattr(self, attr)

    def set_checked(self: object, value: object) -> None:
        setattr(self, attr, check_bool(name, value))

    return property(get, set_checked, doc=doc)


def check_representable(
    hyperparams: Mapping[str, Hyperparameter], dtypes: Iterable[np.dtype[Any]], *, normal: tuple[str, ...] = ()
) -> None:
    """Every float hyperparameter stays finite when rounded to each parameter dtype, and
    those in ``normal`` (epsilons, damping) stay positive normal numbers.

    The kernels round host scalars to the parameter dtype: eps = 1e-50 is positive
    as a Python float but 0 in float32, and 0/0 then gives NaN where the gradient is 0."""
    for dtype in dtypes:
        info = np.finfo(dtype)
        for name, value in hyperparams.items():
            values = value if isinstance(value, tuple) else (value,)
            for x in values:
                if not isinstance(x, float):
                    continue
                if abs(x) > float(info.max):
                    raise ValueError(
                        f"{name} = {x!r} overflows to Inf in {info.dtype} "
                        f"(largest finite {info.dtype} is {info.max:.4g})"
                    )
                if name in normal and x < info.smallest_normal:
                    raise ValueError(
                        f"{name} = {x!r} is below the smallest normal {info.dtype} number "
                        f"({info.smallest_normal:.4g}); in {info.dtype} it would be subnormal or 0"
                    )
