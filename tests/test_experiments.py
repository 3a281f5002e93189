"""Every experiment in --quick mode: it writes its report and plots, its metrics are
finite, depend on the seed, and can be recomputed from the outputs it saved (ESimCSE's
checks are in test_esimcse_experiment.py; the PyTorch experiments skip without torch).

Each quick run is done once per module (fixtures) and shared by the checks.
"""

import json
import math
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from fisheropt import (
    experiments,  # noqa: E402
    fisher,  # noqa: E402
)
from fisheropt.refimpl.fadam import fadam_update  # noqa: E402
from fisheropt.refimpl.isotropy import embedding_report  # noqa: E402
from fisheropt.workloads.models import MLP, load_digits_split  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OWN = ("coupled-adam", "ief", "fadam")
TORCH = ("torch-lm", "ief-finetune")


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


@pytest.fixture(scope="module")
def torch_lm(tmp_path_factory):
    pytest.importorskip("torch")
    return _run(tmp_path_factory, "torch-lm")


@pytest.fixture(scope="module")
def ief_finetune(tmp_path_factory):
    pytest.importorskip("torch")
    return _run(tmp_path_factory, "ief-finetune")


def _check_outputs(out, result, n_png):
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# ")
    assert "| " in report and "Quick mode" in report
    assert any(
        word in report for word in ("Agrees with the paper", "Disagrees with the paper", "Inconclusive at this scale")
    )
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


def _runs(rows, name_key):
    """The per-run rows by (name, seed); ``name_key``: the field that names the run's method."""
    return {(r[name_key], r["seed"]): r for r in rows}


def _assert_differ(runs, key, *pairs):
    """``key`` differs between the two runs ((name, seed), (name, seed)) of each pair."""
    for a, b in pairs:
        assert runs[a][key] != runs[b][key], (key, a, b)


def test_registry():
    assert set(OWN) <= set(experiments.EXPERIMENTS)
    for name in OWN:
        assert callable(experiments.get(name).run)
        assert experiments.describe(name)
    with pytest.raises(KeyError):
        experiments.get("no-such-experiment")


@pytest.mark.parametrize(("name", "word"), [("torch-lm", "transformer"), ("ief-finetune", "LoRA")])
def test_torch_experiments_registered(name, word):
    assert experiments.EXPERIMENTS[name] == "fisheropt.experiments." + name.replace("-", "_")
    assert word in experiments.describe(name)


# ---- coupled-adam -------------------------------------------------------------
@pytest.mark.slow
def test_coupled_adam_outputs(coupled):
    out, result = coupled
    report, metrics = _check_outputs(out, result, 4)
    assert "Iso(E)" in report and "cond(E)" in report
    keys = ("val_loss", "isotropy", "mu_norm", "mu_ratio", "condition_number")
    assert _all_finite(result["per_seed"], keys)
    assert {r["optimizer"] for r in result["rows"]} == {"AdamW", "Coupled Adam"}
    for r in result["per_seed"]:
        assert 0 < r["isotropy"] <= 1 and 0 < r["mu_ratio"] <= 1 and r["condition_number"] >= 1
        assert 0 < r["val_loss"] < math.log(400) + 1  # trained, finite, below ~uniform
    assert metrics["verdict"] == json.loads(json.dumps(result["verdict"]))


@pytest.mark.slow
def test_coupled_adam_seeds_differ_and_metrics_recompute(coupled):
    out, result = coupled
    rows = _runs(result["per_seed"], "optimizer")
    _assert_differ(rows, "isotropy", (("AdamW", 0), ("AdamW", 1)), (("AdamW", 0), ("Coupled Adam", 0)))
    _assert_differ(rows, "val_loss", (("AdamW", 0), ("AdamW", 1)))
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
@pytest.mark.slow
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


@pytest.mark.slow
def test_ief_seeds_differ_and_quality_recomputes(ief):
    out, result = ief
    raw = result["raw"]
    q = {(r["seed"], r["epoch"], r["damping"], r["kind"]): r["quality"] for r in raw}
    assert q[(0, 0, 1.0, "EF")] != q[(1, 0, 1.0, "EF")]
    assert q[(0, 2, 1.0, "iEF")] != q[(0, 0, 1.0, "iEF")]  # training changed the model
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
@pytest.mark.slow
def test_fadam_outputs(fadam):
    out, result = fadam
    report, metrics = _check_outputs(out, result, 2)
    assert "ablation: no-clip" in report and "FAdam" in report
    methods = {r["method"] for r in result["rows"]}
    assert {
        "Adam",
        "AdamW",
        "FAdam",
        "ablation: no-clip",
        "ablation: momentum-first",
        "ablation: adamw-decay",
    } == methods
    stable = [r for r in result["runs"] if not r["diverged"]]
    assert _all_finite(stable, ("train_loss", "test_loss", "test_acc"))
    for r in result["runs"]:
        if r["method"] in ("Adam", "AdamW", "FAdam"):
            assert not r["diverged"] and r["test_acc"] > 0.5  # learned something


@pytest.mark.slow
def test_fadam_seeds_differ_and_accuracy_recomputes(fadam):
    out, result = fadam
    runs = _runs(result["runs"], "method")
    _assert_differ(runs, "train_loss", (("FAdam", 0), ("FAdam", 1)), (("Adam", 0), ("FAdam", 0)))
    saved = np.load(out / "final_params.npz")
    X_tr, y_tr, X_te, y_te = load_digits_split(seed=0)
    hidden = experiments.get("fadam").QUICK["hidden"]
    for method in ("Adam", "FAdam", "ablation: adamw-decay"):
        model = MLP(64, hidden, 10, seed=0)
        for i, p in enumerate(model.params):
            p[...] = saved[f"{method}|seed0|{i}"]
        assert model.accuracy(X_te, y_te) == pytest.approx(runs[(method, 0)]["test_acc"])
        assert model.loss(X_tr, y_tr) / len(y_tr) == pytest.approx(runs[(method, 0)]["train_loss"], rel=1e-7)


# ---- torch-lm (PyTorch) ------------------------------------------------------------
@pytest.mark.slow
def test_torch_lm_writes_report_plots_and_metrics(torch_lm):
    out, result = torch_lm
    report, metrics = _check_outputs(out, result, 4)
    assert report.startswith("# ") and "Quick mode" in report and "| fot CoupledAdam |" in report
    assert "import fisheropt.torch as fot" in report
    names = [r["optimizer"] for r in result["rows"]]
    assert names == ["torch AdamW", "fot AdamW", "fot FAdam", "fot CoupledAdam"]
    for r in result["per_seed"]:
        for k in ("val_loss", "isotropy", "mu_ratio", "opt_ms", "step_ms"):
            assert math.isfinite(float(r[k])), (r["optimizer"], k)
    assert metrics["backends"]["fot AdamW"] in ("numba", "numpy")


@pytest.mark.slow
def test_torch_lm_metrics_recompute_and_depend_on_the_seed(torch_lm):
    out, result = torch_lm
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


# ---- ief-finetune (PyTorch) ---------------------------------------------------------
# torch's forward-mode AD scripts its decompositions on first use (torch's own DeprecationWarning)
TORCH_JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
def test_lora_model_trains_only_adapters_and_head():
    torch = pytest.importorskip("torch")
    import fisheropt.torch as fot
    from fisheropt.experiments import ief_finetune

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
    opt = fot.NaturalGradient(model, kind="ief", lr=0.3, params=trainable)
    opt.step(X, y)
    opt.step(X, y)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert model.fc1.B.abs().max() > 0


@pytest.mark.slow
@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
def test_ief_finetune_writes_report_plots_and_metrics(ief_finetune):
    from fisheropt.experiments.ief_finetune import OPTIMIZERS

    out, result = ief_finetune
    report, metrics = _check_outputs(out, result, 3)
    assert report.startswith("# ") and "Quick mode" in report
    for name in OPTIMIZERS:
        assert f"| {name} |" in report
    assert "Damping sweep" in report and "## Verdict" in report and "γ(d)/γ(∇L)" in report
    assert [r["optimizer"] for r in result["rows"]] == list(OPTIMIZERS)
    assert metrics["P"] > 0 and set(metrics["best_lr"]) == set(OPTIMIZERS)
    ief = next(r for r in result["rows"] if r["optimizer"] == "iEF")
    assert math.isfinite(ief["train_loss"]) and 0 < ief["quality"] < 10
    for r in result["runs"]:
        assert r["steps"] > 0 and math.isfinite(r["wall_s"])
    # two seeds, different results
    a, b = (r for r in result["runs"] if r["optimizer"] == "AdamW" and r["lr"] == result["rows"][4]["lr"])
    assert a["seed"] != b["seed"] and a["train_loss"] != b["train_loss"]


HP = dict(t=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1)


def _fadam_inputs(dtype, scale=1.0, seed=0):
    """theta, g, m, f of one tensor; ``scale`` multiplies g (and m, and sqrt(f))."""
    rng = np.random.default_rng(seed)
    theta, g = rng.standard_normal((5, 4)), scale * rng.standard_normal((5, 4))
    m, f = 0.1 * scale * rng.standard_normal((5, 4)), scale**2 * rng.random((5, 4))
    return [a.astype(dtype) for a in (theta, g, m, f)]


def _ablation_written_out(variant, theta, g, m, f, *, t, lr, beta1, beta2, eps, eps2, clip, p, weight_decay):
    """The ablations as the module docstring states them, written out in float64 (spec/fadam.md)."""
    theta, g, m, f = (a.astype(np.float64) for a in (theta, g, m, f))

    def rms(x):
        return np.sqrt(np.mean(x * x))

    def clipped(x):
        return x if variant == "no-clip" else x / max(1.0, rms(x) / clip)

    beta2_hat = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
    f = beta2_hat * f + (1 - beta2_hat) * g * g
    denom = f**p + min(eps, eps2 * rms(g)) ** (2 * p)
    if variant == "momentum-first":
        m = beta1 * m + (1 - beta1) * g
        direction = clipped(m / denom)
    else:
        m = beta1 * m + (1 - beta1) * clipped(g / denom)
        direction = m
    decay = theta if variant == "adamw-decay" else clipped(theta / denom)
    return theta - lr * (direction + weight_decay * decay), m, f


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-36, 0.0])
def test_fadam_unablated_recipe_is_the_reference_bit_for_bit(dtype, scale):
    # scale 1e-36: in float32 the adaptive epsilon is subnormal before the reference's
    # guard; a copy that computes it in float64 and rounds afterwards differs here.
    mod = experiments.get("fadam")
    theta, g, m, f = _fadam_inputs(dtype, scale)
    ref = fadam_update(theta, g, m, f, **HP)
    for same in (mod.fadam_ablation_update(theta, g, m, f, variant=None, **HP), mod.FADAM.update(theta, g, m, f, **HP)):
        for a, b in zip(ref, same):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["no-clip", "momentum-first", "adamw-decay"])
def test_fadam_ablation_variants(variant, dtype):
    mod = experiments.get("fadam")
    assert variant in mod.ABLATIONS
    theta, g, m, f = _fadam_inputs(dtype)
    ref = fadam_update(theta, g, m, f, **HP)
    out = mod.fadam_ablation_update(theta, g, m, f, variant=variant, **HP)
    assert [a.dtype for a in out] == [dtype] * 3
    assert not np.allclose(out[0], ref[0]), variant
    np.testing.assert_array_equal(out[2], ref[2])  # the Fisher EMA is never ablated
    # each ablation is its own recipe: the reference with exactly one block swapped
    recipe = mod.RECIPES[variant]
    assert (
        sum(getattr(recipe, field) is not getattr(mod.FADAM, field) for field in ("clipped", "direction", "decay")) == 1
    )
    for a, b in zip(out, recipe.update(theta, g, m, f, **HP)):
        np.testing.assert_array_equal(a, b)
    # and it computes what its description says
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    for a, b in zip(out, _ablation_written_out(variant, theta, g, m, f, **HP)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    # the minimal optimizer applies it in place and keeps the dtype
    params = [theta.copy()]
    opt = mod.FAdamAblation(params, variant, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]))
    opt.step([g])
    assert params[0].dtype == dtype and opt.m[0].dtype == dtype and opt.f[0].dtype == dtype
    first = mod.fadam_ablation_update(theta, g, np.zeros_like(m), np.zeros_like(f), variant=variant, **dict(HP, t=1))
    np.testing.assert_array_equal(params[0], first[0])


def test_fadam_ablation_rejects_unknown_variant_and_decays_like_adamw():
    mod = experiments.get("fadam")
    theta, g, m, f = _fadam_inputs(np.float64)
    with pytest.raises(ValueError):
        mod.fadam_ablation_update(theta, g, m, f, variant="nope", **HP)
    # adamw-decay: decay term is λθ, unpreconditioned
    no_decay = dict(HP, weight_decay=0.0)
    a = mod.fadam_ablation_update(theta, g, m, f, variant="adamw-decay", **HP)[0]
    b = mod.fadam_ablation_update(theta, g, m, f, variant="adamw-decay", **no_decay)[0]
    np.testing.assert_allclose(b - a, HP["lr"] * HP["weight_decay"] * theta)


# ---- the demo (fisheropt/demo.py, beside the experiments) -----------------------------
def test_demo_covers_every_rule_and_every_direction():
    from fisheropt import demo
    from fisheropt.refimpl import RULES

    assert [demo.ADAPTIVE[rule.title] for rule in RULES.values()] == list(RULES.values())
    assert sorted(demo.NGD.values()) == sorted(fisher.KINDS) and "NGD-exact" in demo.METHODS
    assert set(demo.METHODS) == set(demo.ADAPTIVE) | set(demo.NGD)
    model = MLP(64, 4, 10, seed=0)
    for rule in RULES.values():
        opt = demo.make_optimizer(rule, [p.copy() for p in model.params], "numpy")
        assert type(opt).__name__ == rule.title
        assert opt.hyperparams == {**rule.defaults(), "lr": demo.ADAPTIVE_LR}
        if rule.tensor_flag is not None:  # W1 flagged (pixels as the vocabulary), nothing else
            assert getattr(opt, rule.tensor_flag.name) == (True, False, False, False)
            assert any(note.startswith(rule.title) and "W1" in note for note in demo.method_notes())


@pytest.mark.slow
def test_demo_prints_its_table_before_plotting(tmp_path, monkeypatch, capsys):
    from fisheropt import demo
    from fisheropt.experiments import _common

    def no_matplotlib():
        raise ImportError("plots need matplotlib")

    monkeypatch.setattr(_common, "pyplot", no_matplotlib)
    monkeypatch.setattr(demo, "QUICK", dict(hidden=4, batch=64, epochs=1, n_train=128))
    result = demo.run(quick=True, out_dir=tmp_path, verbose=True)
    printed = capsys.readouterr().out
    assert result["plots"] == [] and "No plots: plots need matplotlib" in printed
    table = printed[: printed.index("No plots")]
    for method in demo.METHODS:
        assert method in table
    assert {(r["method"], r["backend"]) for r in result["rows"]} == {
        (m, b) for m in demo.METHODS for b in result["backends"]
    }
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert all(method in report for method in demo.METHODS) and ".png" not in report
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))


def test_progress_without_tqdm_is_the_bare_loop_and_a_silent_bar(monkeypatch):
    """tqdm is optional: without it the loops run bare and the hand-advanced bars do nothing."""
    from fisheropt.experiments import _common

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the import now raises ImportError
    items = [1, 2, 3]
    assert _common.progress(items) is items
    bar = _common.progress_bar(3, desc="x")
    assert not hasattr(bar, "n")  # not a tqdm bar
    bar.update(1)
    bar.close()
