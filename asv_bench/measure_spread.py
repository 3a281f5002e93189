#!/usr/bin/env python3
"""Run-to-run spread of the gated figures: the same commit benchmarked N times.

    python asv_bench/measure_spread.py            # main, 5 runs
    python asv_bench/measure_spread.py --commit HEAD~3 --runs 8

Each run is a separate ``asv run -b <gated benchmarks> <commit>^!`` (so a separate
build-free process per benchmark, as in the regression gate). Prints, per benchmark
and parameter set, min / median / max and the spread max ÷ min, then the largest
spread of the speed ratios and of the memory figures: the regression gate's
thresholds (``regression_gate.py``) are chosen above those.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time

import regression_gate as gate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commit", default="main")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bench", default=f"{gate.RATIO_BENCH}|{gate.MEMORY_BENCH}")
    args = ap.parse_args(argv)
    commit = gate.git("rev-parse", args.commit + "^{commit}")
    machine = gate.machine_name()
    values = {}
    t0 = time.time()
    for i in range(args.runs):
        rc = gate.asv("run", "-b", args.bench, f"{commit}^!")
        if rc not in (0, 2):
            return rc
        for key, (value, _unit) in gate.load_results(machine, commit).items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                values.setdefault(key, []).append(value)
        print(f"run {i + 1}/{args.runs} done after {time.time() - t0:.0f} s", flush=True)
    print(f"\nspread over {args.runs} runs of {commit[:8]} (max / min):")
    defaults = argparse.Namespace(
        ceiling_factor=gate.CEILING_FACTOR,
        torch_factor=gate.TORCH_FACTOR,
        memory_factor=gate.MEMORY_FACTOR,
        peakmem_factor=gate.PEAKMEM_FACTOR,
    )
    rules = gate.thresholds(defaults)
    worst = {}
    for (name, params, env), vs in sorted(values.items()):
        lo, hi = min(vs), max(vs)
        spread = hi / lo if lo > 0 else float("inf")
        full = gate._asv_name(name, params)
        pattern = next((p for p, _ in rules if re.search(p, full)), None)
        if pattern is not None and spread >= worst.get(pattern, (0.0, ""))[0]:
            worst[pattern] = spread, full
        print(
            f"  {name}({', '.join(params)}) [{env[:24]}]: min {lo:.4g}  median {statistics.median(vs):.4g}  "
            f"max {hi:.4g}  spread x{spread:.3f}"
        )
    print(f"\nlargest spread per threshold of the gate ({time.time() - t0:.0f} s for {args.runs} runs):")
    for pattern, factor in rules:
        if pattern in worst:
            gated = f"threshold x{factor}" if factor is not None else "not gated"
            print(f"  {pattern:55s} x{worst[pattern][0]:.3f}  ({worst[pattern][1]}; {gated})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
