"""The published asv site is a web page that works: build it from two commits and look at it.

asv (asv_bench/asv.conf.json's environment without numba, in a private folder) builds
the last two commits, runs one tiny benchmark on each (``bench_optim.Overhead``,
``--quick``), publishes the site, and asv_bench/check_site.py opens the benchmark's
graph in headless Chromium (with its scripts from asv_bench/vendor/site/, so no
internet is needed: asv_bench/offline_site.py): the flot canvas and axis labels exist, asv shows no
error, and the screenshot holds pixels of the plotted series. The screenshot is kept
in pytest's temporary folder (its path is printed; set FISHEROPT_ASV_SCREENSHOT to a
path to copy it there).

Needs asv (pip install asv, or the [bench] extra), Pillow, Debian's ``chromium`` and the
package index that pip is configured with (numpy, scipy, setuptools, asv_runner, pympler
for the benchmark environment); it skips without them, and fails instead where
FISHEROPT_ASV_REQUIRED is set (CI). About 1.5-4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ASV_BENCH = REPO / "asv_bench"
BENCHMARK = "bench_optim.Overhead.time_adam_step_small"


def _asv_bench_modules():
    """asv_bench/check_site.py and asv_bench/offline_site.py (scripts, not a package)."""
    sys.path.insert(0, str(ASV_BENCH))
    try:
        import check_site
        import offline_site
    finally:
        sys.path.remove(str(ASV_BENCH))
    return check_site, offline_site


def _site_config(tmp: Path) -> dict:
    """asv.conf.json with its environment without numba only, and every output in ``tmp``."""
    from asv import util

    conf = util.load_json(str(ASV_BENCH / "asv.conf.json"), js_comments=True)
    req = {k: v for k, v in conf["matrix"]["req"].items() if not isinstance(v, list)}
    conf.update(
        {
            "repo": str(REPO),
            "branches": ["HEAD"],
            "pythons": [f"{sys.version_info.major}.{sys.version_info.minor}"],
            "matrix": {"req": req},
            "exclude": [],
            "benchmark_dir": str(ASV_BENCH / "benchmarks"),
            "env_dir": str(tmp / "env"),
            "results_dir": str(tmp / "results"),
            "html_dir": str(tmp / "html"),
        }
    )
    return conf


def _missing(reason):
    """Skip, or fail where CI requires this test to run (FISHEROPT_ASV_REQUIRED=1)."""
    if os.environ.get("FISHEROPT_ASV_REQUIRED"):
        pytest.fail(f"FISHEROPT_ASV_REQUIRED is set but {reason}")
    pytest.skip(reason)


def test_published_site_renders_a_graph_from_two_commits(tmp_path):
    for module in ("asv", "virtualenv", "PIL"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"{module} is not installed (pip install asv pillow)")
    check_site, offline_site = _asv_bench_modules()
    if check_site.find_chromium() is None:
        _missing("no chromium on PATH (Debian: apt-get install chromium)")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        _missing("this is not a git checkout")
    hashes = subprocess.run(
        ["git", "rev-list", "--first-parent", "-n", "2", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    if len(hashes) < 2:
        _missing("the checkout has fewer than two commits (shallow clone?)")

    (tmp_path / "asv.conf.json").write_text(json.dumps(_site_config(tmp_path), indent=1))
    (tmp_path / "hashes.txt").write_text("\n".join(hashes) + "\n")
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))  # asv's machine file goes here, not in the real home
    for user_conf in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf"):
        if user_conf.exists() and "PIP_CONFIG_FILE" not in env:
            env["PIP_CONFIG_FILE"] = str(user_conf)  # keep the user's package index

    def asv(*args, timeout=900):
        proc = subprocess.run(
            [sys.executable, "-m", "asv", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, (
            f"asv {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
        return proc.stdout

    asv("machine", "--yes", "--machine", "asv-site-test")
    asv("run", "--quick", "--machine", "asv-site-test", "-b", f"^{BENCHMARK}$", "HASHFILE:hashes.txt")
    results = sorted(p.name for p in (tmp_path / "results" / "asv-site-test").glob("*-*.json"))
    assert {h[:8] for h in hashes} <= {name[:8] for name in results}, results
    asv("publish")
    assert offline_site.localize(tmp_path / "html") == []  # no CDN: the page must work offline

    shot = tmp_path / "asv-site.png"
    problems = check_site.check(tmp_path / "html", BENCHMARK, shot)
    print(f"screenshot: {shot}")
    if os.environ.get("FISHEROPT_ASV_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FISHEROPT_ASV_SCREENSHOT"])
    assert not problems, problems

    # and the check is not vacuous: the same page without its graph data shows asv's error dialog
    broken = tmp_path / "html-broken"
    shutil.copytree(tmp_path / "html", broken)
    shutil.rmtree(broken / "graphs")
    assert check_site.check(broken, BENCHMARK, tmp_path / "broken.png"), "a page without data passed the check"
