"""The torch-lm experiment in --quick mode: report, plots, metrics that recompute from its outputs."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from fisheropt import experiments  # noqa: E402
from fisheropt.refimpl.isotropy import embedding_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_lm")
    return out, experiments.run("torch-lm", quick=True, out_dir=out, seed=0)


def test_registered():
    assert "torch-lm" in experiments.EXPERIMENTS
    assert "transformer" in experiments.describe("torch-lm")


@pytest.mark.slow
def test_quick_run_writes_report_plots_and_metrics(quick):
    out, result = quick
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# ") and "Quick mode" in report and "| fot CoupledAdam |" in report
    assert "import fisheropt.torch as fot" in report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 4 and set(result["plots"]) <= {str(p) for p in pngs}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    metrics = json.loads((out / "metrics.json").read_text())
    names = [r["optimizer"] for r in result["rows"]]
    assert names == ["torch AdamW", "fot AdamW", "fot FAdam", "fot CoupledAdam"]
    for r in result["per_seed"]:
        for k in ("val_loss", "isotropy", "mu_ratio", "opt_ms", "step_ms"):
            assert math.isfinite(float(r[k])), (r["optimizer"], k)
    assert metrics["backends"]["fot AdamW"] in ("numba", "numpy")


@pytest.mark.slow
def test_quick_run_metrics_recompute_and_depend_on_the_seed(quick):
    out, result = quick
    E = np.load(out / "embeddings.npz")
    for r in result["per_seed"]:
        key = f"{r['optimizer'].replace(' ', '_')}_seed{r['seed']}"
        rep = embedding_report(E[key])
        assert rep["isotropy"] == pytest.approx(r["isotropy"], rel=1e-9)
        assert rep["mu_ratio"] == pytest.approx(r["mu_ratio"], rel=1e-9)
    a = E["fot_CoupledAdam_seed0"]
    b = E["fot_CoupledAdam_seed1"]
    assert a.shape == b.shape and not np.array_equal(a, b)
    # torch.optim.AdamW(fused=True) and fisheropt.torch.AdamW: the same rule, the same run
    gap = result["verdict"]["max_val_loss_gap_fot_vs_torch_adamw"]
    assert gap < 1e-3
    d = np.abs(E["torch_AdamW_seed0"] - E["fot_AdamW_seed0"]).max()
    assert d < 1e-4
