"""`fisheropt experiment esimcse --quick --out DIR`: the report, plots and metrics it writes."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fisheropt import cli, experiments  # noqa: E402
from fisheropt.workloads import esimcse_encoder as enc  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("esimcse_quick")
    assert cli.main(["experiment", "esimcse", "--quick", "--out", str(out)]) == 0
    return out


def test_registered():
    assert experiments.EXPERIMENTS["esimcse"] == "fisheropt.experiments.esimcse"
    assert "ESimCSE" in experiments.describe("esimcse")


@pytest.mark.slow
def test_quick_run_writes_report_plots_and_metrics(quick_run, capsys):
    out = quick_run
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# ") and "Quick mode" in report
    for needle in ("neg gap ≤3−>3", "length R²", "align", "uniform", "Iso(E)", "cond(E)", "topic AUC"):
        assert needle in report, needle
    assert ("Agrees with the paper" in report) or ("Disagrees with the paper" in report)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"length_bias_negatives.png", "length_bias_positives.png", "align_uniform.png"} <= set(pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["per_seed"]
    assert {(r["method"], r["optimizer"]) for r in rows} == {
        (m, o) for m in ("SimCSE", "ESimCSE") for o in ("Adam", "FAdam", "Coupled Adam")
    }
    for r in rows:
        for key in ("train_loss", "topic_auc", "neg_gap", "len_r2", "align", "uniform", "tok_iso", "sent_iso"):
            assert math.isfinite(float(r[key])), key
        assert 0 < r["tok_iso"] <= 1 and 0 < r["sent_iso"] <= 1
        assert 0 <= r["align"] <= 4 and r["uniform"] <= 0  # unit vectors: ‖u−v‖² ∈ [0, 4]
        assert 0 <= r["topic_auc"] <= 1
    # optimizers and methods change the outcome (nothing silently shared between runs)
    assert len({round(r["train_loss"], 12) for r in rows}) == len(rows)


def test_train_one_esimcse_fills_queue_and_moves_momentum_encoder(monkeypatch):
    mod = experiments.get("esimcse")
    rng = np.random.default_rng(0)
    train = [rng.integers(2, 30, size=n) for n in rng.integers(5, 20, size=40)]
    cfg = dict(mod.QUICK, steps=6, evals=1, batch=8)
    seen = {}
    real_ema = None

    import fisheropt.backends.reference as ref_backend

    real_ema = ref_backend.ema_update

    def spy(targets, sources, *, decay):
        seen["decay"] = decay
        seen["calls"] = seen.get("calls", 0) + 1
        real_ema(targets, sources, decay=decay)

    monkeypatch.setattr(mod.fo.backends.reference, "ema_update", spy, raising=True)
    monkeypatch.setattr(mod, "_make_optimizer", lambda name, params: mod.fo.Adam(params, lr=1e-3, backend="numpy"))
    params, _, backend = mod.train_one("ESimCSE", "Adam", cfg, 0, train, 30)
    assert backend == "numpy" and seen == {"decay": 0.995, "calls": 6}
    params2, _, _ = mod.train_one("SimCSE", "Adam", cfg, 0, train, 30)
    assert seen["calls"] == 6  # SimCSE has no momentum encoder
    assert not np.array_equal(params[0], params2[0])
    assert all(p.dtype == mod.DTYPE for p in params) and len(params) == len(enc.COUPLED)


def test_epoch_batches_and_queue_masking(monkeypatch):
    mod = experiments.get("esimcse")
    gen = mod._epoch_batches(10, 3, np.random.default_rng(0))
    epoch = np.concatenate([next(gen) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # no repeats within an epoch

    rng = np.random.default_rng(1)
    train = [rng.integers(2, 30, size=n) for n in rng.integers(5, 12, size=16)]
    cfg = dict(mod.QUICK, steps=3, evals=1, batch=8)  # queue of 20 rows, 2 batches per epoch
    seen = []
    real = mod.info_nce_with_grad

    def spy(h, hp, negatives=None, **kw):
        seen.append(0 if negatives is None else len(negatives))
        return real(h, hp, negatives, **kw)

    monkeypatch.setattr(mod, "info_nce_with_grad", spy)
    mod.train_one("ESimCSE", "Adam", cfg, 0, train, 30)
    mod.train_one("ESimCSE, unmasked queue", "Adam", cfg, 0, train, 30)
    mod.train_one("SimCSE", "Adam", cfg, 0, train, 30)
    # step 2 starts a new epoch: all 8 anchors are in the 16-row queue; masked, 8 rows remain
    assert seen == [0, 8, 8] + [0, 8, 16] + [0, 0, 0]


def test_corpus_is_a_workload_in_the_encoders_ids():
    from fisheropt.workloads.pydoc_sentences import UNK_ID, build_dataset

    mod = experiments.get("esimcse")
    assert mod.build_dataset is build_dataset
    train, evals, train_topics, eval_topics, vocab, counts = build_dataset(
        min_tokens=mod.MIN_TOKENS, max_tokens=mod.MAX_TOKENS
    )
    assert vocab[enc.PAD] == "<pad>" and vocab[UNK_ID] == "<unk>" and len(set(vocab)) == len(vocab)
    assert len(train) == len(train_topics) and len(evals) == len(eval_topics) and len(evals) < len(train)
    for sentence in train + evals:
        assert mod.MIN_TOKENS <= len(sentence) <= mod.MAX_TOKENS
        assert sentence.min() >= UNK_ID and sentence.max() < len(vocab)  # padding never occurs
    assert counts[enc.PAD] == 0 and counts.sum() == sum(len(s) for s in train)
    assert all(counts[i] >= counts[i + 1] >= 2 for i in range(UNK_ID + 1, len(vocab) - 1))
