"""fisheropt.bench: the ceiling crosses the same buffers as the step, and rows come out whole;
fisheropt/bench_ceiling.py stands alone, as the asv benchmarks load it against old commits."""

import dataclasses
import importlib.util
import math
import sys

import numpy as np
import pytest

import fisheropt as fo
from fisheropt import bench, bench_ceiling


def _same(xs, ys):
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys))


def test_ceiling_buffers_cover_params_grads_and_state():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    grads = [np.ones_like(p) for p in params]

    a, b = bench_ceiling.ceiling_buffers(params, grads)  # no optimizer: params and grads only
    assert _same(a, params) and _same(b, grads)

    opt = fo.FAdam(params, backend="numpy")
    a, b = bench_ceiling.ceiling_buffers(params, grads, opt.state)  # m += 0*f over the state as well
    assert _same(a, params + list(opt.state["m"])) and _same(b, grads + list(opt.state["f"]))

    coupled = fo.CoupledAdam(params[:1], coupled=[True], backend="numpy")
    a, b = bench_ceiling.ceiling_buffers(params[:1], grads[:1], coupled.state)  # v is per column: m pairs with g
    assert _same(a, params[:1] + list(coupled.state["m"])) and _same(b, grads[:1] + grads[:1])


def test_measure_problem_gives_finite_ratios():
    pytest.importorskip("numba")
    rows = bench.measure_problem("fadam", 1 << 12, ["numba"], np.float32, 2, torch_baselines=False)
    (row,) = rows
    assert row["backend"] == "numba" and row["tensors"] == 1
    for key in ("ms_per_step", "gbs", "ceiling_gbs", "ratio_to_ceiling", "ms_per_step_with_finite_check"):
        assert math.isfinite(row[key]) and row[key] > 0, key


def test_bench_ceiling_loads_by_path_without_fisheropt(monkeypatch):
    """The asv benchmarks load the working tree's file by path at every commit of the history,
    including commits without it: it must import nothing from fisheropt."""
    pytest.importorskip("numba")
    monkeypatch.setitem(sys.modules, "fisheropt", None)  # any import of fisheropt now fails
    spec = importlib.util.spec_from_file_location("bench_ceiling_alone", bench_ceiling.__file__)
    alone = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_ceiling_alone", alone)
    spec.loader.exec_module(alone)

    rng = np.random.default_rng(1)
    a = [rng.standard_normal(n).astype(np.float32) for n in (5, 70_000, 3)] + [np.ones(4)]
    b = [rng.standard_normal(x.shape).astype(x.dtype) for x in a]
    before = [x.copy() for x in a]
    run, nbytes = alone.ceiling_on(a, b, chunk=1 << 10)  # several chunks per tensor, two dtypes
    run()
    assert nbytes == 3 * (4 * (5 + 70_000 + 3) + 8 * 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, before))  # a += 0*b leaves a as it was
    run, _ = alone.ceiling_on(a, b, scale=1.0, chunk=1 << 10)
    run()
    assert all(np.array_equal(x, y + z) for x, y, z in zip(a, before, b))  # every element, once


def test_parser_builds_without_docstrings(monkeypatch):
    """Under ``python -OO`` a module's __doc__ is None; the command line must still build."""
    monkeypatch.setattr(bench, "__doc__", None)
    assert bench.build_parser().parse_args(["--sizes", "2^10"]).sizes == [1 << 10]


def test_moved_bytes_names_a_missing_unflagged_count(monkeypatch):
    """A rule with a tensor flag but no byte count for its unflagged tensors: a clear error."""
    flagged = next(name for name, rule in bench.REGISTRY.items() if rule.tensor_flag is not None)
    rule = dataclasses.replace(bench.REGISTRY[flagged], items_per_element_unflagged=None)
    monkeypatch.setitem(bench.REGISTRY, flagged, rule)
    assert bench.moved_bytes(flagged, [(4, 3)], [True], 4) == 12 * rule.items_per_element * 4
    with pytest.raises(ValueError, match="items_per_element_unflagged"):
        bench.moved_bytes(flagged, [(4, 3)], [False], 4)
