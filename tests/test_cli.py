"""The fisheropt command: argument handling, bench pass-through, and the demo end to end."""

import json
import math
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import fisheropt as fo
from fisheropt import cli


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "experiment", "bench", "info"):
        assert word in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and fo.__version__ in capsys.readouterr().out


def test_experiment_list_and_errors(capsys):
    assert cli.main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("coupled-adam", "ief", "fadam"):
        assert name in out
    assert cli.main(["experiment"]) == 2  # no name: list + usage error code
    with pytest.raises(SystemExit) as exc:
        cli.main(["experiment", "no-such-thing", "--quick"])
    assert exc.value.code == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_every_subcommand_takes_quick_and_out():
    parser = cli.build_parser()
    for argv in (["demo", "--quick", "--out", "x"], ["experiment", "fadam", "--quick", "--out", "x", "--seed", "3"]):
        args = parser.parse_args(argv)
        assert args.quick and str(args.out) == "x"


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and fo.__version__ in out


def test_bench_passes_arguments_through(monkeypatch):
    seen = []
    fake = types.ModuleType("fisheropt.bench")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fisheropt.bench", fake)
    monkeypatch.setattr(fo, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--help", "adam", "-n", "3"]) == 0
    assert seen == [["--quick", "--help", "adam", "-n", "3"]]


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "fisheropt", "experiment", "--list"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "coupled-adam" in proc.stdout


@pytest.mark.skipif(shutil.which("fisheropt") is None, reason="console script not on PATH")
def test_console_script():
    proc = subprocess.run(["fisheropt", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and fo.__version__ in proc.stdout


# ---- the demo -----------------------------------------------------------------------
def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_demo_extra = pytest.mark.skipif(
    not (_has("matplotlib") and _has("sklearn")), reason="needs the demo extra (matplotlib, scikit-learn)"
)


@needs_demo_extra
def test_demo_quick_end_to_end(tmp_path, capsys):
    from fisheropt import demo

    out = tmp_path / "demo out"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    backends = fo.backends.available()
    for method in demo.METHODS:
        assert method in printed
    for backend in backends:
        assert backend in printed
    assert "ms/step" in printed and str(out.resolve()) in printed
    for name in ("report.md", "loss_curves.png", "test_accuracy.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert len(rows) == len(demo.METHODS) * len(backends)
    for r in rows:
        assert math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1 and r["step_ms"] > 0
        # the logged curve ends at the tabled value and the model improved on its start
        curve = metrics["curves"][f"{r['method']}|{r['backend']}"]
        assert curve["train_loss"][-1] == r["train_loss"]
        assert curve["train_loss"][-1] < curve["train_loss"][0]
    # every backend computes the same training run (same seed) up to rounding
    by = {(r["method"], r["backend"]): r for r in rows}
    for method in demo.METHODS:
        for backend in backends:
            assert by[(method, backend)]["train_loss"] == pytest.approx(by[(method, "numpy")]["train_loss"], rel=1e-6)


@needs_demo_extra
def test_demo_training_is_seeded():
    from fisheropt import demo
    from fisheropt.workloads.models import load_digits_split

    X_tr, y_tr, X_te, y_te = load_digits_split(seed=0)
    data = (X_tr[:200], y_tr[:200], X_te, y_te)
    cfg = dict(hidden=8, batch=50, epochs=1)
    for method in ("NGD-SF", "FAdam"):
        a, ca = demo.train(method, "numpy", data, cfg, seed=0)
        b, cb = demo.train(method, "numpy", data, cfg, seed=0)
        c, _ = demo.train(method, "numpy", data, cfg, seed=1)
        assert ca == cb and a["train_loss"] == b["train_loss"]
        assert c["train_loss"] != a["train_loss"]
    assert np.isfinite(a["step_ms"])
