"""Bad command-line arguments: one error line, exit status 2, no traceback, nothing created.

Every argument is checked while parsing, before any folder is made or any work starts: the
demo, experiment and benchmark runners are replaced by stand-ins that fail the test if called.
"""

import subprocess
import sys
import types

import pytest

import fisheropt as fo
from fisheropt import bench, cli, experiments


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started although an argument was bad")


@pytest.fixture(autouse=True)
def no_work(tmp_path, monkeypatch):
    """Run in an empty tmp_path; the runners must never be reached."""
    monkeypatch.chdir(tmp_path)
    fake_demo = types.ModuleType("fisheropt.demo")
    fake_demo.run = _must_not_run
    monkeypatch.setitem(sys.modules, "fisheropt.demo", fake_demo)
    monkeypatch.setattr(fo, "demo", fake_demo, raising=False)
    monkeypatch.setattr(experiments, "run", _must_not_run)
    monkeypatch.setattr(bench, "run", _must_not_run)
    return tmp_path


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails(argv, capsys, root, *expected):
    """cli.main(argv) exits 2 with one error line holding every string in ``expected``; nothing changed."""
    before = _tree(root)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], err
    assert _tree(root) == before, "a bad argument created files or folders"
    return errors[0]


# ---- --out --------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["demo"], ["experiment", "fadam"], ["experiment", "all"]])
def test_out_is_an_existing_file(command, capsys, no_work):
    (no_work / "afile").write_text("keep me")
    _fails(
        command + ["--quick", "--out", "afile"],
        capsys,
        no_work,
        "argument --out",
        "'afile' exists and is not a directory",
    )
    assert (no_work / "afile").read_text() == "keep me"


def test_out_below_a_file(capsys, no_work):
    (no_work / "afile").write_text("")
    _fails(["demo", "--out", "afile/sub/dir"], capsys, no_work, "argument --out", "is not a directory")


def test_out_empty(capsys, no_work):
    _fails(["demo", "--out", ""], capsys, no_work, "argument --out", "empty")


def test_out_with_nul_byte(capsys, no_work):
    _fails(["demo", "--out", "a\0b"], capsys, no_work, "argument --out", "cannot use")


def test_out_parent_not_writable(capsys, no_work, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    _fails(["experiment", "fadam", "--out", "new/out"], capsys, no_work, "argument --out", "no permission")
    (no_work / "existing").mkdir()
    _fails(["demo", "--out", "existing"], capsys, no_work, "argument --out", "no permission")


def test_default_out_blocked_by_a_file(capsys, no_work):
    """No --out: the default fisheropt-out/<name>-<time> cannot be made either; still exit 2, no traceback."""
    (no_work / "fisheropt-out").write_text("")
    _fails(["demo", "--quick"], capsys, no_work, "--out", "is not a directory")
    _fails(["experiment", "ief", "--quick"], capsys, no_work, "--out", "is not a directory")


def test_experiment_all_checks_every_subfolder_first(capsys, no_work):
    """'all' writes into --out/<name>: one blocked subfolder stops the run before any experiment starts."""
    (no_work / "out").mkdir()
    last = sorted(experiments.EXPERIMENTS)[-1]
    (no_work / "out" / last).write_text("")
    _fails(
        ["experiment", "all", "--quick", "--out", "out"],
        capsys,
        no_work,
        "--out",
        f"{last}' exists and is not a directory",
    )


# ---- --seed -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", str(2**32), "abc", "1.5", ""])
@pytest.mark.parametrize("command", [["demo"], ["experiment", "fadam"]])
def test_bad_seed_creates_nothing(command, seed, capsys, no_work):
    _fails(
        command + ["--quick", "--out", "out", "--seed", seed],
        capsys,
        no_work,
        "argument --seed",
        "from 0 to 4294967295",
    )
    assert not (no_work / "out").exists()


def test_seed_bounds_accepted():
    parser = cli.build_parser()
    for seed in (0, 2**32 - 1):
        assert parser.parse_args(["demo", "--seed", str(seed)]).seed == seed


# ---- experiment and the top level ---------------------------------------------------------
def test_unknown_experiment(capsys, no_work):
    _fails(
        ["experiment", "nosuch", "--quick", "--out", "out"],
        capsys,
        no_work,
        "unknown experiment 'nosuch'",
        "fadam",
        "all",
    )


@pytest.mark.parametrize(
    "argv", [["experiment", "fadam", "--bogus"], ["experiment", "fadam", "extra"], ["demo", "--nope"], ["info", "--x"]]
)
def test_unrecognized_arguments(argv, capsys, no_work):
    _fails(argv, capsys, no_work, "unrecognized arguments")


def test_unknown_command(capsys, no_work):
    _fails(["nosuch"], capsys, no_work, "invalid choice")


def test_experiment_without_a_name(capsys, no_work):
    assert cli.main(["experiment"]) == 2
    captured = capsys.readouterr()
    assert "give an experiment name" in captured.err and "Traceback" not in captured.err
    assert "fadam" in captured.out  # the list of names
    assert _tree(no_work) == []


def test_no_command_prints_help(capsys, no_work):
    assert cli.main([]) == 0
    captured = capsys.readouterr()
    assert "usage: fisheropt" in captured.out and "Traceback" not in captured.err
    assert _tree(no_work) == []


# ---- bench --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, message",
    [
        ("2^-1", "exponent must not be negative"),
        ("1e400", "not a finite number"),
        ("inf", "not a finite number"),
        ("nan", "not a finite number"),
        ("0", "must be positive"),
        ("-5", "must be positive"),
        ("0^3", "must be positive"),
        ("1.5", "not a whole number"),
        ("2^40", "too large"),
        ("2^10000000", "too large"),
        ("10**12", "too large"),
        ("1e12", "too large"),
        ("2^", "invalid size"),
        ("abc", "invalid size"),
        ("9" * 5000, "--sizes"),  # int() refuses so many digits; float() makes it inf
    ],
)
def test_bench_bad_sizes(size, message, capsys, no_work):
    _fails(["bench", "--sizes", "2^10", size], capsys, no_work, "argument --sizes", message)


def test_bench_good_sizes():
    assert [bench.parse_size(s) for s in ("2^25", "2**4", "1048576", "1e6", " MANY ", "2^31")] == [
        1 << 25,
        16,
        1 << 20,
        10**6,
        "many",
        1 << 31,
    ]


@pytest.mark.parametrize("repeats", ["0", "-3", "x", "2.5"])
def test_bench_bad_repeats(repeats, capsys, no_work):
    _fails(["bench", "--repeats", repeats], capsys, no_work, "argument --repeats", ">= 1")


def test_bench_unknown_backend(capsys, no_work):
    _fails(
        ["bench", "--backends", "numpy", "nosuch"],
        capsys,
        no_work,
        "argument --backends",
        "unknown backend 'nosuch'",
        "numpy, numba, cupy",
    )


def test_bench_unusable_backend_gives_its_reason(capsys, no_work, monkeypatch):
    monkeypatch.setattr(fo.backends, "unavailable", lambda: {"numba": "no numba (test)"})
    _fails(
        ["bench", "--backends", "numba"],
        capsys,
        no_work,
        "argument --backends",
        "'numba' is not usable here: no numba (test)",
    )


def test_bench_cupy_backend(capsys, no_work):
    """cupy: unusable here (its reason), or usable but on device arrays, which bench does not time."""
    reason = fo.backends.unavailable().get("cupy")
    expected = f"not usable here: {reason}" if reason else "device arrays"
    _fails(["bench", "--backends", "cupy"], capsys, no_work, "argument --backends", expected)


def test_bench_backend_given_twice(capsys, no_work):
    _fails(["bench", "--backends", "numpy", "numpy"], capsys, no_work, "argument --backends", "given twice")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rules", "nope"], "argument --rules: invalid choice"),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--sizes"], "argument --sizes: expected at least one argument"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bench_other_bad_arguments(argv, message, capsys, no_work):
    _fails(["bench"] + argv, capsys, no_work, message)


def test_bench_good_arguments_reach_the_runner(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        bench,
        "run",
        lambda rules, sizes, backends, dtype, repeats, **kw: seen.update(
            rules=rules, sizes=sizes, backends=backends, repeats=repeats
        ),
    )
    assert (
        cli.main(["bench", "--sizes", "2^10", "many", "--rules", "adam", "--backends", "numpy", "--repeats", "1"]) == 0
    )
    assert seen == {"rules": ["adam"], "sizes": [1024, "many"], "backends": ["numpy"], "repeats": 1}
    assert cli.main(["bench", "--quick"]) == 0  # defaults: the usable ones of numpy, numba
    assert seen["repeats"] == 2 and seen["backends"] == [b for b in ("numpy", "numba") if b in fo.backends.available()]


# ---- the real entry point -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--quick", "--out", "afile"], "exists and is not a directory"),
        (["experiment", "fadam", "--quick", "--seed", "-1", "--out", "out"], "argument --seed"),
        (["bench", "--sizes", "1e400"], "argument --sizes"),
        (["bench", "--backends", "nosuch"], "unknown backend"),
    ],
)
def test_python_dash_m_bad_arguments(argv, message, no_work):
    (no_work / "afile").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "fisheropt", *argv], capture_output=True, text=True, timeout=120, cwd=no_work
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line][0].count(message) == 1
    assert _tree(no_work) == ["afile"]


def test_python_dash_m_without_a_command(no_work):
    proc = subprocess.run([sys.executable, "-m", "fisheropt"], capture_output=True, text=True, timeout=120, cwd=no_work)
    assert proc.returncode == 0 and "usage: fisheropt" in proc.stdout and "Traceback" not in proc.stderr
