"""Every experiment in --quick mode: it writes its report and plots, its metrics are
finite, depend on the seed, and can be recomputed from the outputs it saved.

Each quick run is done once per module (fixtures) and shared by the checks.
"""
import json
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from fisheropt import experiments  # noqa: E402
from fisheropt import fisher  # noqa: E402
from fisheropt.refimpl.fadam import fadam_update  # noqa: E402
from fisheropt.refimpl.isotropy import embedding_report  # noqa: E402
from fisheropt.refimpl.models import MLP, load_digits_split  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OWN = ("coupled-adam", "ief", "fadam")


def _run(tmp_path_factory, name, seed=0):
    out = tmp_path_factory.mktemp(name.replace("-", "_"))
    result = experiments.run(name, quick=True, out_dir=out, seed=seed)
    return out, result


@pytest.fixture(scope="module")
def coupled(tmp_path_factory):
    return _run(tmp_path_factory, "coupled-adam")


@pytest.fixture(scope="module")
def ief(tmp_path_factory):
    return _run(tmp_path_factory, "ief")


@pytest.fixture(scope="module")
def fadam(tmp_path_factory):
    return _run(tmp_path_factory, "fadam")


def _check_outputs(out, result, n_png):
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# ")
    assert "| " in report and "Quick mode" in report
    assert any(word in report for word in ("Agrees with the paper", "Disagrees with the paper",
                                           "Inconclusive at this scale"))
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= n_png
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    assert set(result["plots"]) <= {str(p) for p in pngs}
    assert result["rows"] and isinstance(result["summary"], str)
    metrics = json.loads((out / "metrics.json").read_text())
    return report, metrics


def _all_finite(rows, keys):
    return all(math.isfinite(float(r[k])) for r in rows for k in keys)


def test_registry():
    assert set(OWN) <= set(experiments.EXPERIMENTS)
    for name in OWN:
        assert callable(experiments.get(name).run)
        assert experiments.describe(name)
    with pytest.raises(KeyError):
        experiments.get("no-such-experiment")


# ---- coupled-adam -------------------------------------------------------------
def test_coupled_adam_outputs(coupled):
    out, result = coupled
    report, metrics = _check_outputs(out, result, 4)
    assert "Iso(E)" in report and "cond(E)" in report
    keys = ("val_loss", "isotropy", "mu_norm", "mu_ratio", "condition_number")
    assert _all_finite(result["per_seed"], keys)
    assert {r["optimizer"] for r in result["rows"]} == {"AdamW", "Coupled Adam"}
    for r in result["per_seed"]:
        assert 0 < r["isotropy"] <= 1 and 0 < r["mu_ratio"] <= 1 and r["condition_number"] >= 1
        assert 0 < r["val_loss"] < math.log(400) + 1   # trained, finite, below ~uniform
    assert metrics["verdict"] == json.loads(json.dumps(result["verdict"]))


def test_coupled_adam_seeds_differ_and_metrics_recompute(coupled):
    out, result = coupled
    rows = {(r["optimizer"], r["seed"]): r for r in result["per_seed"]}
    assert rows[("AdamW", 0)]["isotropy"] != rows[("AdamW", 1)]["isotropy"]
    assert rows[("AdamW", 0)]["val_loss"] != rows[("AdamW", 1)]["val_loss"]
    assert rows[("AdamW", 0)]["isotropy"] != rows[("Coupled Adam", 0)]["isotropy"]
    saved = np.load(out / "embeddings.npz")
    for (opt, seed), row in rows.items():
        rep = embedding_report(saved[f"{opt.replace(' ', '_')}_seed{seed}"])
        for key in ("isotropy", "mu_norm", "mu_ratio", "condition_number"):
            assert rep[key] == pytest.approx(row[key], rel=1e-7)
    # the summary table is the mean of the per-seed rows
    for srow in result["rows"]:
        vals = [r["isotropy"] for r in result["per_seed"] if r["optimizer"] == srow["optimizer"]]
        assert srow["isotropy"] == pytest.approx(np.mean(vals))


# ---- ief ------------------------------------------------------------------------
def test_ief_outputs(ief):
    out, result = ief
    report, metrics = _check_outputs(out, result, 3)
    assert "iEF" in report and "by damping" in report
    raw = result["raw"]
    assert {r["kind"] for r in raw} == {"exact", "iEF", "SF", "EF"}
    assert _all_finite(raw, ("quality",))
    assert all(r["quality"] > 0 for r in raw)
    # the exact natural gradient is (near) optimal: never worse than any approximation
    cells = {}
    for r in raw:
        cells.setdefault((r["seed"], r["epoch"], r["damping"]), {})[r["kind"]] = r["quality"]
    for c in cells.values():
        assert c["exact"] <= min(c["EF"], c["SF"], c["iEF"]) * (1 + 1e-6)


def test_ief_seeds_differ_and_quality_recomputes(ief):
    out, result = ief
    raw = result["raw"]
    q = {(r["seed"], r["epoch"], r["damping"], r["kind"]): r["quality"] for r in raw}
    assert q[(0, 0, 1.0, "EF")] != q[(1, 0, 1.0, "EF")]
    assert q[(0, 2, 1.0, "iEF")] != q[(0, 0, 1.0, "iEF")]          # training changed the model
    # Recompute the epoch-0 EF and iEF qualities of seed 1 from the saved probe batch.
    ief_mod = experiments.get("ief")
    X_tr, y_tr, _, _ = load_digits_split(seed=0)
    idx = np.load(out / "eval_batches.npz")["seed1"]
    model = MLP(64, ief_mod.QUICK["hidden"], 10, seed=1)
    stats = ief_mod.batch_stats(model, X_tr[idx], y_tr[idx], np.random.default_rng(0))
    for kind in ("EF", "iEF", "exact"):
        d = ief_mod.direction(kind, stats, 1.0)
        value = fisher.relative_quality(d, stats["F"], stats["grad"])
        assert value == pytest.approx(q[(1, 0, 1.0, kind)], rel=1e-7)


# ---- fadam ------------------------------------------------------------------------
def test_fadam_outputs(fadam):
    out, result = fadam
    report, metrics = _check_outputs(out, result, 2)
    assert "ablation: no-clip" in report and "FAdam" in report
    methods = {r["method"] for r in result["rows"]}
    assert {"Adam", "AdamW", "FAdam", "ablation: no-clip", "ablation: momentum-first",
            "ablation: adamw-decay"} == methods
    stable = [r for r in result["runs"] if not r["diverged"]]
    assert _all_finite(stable, ("train_loss", "test_loss", "test_acc"))
    for r in result["runs"]:
        if r["method"] in ("Adam", "AdamW", "FAdam"):
            assert not r["diverged"] and r["test_acc"] > 0.5     # learned something


def test_fadam_seeds_differ_and_accuracy_recomputes(fadam):
    out, result = fadam
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    assert runs[("FAdam", 0)]["train_loss"] != runs[("FAdam", 1)]["train_loss"]
    assert runs[("Adam", 0)]["train_loss"] != runs[("FAdam", 0)]["train_loss"]
    saved = np.load(out / "final_params.npz")
    X_tr, y_tr, X_te, y_te = load_digits_split(seed=0)
    hidden = experiments.get("fadam").QUICK["hidden"]
    for method in ("Adam", "FAdam", "ablation: adamw-decay"):
        model = MLP(64, hidden, 10, seed=0)
        for i, p in enumerate(model.params):
            p[...] = saved[f"{method}|seed0|{i}"]
        assert model.accuracy(X_te, y_te) == pytest.approx(runs[(method, 0)]["test_acc"])
        assert model.loss(X_tr, y_tr) / len(y_tr) == pytest.approx(runs[(method, 0)]["train_loss"], rel=1e-7)


def test_fadam_ablation_variants():
    mod = experiments.get("fadam")
    rng = np.random.default_rng(0)
    theta, g = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    m, f = 0.1 * rng.standard_normal((5, 4)), rng.random((5, 4))
    hp = dict(t=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1)
    ref = fadam_update(theta, g, m, f, **hp)
    same = mod.fadam_ablation_update(theta, g, m, f, variant=None, **hp)
    for a, b in zip(ref, same):
        np.testing.assert_array_equal(a, b)
    for variant in mod.ABLATIONS:
        out = mod.fadam_ablation_update(theta, g, m, f, variant=variant, **hp)
        assert not np.allclose(out[0], ref[0]), variant
        np.testing.assert_array_equal(out[2], ref[2])      # the Fisher EMA is never ablated
    with pytest.raises(ValueError):
        mod.fadam_ablation_update(theta, g, m, f, variant="nope", **hp)
    # adamw-decay: decay term is λθ, unpreconditioned
    no_decay = dict(hp, weight_decay=0.0)
    a = mod.fadam_ablation_update(theta, g, m, f, variant="adamw-decay", **hp)[0]
    b = mod.fadam_ablation_update(theta, g, m, f, variant="adamw-decay", **no_decay)[0]
    np.testing.assert_allclose(b - a, hp["lr"] * hp["weight_decay"] * theta)
