"""Shared test configuration: Hypothesis profiles, backend parametrisation, GPU skips."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fisheropt as fo

# "ci" keeps the suite inside CI's budget on 2 cores; "dev" explores more.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("FISHEROPT_HYPOTHESIS_PROFILE", "ci"))

HOST_BACKENDS = ("numpy", "numba")


def host_backend_params():
    """pytest params for each host backend; unavailable ones skip with the registry's reason."""
    reasons = fo.backends.unavailable()
    return [
        pytest.param(name, marks=pytest.mark.skipif(name in reasons, reason=f"{name}: {reasons.get(name)}"))
        for name in HOST_BACKENDS
    ]


def gpu_skip_reason():
    """None when the cupy backend can run here, else why not."""
    return fo.backends.unavailable().get("cupy")


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: cupy backend unavailable here ({reason})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
