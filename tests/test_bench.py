"""fisheropt.bench: the ceiling crosses the same buffers as the step, and rows come out whole."""

import math

import numpy as np
import pytest

import fisheropt as fo
from fisheropt import bench


def _same(xs, ys):
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys))


def test_ceiling_buffers_cover_params_grads_and_state():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    grads = [np.ones_like(p) for p in params]

    a, b = bench.ceiling_buffers(params, grads)  # no optimizer: params and grads only
    assert _same(a, params) and _same(b, grads)

    opt = fo.FAdam(params, backend="numpy")
    a, b = bench.ceiling_buffers(params, grads, opt)  # m += 0*f over the state as well
    assert _same(a, params + list(opt.state["m"])) and _same(b, grads + list(opt.state["f"]))

    coupled = fo.CoupledAdam(params[:1], coupled=[True], backend="numpy")
    a, b = bench.ceiling_buffers(params[:1], grads[:1], coupled)  # v is per column: m pairs with g
    assert _same(a, params[:1] + list(coupled.state["m"])) and _same(b, grads[:1] + grads[:1])


def test_measure_problem_gives_finite_ratios():
    pytest.importorskip("numba")
    rows = bench.measure_problem("fadam", 1 << 12, ["numba"], np.float32, 2, torch_baselines=False)
    (row,) = rows
    assert row["backend"] == "numba" and row["tensors"] == 1
    for key in ("ms_per_step", "gbs", "ceiling_gbs", "ratio_to_ceiling", "ms_per_step_with_finite_check"):
        assert math.isfinite(row[key]) and row[key] > 0, key
