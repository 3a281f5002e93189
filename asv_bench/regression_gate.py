#!/usr/bin/env python3
"""Regression gate: ``asv continuous`` between the main branch and the WORKING TREE.

Run it before merging a kernel change (anything under backends/, refimpl/ or the
optimizer classes), from anywhere in the repository::

    python asv_bench/regression_gate.py                 # main vs the working tree
    python asv_bench/regression_gate.py --base HEAD~1   # or any commit-ish

What it does:

1. Records the working tree (tracked changes and untracked, non-ignored files) as a
   commit object built with a private index (``git add -A`` into a temporary
   ``GIT_INDEX_FILE``, ``git write-tree``, ``git commit-tree -p HEAD``): no branch,
   ref, index entry or file of the checkout changes, and nothing is committed.
   A clean tree is HEAD itself.
2. ``asv continuous`` on the in-process speed ratios
   (``bench_track.Ratios.track_time_over_ceiling`` and ``track_time_over_torch``:
   step time ÷ ceiling time and ÷ PyTorch time, measured in one process; larger is
   worse), then on the memory figures (``bench_memory``: state bytes per parameter,
   peak extra MiB of a step and of the natural-gradient direction, asv's peakmem).
   asv builds both commits in the virtualenvs of asv.conf.json (builds are cached).
3. Applies each figure's own threshold (:func:`thresholds`) to the results asv saved,
   prints a table of the gated figures before and after, and exits 1 listing those
   that got worse than their threshold; 0 when none did; 2 when asv itself failed (a
   build or a benchmark errored: see its output above).

The thresholds sit above the run-to-run spread of these figures measured with
``measure_spread.py`` on the shared 2-core development machine (the constants below;
docs/guide/benchmarks.md). A kernel that gets 2x slower fails the gate; 1.5x may pass
on a busy machine. About 4-5 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Thresholds: a figure is a regression when after / before exceeds its factor. Each factor sits
# above the largest run-to-run spread (max / min over five runs of one commit with
# measure_spread.py, on the shared 2-core development machine) of the figures it covers.
CEILING_FACTOR = 1.5  # step time / ceiling time: spread 1.14-1.34
COUPLED_2_25_FACTOR = 2.0  # the same for Coupled Adam on one 2^25 matrix: spread 1.78
TORCH_FACTOR = 1.5  # fisheropt time / PyTorch time, one 2^25 tensor: spread 1.03-1.21
MEMORY_FACTOR = 1.05  # state bytes/param, peak extra MiB of a step / of the direction: 1.002
PEAKMEM_FACTOR = 1.25  # asv's peakmem (process RSS, the compiler's included): spread 1.15

RATIO_BENCH = r"^bench_track\.Ratios\.track_time_over_(ceiling|torch)"
MEMORY_BENCH = r"^bench_memory\."


def thresholds(args) -> list:
    """[(regex on "benchmark(params)" as asv writes it, factor or None = reported, not gated)]."""
    return [
        (r"track_time_over_ceiling\('coupled_adam', '2\^25'\)", max(args.ceiling_factor, COUPLED_2_25_FACTOR)),
        (r"track_time_over_ceiling", args.ceiling_factor),
        (r"track_time_over_torch\(.*'2\^25'\)", args.torch_factor),
        # PyTorch's own step time on the 147-tensor model varies 3-10x from run to run on this
        # machine (torch's thread pool under contention): tracked on the site, not gated; the
        # ceiling ratio of the same problem gates fisheropt's speed there.
        (r"track_time_over_torch\(.*'many'\)", None),
        (r"^bench_memory\..*\.track_", args.memory_factor),
        (r"^bench_memory\..*\.peakmem_", args.peakmem_factor),
    ]


def git(*args, env=None) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True, env=env).stdout.strip()


def working_tree_commit() -> tuple[str, bool]:
    """(a commit whose tree is the working tree, True if it is a new commit object)."""
    head = git("rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"))
        git("read-tree", "HEAD", env=env)
        git("add", "-A", ".", env=env)
        tree = git("write-tree", env=env)
    if tree == git("rev-parse", "HEAD^{tree}"):
        return head, False
    who = {
        "GIT_AUTHOR_NAME": "asv regression gate",
        "GIT_AUTHOR_EMAIL": "gate@localhost",
        "GIT_COMMITTER_NAME": "asv regression gate",
        "GIT_COMMITTER_EMAIL": "gate@localhost",
    }
    commit = git(
        "commit-tree", tree, "-p", head, "-m", "asv regression gate: the working tree", env=dict(os.environ, **who)
    )
    return commit, True


def asv(*args) -> int:
    cmd = ["asv", *args]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=HERE).returncode


def machine_name() -> str:
    """The asv machine name of this machine (``asv machine --yes`` first if there is none)."""
    path = Path.home() / ".asv-machine.json"
    if not path.exists():
        asv("machine", "--yes")
    names = sorted(json.loads(path.read_text()).keys() - {"version"})
    if len(names) != 1:
        raise SystemExit(f"{path} lists {len(names)} machines: pass --machine")
    return names[0]


def load_results(machine: str, commit: str) -> dict:
    """{(benchmark name, params, environment): (value, unit)} from asv's result files of one commit."""
    from asv import results as R

    out = {}
    results_dir = HERE / ".asv" / "results"
    benchmarks = json.loads((results_dir / "benchmarks.json").read_text())
    for path in sorted((results_dir / machine).glob(f"{commit[:8]}-*.json")):
        res = R.Results.load(str(path), machine)
        for name in res.get_result_keys(benchmarks):
            params = benchmarks[name]["params"]
            values = res.get_result_value(name, params)
            if not params:
                combos, values = [()], [values]
            else:
                combos = [tuple(p.strip("'") for p in c) for c in itertools.product(*params)]
            for combo, value in zip(combos, values):
                out[(name, combo, res.env_name)] = (value, benchmarks[name].get("unit", ""))
    return out


def _asv_name(name, params) -> str:
    """The name asv's -b regexes see: ``bench.Class.func('a', 'b')``."""
    return f"{name}({', '.join(repr(p) for p in params)})" if params else name


def report(machine: str, base: str, head: str, rules: list) -> list:
    """Every figure covered by ``rules`` that both commits have: (status, item), status "REGRESSION",
    "ok" or "not gated"; item = (name, params, env, before, after, ratio, factor, unit)."""
    before, after = load_results(machine, base), load_results(machine, head)
    rows = []
    for key, (b, unit) in sorted(before.items()):
        name, params, env = key
        full = _asv_name(name, params)
        rule = next(((pattern, f) for pattern, f in rules if re.search(pattern, full)), None)
        if rule is None or key not in after:
            continue
        factor = rule[1]
        a = after[key][0]
        if b is None or (isinstance(b, float) and math.isnan(b)):
            continue  # skipped at the base: nothing to compare
        failed = a is None or (isinstance(a, float) and math.isnan(a))
        ratio = float("inf") if failed else (a / b if b > 0 else float("inf"))
        status = "not gated" if factor is None else ("REGRESSION" if ratio > factor else "ok")
        rows.append((status, (name, params, env, b, a, ratio, factor, unit)))
    return rows


def _line(status, item) -> str:
    name, params, env, b, a, ratio, factor, unit = item
    after = "n/a" if a is None or (isinstance(a, float) and math.isnan(a)) else f"{a:.4g}"
    limit = f"x{factor}" if factor is not None else "-"
    label = f"{name.split('.', 1)[1]}({', '.join(params)})"
    envname = "no numba" if "numba" not in env else "numba"
    return f"  {status:10s} {label:62s} {envname:8s} {b:10.4g} {after:>10s}  x{ratio:<6.2f} {limit:>5s}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", default="main", help="commit-ish to compare against (default: main)")
    ap.add_argument(
        "--head", default=None, help="commit-ish to test (default: the working tree, recorded as a commit object)"
    )
    for flag, default, figure in (
        ("--ceiling-factor", CEILING_FACTOR, "a step time / ceiling time"),
        ("--torch-factor", TORCH_FACTOR, "a fisheropt / PyTorch time (one 2^25 tensor)"),
        ("--memory-factor", MEMORY_FACTOR, "a tracked memory figure"),
        ("--peakmem-factor", PEAKMEM_FACTOR, "an asv peakmem"),
    ):
        ap.add_argument(
            flag, type=float, default=default, help=f"flag {figure} that grew by more than this (default {default})"
        )
    ap.add_argument("--ratio-bench", default=RATIO_BENCH, help="asv -b regex of the speed ratios")
    ap.add_argument("--memory-bench", default=MEMORY_BENCH, help="asv -b regex of the memory figures")
    ap.add_argument("--machine", default=None, help="asv machine name (default: asv's, from ~/.asv-machine.json)")
    args = ap.parse_args(argv)

    base = git("rev-parse", args.base + "^{commit}")
    if args.head:
        head, made = git("rev-parse", args.head + "^{commit}"), False
    else:
        head, made = working_tree_commit()
    what = "the working tree" if made else git("log", "-1", "--format=%h %s", head)
    print(f"regression gate: {git('log', '-1', '--format=%h %s', base)}  ->  {head[:8]} ({what})", flush=True)
    if head == base:
        print("base and head are the same commit: nothing to compare (commit or change something first)")
        return 0
    machine = args.machine or machine_name()
    common = ["--sort", "name"] + (["--machine", machine] if args.machine else [])
    ratio_factor = min(args.ceiling_factor, args.torch_factor)
    # asv's own tables below flag changes beyond one factor per call; the verdict at the end applies
    # each figure's own threshold (thresholds()) to the results asv saved.
    rc_ratio = asv("continuous", "--factor", str(ratio_factor), "-b", args.ratio_bench, *common, base, head)
    rc_memory = asv("continuous", "--factor", str(args.memory_factor), "-b", args.memory_bench, *common, base, head)

    rows = report(machine, base, head, thresholds(args))
    worse = [r for r in rows if r[0] == "REGRESSION"]
    print()
    print(f"regression gate: {base[:8]} (before) -> {head[:8]} (after)")
    print(f"  {'':10s} {'figure':62s} {'env':8s} {'before':>10s} {'after':>10s}  {'ratio':7s} {'limit':>5s}")
    for status, item in rows:
        if not item[0].startswith("bench_memory."):
            print(_line(status, item))
    print("  (not gated: PyTorch's own time on 147 tensors varies 3-10x between runs on this machine)")
    for kind in ("track_", "peakmem_"):
        mem = [
            (status, item)
            for status, item in rows
            if item[0].startswith("bench_memory.") and item[0].rsplit(".", 1)[1].startswith(kind)
        ]
        if mem:
            status, item = max(mem, key=lambda r: r[1][5])
            print(
                f"  memory, {len(mem)} {kind}* figures: the largest after/before is x{item[5]:.3f} "
                f"(limit x{item[6]}), {item[0].split('.', 1)[1]}({', '.join(item[1])})"
            )
    if worse:
        print(f"REGRESSION: {len(worse)} figure(s) got worse than their threshold:")
        for status, item in worse:
            print(_line(status, item))
        return 1
    if rc_ratio not in (0, 1) or rc_memory not in (0, 1) or not rows:
        print(
            f"FAILED: asv could not build or run a benchmark (asv continuous exit codes {rc_ratio}, "
            f"{rc_memory}; see above)"
        )
        return 2
    print("OK: no gated speed ratio or memory figure got worse than its threshold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
