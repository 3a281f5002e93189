"""Backend registry: which implementations of the fisheropt interface can run here.

Every backend is a module exposing functions named in
:data:`fisheropt.backends.interface.FUNCTIONS` with the reference's exact
signatures, plus ``NAME`` (str), ``array_module`` (``numpy`` or ``cupy``) and
``owns(array) -> bool`` (does this backend operate on this kind of array).

A backend that cannot load is never replaced silently: :func:`get` raises
:class:`BackendUnavailable` with the reason, and :func:`unavailable` lists the
reasons for all of them. A backend that loads but lacks a function (a rule it
has no kernel for yet) is unusable for that function only: :func:`get` with
``function=`` says so, and :func:`functions` lists what each backend has.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

from .._checks import is_cupy_array
from .interface import FUNCTIONS, BackendUnavailable

__all__ = ["available", "unavailable", "get", "select", "functions", "BackendUnavailable", "FUNCTIONS", "KNOWN"]

#: Backend name -> module path; the order is the preference order of ``backend="auto"`` for host arrays.
KNOWN = {
    "numpy": "fisheropt.backends.reference",
    "numba": "fisheropt.backends.numba",
    "cupy": "fisheropt.backends.cupy",
}
_AUTO_PREFERENCE_HOST = ("numba", "numpy")

_loaded: dict[str, ModuleType] = {}
_reasons: dict[str, str] = {}


def _try_load(name: str) -> ModuleType | None:
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        return None
    try:
        module = importlib.import_module(KNOWN[name])
        check = getattr(module, "check_usable", None)
        if check is not None:
            check()  # raises BackendUnavailable with a reason (e.g. no GPU)
    except BackendUnavailable as exc:
        _reasons[name] = str(exc)
        return None
    except ImportError as exc:
        _reasons[name] = f"import failed: {exc}"
        return None
    _loaded[name] = module
    return module


def is_known(name: object) -> bool:
    """Whether ``name`` is a backend name (a str of :data:`KNOWN`; callers may pass anything)."""
    return isinstance(name, str) and name in KNOWN


def available() -> list[str]:
    """Names of the backends that load and can run on this machine ("numpy" always)."""
    return [name for name in KNOWN if _try_load(name) is not None]


def unavailable() -> dict[str, str]:
    """Backend name -> why it cannot be used here."""
    available()
    return dict(_reasons)


def functions(name: str) -> tuple[str, ...]:
    """The interface functions the backend ``name`` implements (empty if it cannot load)."""
    module = _try_load(name) if name in KNOWN else None
    return tuple(f for f in FUNCTIONS if module is not None and callable(getattr(module, f, None)))


def get(name: str, function: str | None = None) -> ModuleType:
    """The backend module called ``name``; a clear error if unknown or unusable
    (for ``function``, when given)."""
    if not is_known(name):
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(KNOWN)}")
    module = _try_load(name)
    if module is None:
        raise BackendUnavailable(f"backend {name!r} is not usable here: {_reasons[name]}")
    if function is not None and not callable(getattr(module, function, None)):
        has = [n for n in KNOWN if function in functions(n)]
        raise BackendUnavailable(f"backend {name!r} has no {function}; backends that have it: {', '.join(has)}")
    return module


def select(name: str, arrays: Iterable[object], function: str | None = None) -> ModuleType:
    """Resolve ``name`` (a backend name or "auto") for the given arrays.

    "auto" picks the cupy backend when the arrays are CuPy arrays, otherwise
    the fastest usable host backend (numba, then the numpy reference) that
    has ``function``. An explicit name is checked against the arrays: a host
    backend given device arrays (or the reverse) is an error, never a silent copy.
    """
    arrays = list(arrays)
    on_device = [is_cupy_array(a) for a in arrays]
    if any(on_device) and not all(on_device):
        raise TypeError("arrays mix CuPy (GPU) and host arrays; put them all on one device")
    device = bool(on_device) and all(on_device)
    if name == "auto":
        if device:
            return get("cupy", function)
        for candidate in _AUTO_PREFERENCE_HOST:
            module = _try_load(candidate)
            if module is not None and (function is None or function in functions(candidate)):
                return module
        raise BackendUnavailable(f"no host backend has {function}")  # the reference has every function
    module = get(name, function)
    for a in arrays:
        if not module.owns(a):
            raise TypeError(
                f"backend {name!r} does not operate on {type(a).__module__}.{type(a).__name__} arrays"
                + ("; use backend='cupy' or 'auto' for CuPy arrays" if device else "")
            )
    return module
