"""fisheropt.bench: the ceiling crosses the same buffers as the step, and rows come out whole;
fisheropt/bench_ceiling.py stands alone, as the asv benchmarks load it against old commits; the GPU
benchmarks (asv_bench/benchmarks/bench_gpu.py, asv_bench/gpu_validate.py) import without CuPy and take
their rules, hyperparameters, state and bytes from the registry (their pure-Python parts, run here)."""

import dataclasses
import importlib.util
import inspect
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fisheropt as fo
from fisheropt import bench, bench_ceiling, refimpl
from fisheropt.refimpl import RULES


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


# ---- asv_bench/benchmarks/bench_gpu.py and asv_bench/gpu_validate.py, without a GPU ---------------
REPO = Path(__file__).resolve().parents[1]
ASV_BENCH = REPO / "asv_bench"


def _load(path: Path, name: str, monkeypatch):
    """The script at ``path`` as module ``name`` (in sys.modules until the test ends), with every
    import of CuPy failing: asv discovers the GPU benchmarks on machines without it."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_gpu(monkeypatch):
    return _load(ASV_BENCH / "benchmarks" / "bench_gpu.py", "bench_gpu", monkeypatch)


@pytest.fixture
def gpu_validate(bench_gpu, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts asv_bench/benchmarks first
    return _load(ASV_BENCH / "gpu_validate.py", "gpu_validate", monkeypatch)  # its bench_gpu: the one above


def _small_shapes(rule):
    """A few shapes ``rule`` steps: V×d matrices only where it has a tensor flag."""
    return [(6, 4), (3, 8)] if RULES[rule].tensor_flag is not None else [(6, 4), (5,), (3, 8)]


def test_gpu_benchmarks_cover_every_rule_with_a_cupy_kernel(bench_gpu, gpu_validate):
    with_kernel = [name for name in RULES if (REPO / "backends" / "cupy" / f"{name}.py").is_file()]
    assert "lion" in with_kernel
    assert bench_gpu.gpu_rules() == with_kernel
    assert bench_gpu.GPUUpdateRules.params == (with_kernel, ["large", "transformer"])
    assert gpu_validate.B is bench_gpu


def test_gpu_benchmark_hyperparameters_are_the_step_functions_keywords(bench_gpu):
    """Exactly the keywords of the reference step (the backend interface), from the descriptor's
    defaults; the deliberate overrides name real hyperparameters."""
    for name, overrides in bench_gpu.OVERRIDES.items():
        assert set(overrides) <= set(RULES[name].defaults()), name
    for name in bench_gpu.gpu_rules():
        rule = RULES[name]
        keywords = [
            p.name
            for p in inspect.signature(getattr(refimpl, rule.step_function)).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        hp = bench_gpu.kernel_hyperparams(name)
        flags = bench_gpu.tensor_flags(name, 3)
        assert ["step", *hp, *flags] == keywords, name
        assert hp == rule.kernel_kwargs({**rule.defaults(), **bench_gpu.OVERRIDES.get(name, {})}), name
        if rule.tensor_flag is not None:
            assert flags == {rule.tensor_flag.name: [True] * 3}


def test_gpu_benchmark_problem_has_the_reference_state_layout(bench_gpu):
    """make_problem's state (run with NumPy) is what the optimizer class allocates for the same
    params and flags, in the step function's order; a step on it runs on the reference backend."""
    for name in bench_gpu.gpu_rules():
        rule = RULES[name]
        shapes = _small_shapes(name)
        params, grads, *state = bench_gpu.make_problem(name, shapes, xp=np)
        assert [p.shape for p in params] == [g.shape for g in grads] == shapes
        kw = {**bench_gpu.OVERRIDES.get(name, {}), **bench_gpu.tensor_flags(name, len(shapes))}
        opt = getattr(fo, rule.title)(params, backend="numpy", **kw)
        assert len(state) == len(rule.state) == len(opt.state), name
        for spec, arrays in zip(rule.state, state):
            expected = opt.state[spec.name]
            assert [(a.shape, a.dtype) for a in arrays] == [(e.shape, e.dtype) for e in expected], (name, spec.name)
            assert all(not a.any() for a in arrays)

        # two steps of make_step's call on the reference backend = two steps of the optimizer
        # class with the descriptor's defaults (and the overrides), from the same problem
        step = bench_gpu.make_step(name, shapes, backend="numpy", xp=np)
        step()
        step()
        stepped = inspect.getclosurevars(step).nonlocals
        for _ in range(2):
            opt.step(grads)
        assert all(np.array_equal(a, b) for a, b in zip(stepped["params"], opt.params)), name
        assert not any(
            np.array_equal(a, b) for a, b in zip(stepped["params"], bench_gpu.make_problem(name, shapes, xp=np)[0])
        )
        for spec, arrays in zip(rule.state, stepped["state"]):
            assert all(np.array_equal(a, b) for a, b in zip(arrays, opt.state[spec.name])), (name, spec.name)


def test_gpu_benchmark_cases_and_bytes_come_from_the_registry(bench_gpu):
    for name in bench_gpu.gpu_rules():
        rule = RULES[name]
        for case in ("large", "transformer"):
            shapes = bench_gpu.case_shapes(case, name)
            if rule.tensor_flag is not None:
                assert shapes and all(len(s) == 2 and s[0] >= 1 for s in shapes)
            else:
                assert shapes == bench_gpu.case_shapes(case)
            n = sum(math.prod(s) for s in shapes)
            assert bench_gpu.step_bytes(name, shapes) == rule.items_per_element * 4 * n
        assert sum(math.prod(s) for s in bench_gpu.case_shapes("large", name)) == bench_gpu.LARGE
    assert len(bench_gpu.case_shapes("transformer")) == 148
    with pytest.raises(ValueError, match="unknown case"):
        bench_gpu.case_shapes("huge")


def test_gpu_validate_report_has_a_row_per_rule_and_torch_targets_where_torch_has_one(gpu_validate, monkeypatch):
    """gpu_validate's table and targets from made-up timings (no GPU): every rule of bench_gpu's
    list in both cases, bytes from the registry, and no torch comparison for the rules without one."""
    B = gpu_validate.B
    monkeypatch.setattr(B, "copy_gbps", lambda *a, **k: 100.0)
    monkeypatch.setattr(B, "fo_step_ms", lambda rule, shapes, **k: 1.0)
    monkeypatch.setattr(B, "torch_fused_ms", lambda shapes, *, decoupled, **k: 2.0 if decoupled else None)
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    rows, copy = gpu_validate.benchmarks(types.SimpleNamespace(get_default_memory_pool=lambda: pool), quick=True)

    assert copy == 100.0
    assert [(r["case"], r["rule"]) for r in rows] == [
        (case, name) for case in ("2^27 x1", "transformer x148") for name in B.gpu_rules()
    ]
    for r in rows:
        assert r["bytes_per_param"] == RULES[r["rule"]].items_per_element * 4
        assert r["GB/s"] == pytest.approx(r["bytes_per_param"] * r["params"] / 1e-3 / 1e9)
        assert r["torch_fused_ms"] == (2.0 if r["rule"] == "adamw" else None)  # Adam: no CUDA torch here
        assert r["speedup_vs_torch_fused"] == (2.0 if r["rule"] == "adamw" else None)

    goals = gpu_validate.targets(rows)
    torch_goals = [(text, ok) for text, ok in goals if "torch fused" in text]
    assert len(torch_goals) == 2 * len(B.TORCH_FUSED)
    assert {text.split()[0] for text, _ in torch_goals} == set(B.TORCH_FUSED)
    assert {ok for text, ok in torch_goals if text.startswith("adam ")} == {None}  # reported n/a
    assert sum("copy bandwidth" in text for text, _ in goals) == len(B.gpu_rules())

    info = dict.fromkeys(("device", "compute_capability", "memory_GiB", "cupy", "cuda_runtime", "cuda_driver"), "x")
    gpu_validate.print_table(info, rows, copy)  # formats a row without torch figures


def test_gpu_validate_help_runs_without_cupy(gpu_validate, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_validate.main(["--help"])
    assert exit_.value.code == 0 and "--strict" in capsys.readouterr().out
