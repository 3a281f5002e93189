"""The fisheropt.torch benchmark: its comparison implementation is the same rule, and it runs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fisheropt.torch")
from fisheropt.torch import bench  # noqa: E402


def test_foreach_coupled_adam_is_the_rule_of_fisheropt():
    """The torch baseline of the Coupled Adam speed ratio computes what fot.CoupledAdam computes
    (its per-element second moment, averaged over rows, equals fisheropt's per-column one)."""
    rng = np.random.default_rng(0)
    shapes = [(50, 8), (8,), (8, 4)]
    coupled = [True, False, False]
    a = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float64))) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]

    def groups(ps):
        return [
            {"params": [p for p, c in zip(ps, coupled) if c], "coupled": True},
            {"params": [p for p, c in zip(ps, coupled) if not c]},
        ]

    ours = fot.CoupledAdam(groups(a), lr=1e-2, backend="numpy")
    theirs = bench.foreach_coupled_adam_class()(groups(b), lr=1e-2)
    for _ in range(6):
        g = [torch.from_numpy(rng.standard_normal(s)) for s in shapes]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_step_measurement_runs_and_reports_ratios():
    row = bench.measure_steps("adamw", "small", repeats=1, quick=True)
    for key in ("fot_ms", "fo_ms", "fot+finite_ms", "base_ms", "speed_vs_base", "overhead_us_per_tensor"):
        assert np.isfinite(row[key]), key
    assert row["tensors"] == 147 and row["backend"] in ("numba", "numpy")
    assert "| adamw | small | 147 |" in bench.format_step_rows([row])


def test_training_measurement_runs():
    rows, info = bench.measure_training(repeats=1, quick=True, contenders=("fot AdamW", "torch AdamW(fused)"))
    assert [r["optimizer"] for r in rows] == ["fot AdamW", "torch AdamW(fused)"]
    assert rows[1]["vs_torch_fused_adamw"] == pytest.approx(1.0)
    assert info["params_M"] > 0


def test_command_line_builds_without_docstrings(monkeypatch, capsys):
    """Under ``python -OO`` a module's __doc__ is None; ``--help`` must still work."""
    monkeypatch.setattr(bench, "__doc__", None)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "--rules" in capsys.readouterr().out
