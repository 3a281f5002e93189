"""The ief-finetune experiment in --quick mode: report, plots, metrics; LoRA trains only the adapters."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
# torch's forward-mode AD scripts its decompositions on first use (torch's own DeprecationWarning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from fisheropt import experiments  # noqa: E402
from fisheropt.experiments import ief_finetune  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ief_finetune")
    return out, experiments.run("ief-finetune", quick=True, out_dir=out, seed=0)


def test_registered():
    assert experiments.EXPERIMENTS["ief-finetune"] == "fisheropt.experiments.ief_finetune"
    assert "LoRA" in experiments.describe("ief-finetune")


def test_lora_model_trains_only_adapters_and_head():
    cfg = ief_finetune.QUICK
    data = ief_finetune.load_tasks()
    MLP, _ = ief_finetune.model_classes()
    torch.manual_seed(0)
    backbone = MLP(64, cfg["hidden"], 5)
    model, trainable = ief_finetune.finetune_model(cfg, backbone, seed=0)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    X, y = data["fine"][0][:32], data["fine"][1][:32]
    with torch.no_grad():
        torch.testing.assert_close(model.fc1(X), backbone.fc1(X))  # B = 0: starts as the pretrained layer
    import fisheropt.torch as fot

    opt = fot.NaturalGradient(model, kind="ief", lr=0.3, params=trainable)
    opt.step(X, y)
    opt.step(X, y)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert model.fc1.B.abs().max() > 0


@pytest.mark.slow
def test_quick_run_writes_report_plots_and_metrics(quick):
    out, result = quick
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# ") and "Quick mode" in report
    for name in ief_finetune.OPTIMIZERS:
        assert f"| {name} |" in report
    assert "Damping sweep" in report and "## Verdict" in report and "γ(d)/γ(∇L)" in report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 3 and set(result["plots"]) <= {str(p) for p in pngs}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["optimizer"] for r in result["rows"]] == list(ief_finetune.OPTIMIZERS)
    assert metrics["P"] > 0 and set(metrics["best_lr"]) == set(ief_finetune.OPTIMIZERS)
    ief = next(r for r in result["rows"] if r["optimizer"] == "iEF")
    assert math.isfinite(ief["train_loss"]) and 0 < ief["quality"] < 10
    for r in result["runs"]:
        assert r["steps"] > 0 and math.isfinite(r["wall_s"])
    # two seeds, different results
    a, b = (r for r in result["runs"] if r["optimizer"] == "AdamW" and r["lr"] == result["rows"][4]["lr"])
    assert a["seed"] != b["seed"] and a["train_loss"] != b["train_loss"]
