#!/usr/bin/env python3
"""Regenerate the site's generated pages: experiment reports and plots, benchmark tables.

    python docs/generate.py                      # everything, full runs (tens of minutes on 2 cores)
    python docs/generate.py --quick              # the same commands with --quick (a few minutes)
    python docs/generate.py --only bench         # only the benchmark table
    python docs/generate.py --only experiments --experiments fadam ief

Everything under ``docs/generated/`` is written by this script and by nothing else;
the pages under ``docs/`` include those files, they never copy numbers by hand.
It runs the project's own commands, each in a subprocess, exactly as a user would:

* ``fisheropt experiment NAME --out docs/generated/experiments/NAME`` for every
  experiment of :data:`fisheropt.experiments.EXPERIMENTS` (``report.md``, PNG plots,
  ``metrics.json``);
* ``fisheropt bench ...`` (see ``BENCH_ARGS``), whose table is saved as
  ``docs/generated/bench/bench.txt`` with the machine it ran on.

``docs/generated/manifest.json`` records the command line, the date, the git commit, the
machine and, per item, the exit status and the time taken. An experiment that fails is
reported (its folder keeps a ``FAILED.txt`` with the output) and the others still run;
the script exits 1 if anything failed. The docs build then lists whatever is there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "generated"

#: What the site keeps of an experiment's output folder (besides the PNG plots).
KEEP = {"report.md", "metrics.json", "FAILED.txt"}

#: ``fisheropt bench`` arguments for the site's table (float32, the numba and numpy backends
#: and the PyTorch baselines where installed). --quick adds ``--quick`` to them.
BENCH_ARGS = ["--sizes", "2^20", "2^25", "many", "--repeats", "5"]
BENCH_ARGS_QUICK = ["--quick", "--sizes", "2^16", "2^20", "--repeats", "2"]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": round(load, 2),
    }


def _run(cmd: list[str], log: Path) -> tuple[int, float, str]:
    env = dict(os.environ, FISHEROPT_PROGRESS="0", MPLBACKEND="Agg")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + (("\n" + proc.stderr) if proc.stderr.strip() else "")
    log.parent.mkdir(parents=True, exist_ok=True)
    if proc.returncode != 0:
        log.write_text(f"$ {' '.join(cmd)}\nexit status {proc.returncode}\n\n{output}")
    return proc.returncode, seconds, output


def run_experiments(names: list[str], quick: bool) -> dict:
    results = {}
    for name in names:
        out = GENERATED / "experiments" / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "fisheropt", "experiment", name, "--out", str(out.relative_to(ROOT))]
        cmd += ["--quick"] if quick else []
        print(f"== {' '.join(cmd[2:])}", flush=True)
        rc, seconds, _ = _run(cmd, out / "FAILED.txt")
        for extra in out.iterdir():  # arrays and checkpoints the site does not show
            if extra.is_file() and extra.name not in KEEP and extra.suffix not in (".png",):
                extra.unlink()
        shown = ["fisheropt", *cmd[3:]]
        results[name] = {
            "command": " ".join(shown),
            "exit_status": rc,
            "seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d"),
            "commit": _git_commit(),
        }
        print(f"   exit {rc} in {seconds:.0f} s", flush=True)
    return results


def run_bench(quick: bool) -> dict:
    out = GENERATED / "bench"
    out.mkdir(parents=True, exist_ok=True)
    args = BENCH_ARGS_QUICK if quick else BENCH_ARGS
    cmd = [sys.executable, "-m", "fisheropt", "bench", *args]
    shown = "fisheropt bench " + " ".join(args)
    print(f"== {shown}", flush=True)
    before = machine()
    rc, seconds, output = _run(cmd, out / "FAILED.txt")
    if rc == 0:
        (out / "FAILED.txt").unlink(missing_ok=True)
        header = (
            f"$ {shown}\n# {time.strftime('%Y-%m-%d')}, {before['cpu']}, {before['cores']} cores, "
            f"load average {before['load_average_1min']} at the start\n\n"
        )
        (out / "bench.txt").write_text(header + output.rstrip() + "\n")
    print(f"   exit {rc} in {seconds:.0f} s", flush=True)
    return {"command": shown, "exit_status": rc, "seconds": round(seconds, 1)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python docs/generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every command (smoke-sized runs)")
    parser.add_argument("--only", choices=["experiments", "bench"], help="regenerate only this part")
    parser.add_argument("--experiments", nargs="+", metavar="NAME", help="only these experiments")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from fisheropt.experiments import EXPERIMENTS

    names = args.experiments or sorted(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(sorted(EXPERIMENTS))}")

    experiments = bench = meta = None
    if args.only in (None, "experiments"):
        experiments = run_experiments(names, args.quick)
        meta = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "commit": _git_commit(), "machine": machine()}
    if args.only in (None, "bench"):
        bench = run_bench(args.quick) | {
            "date": time.strftime("%Y-%m-%d"),
            "quick": args.quick,
            "commit": _git_commit(),
            "machine": machine(),
        }
    # Read the manifest only now, so that a concurrent run of the other part is not lost.
    manifest_path = GENERATED / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("experiments", {})
    if experiments is not None:
        manifest["experiments"].update(experiments)
        manifest["experiments_meta"] = meta
    if bench is not None:
        manifest["bench"] = bench
    # Drop entries of experiments that no longer exist.
    for name in list(manifest["experiments"]):
        if name not in EXPERIMENTS:
            del manifest["experiments"][name]
            shutil.rmtree(GENERATED / "experiments" / name, ignore_errors=True)
    GENERATED.mkdir(exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    failed = [n for n, r in manifest["experiments"].items() if r["exit_status"] != 0]
    if "bench" in manifest and manifest["bench"]["exit_status"] != 0:
        failed.append("bench")
    if failed:
        print(f"failed: {', '.join(failed)} (see docs/generated/**/FAILED.txt)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
