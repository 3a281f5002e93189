"""The backend registry and the one-interface rule: every backend has the reference's signatures."""

import inspect

import numpy as np
import pytest

import fisheropt as fo
from fisheropt.backends import FUNCTIONS


def test_numpy_reference_is_always_available():
    assert "numpy" in fo.backends.available()
    assert fo.backends.get("numpy").NAME == "numpy"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*known backends"):
        fo.backends.get("tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        fo.Adam([np.zeros(3)], backend="tpu")


def test_every_unavailable_backend_says_why():
    for name, reason in fo.backends.unavailable().items():
        assert reason, name
        with pytest.raises(fo.BackendUnavailable, match=name):
            fo.backends.get(name)
    assert set(fo.backends.available()) | set(fo.backends.unavailable()) == set(fo.backends.KNOWN)


def test_explicit_unusable_backend_never_falls_back():
    reasons = fo.backends.unavailable()
    if "cupy" not in reasons:
        pytest.skip("cupy is usable here")
    with pytest.raises(fo.BackendUnavailable, match="cupy"):
        fo.Adam([np.zeros(3)], backend="cupy")


@pytest.mark.parametrize("name", fo.backends.available())
def test_backend_signatures_equal_the_reference(name):
    """The reference has every function of the interface; another backend may lack some (it is then
    unusable for those only: ``backends.functions``), and each one it has takes the reference's signature."""
    reference = fo.backends.get("numpy")
    backend = fo.backends.get(name)
    assert fo.backends.functions("numpy") == FUNCTIONS
    for fn in fo.backends.functions(name):
        assert inspect.signature(getattr(backend, fn)) == inspect.signature(getattr(reference, fn)), fn


def test_auto_picks_a_host_backend_for_numpy_arrays():
    opt = fo.Adam([np.zeros(3)], backend="auto")
    expected = "numba" if "numba" in fo.backends.available() else "numpy"
    assert opt.backend.NAME == expected


def test_installed_backend_packages_give_usable_backends():
    """If numba imports, the numba backend must load: an incomplete backend is a bug, not a skip."""
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    assert "numba" in fo.backends.available(), fo.backends.unavailable().get("numba")
