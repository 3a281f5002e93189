"""The tracked figures: speed ratios measured in one process (airspeed velocity).

Absolute times on the shared 2-core machine move by up to 1.7x between runs, so the
figures tracked across commits, and gated by ``asv_bench/regression_gate.py``, are
ratios whose numerator and denominator are timed round-robin in one process over
the same buffers:

* ``Ratios.track_time_over_ceiling``: numba step time ÷ the time the bandwidth
  ceiling (``a += 0*b``, ``fisheropt/bench_ceiling.py``) takes to move the rule's bytes over the same
  parameter, gradient and optimizer-state buffers. This is (GB/s ÷ ceiling GB/s)⁻¹:
  1.0 means the step streams at the ceiling, 1.25 that it is 25 % slower.
* ``Ratios.track_time_over_torch``: numba step time ÷ PyTorch step time
  (``torch.optim.Adam/AdamW(fused=True)``, ``pytorch_optimizer.FAdam``; Adam/AdamW
  race on the same m and v). 0.5 means fisheropt takes half PyTorch's time.
* ``Ratios.track_gbs``: the achieved GB/s, for the record (not gated: absolute).

Both ratios are written so that larger is worse, which is what asv assumes of every
benchmark (``asv continuous``/``asv compare`` and the published site's regression
list).

Sizes: one 2^25-element tensor and "many" (147 tensors of a GPT-2-small-like model,
91.3 M parameters). Everything is measured once per commit in ``setup_cache`` (one
process: a few seconds of compile, then ``REPEATS`` interleaved rounds on each of
``ALLOCATIONS`` sets of buffers per problem; about 3 minutes on 2 busy cores).
Without numba, without torch, or at a commit that lacks a rule or the numba backend,
the affected figures are skipped.
"""

from __future__ import annotations

import gc
import math

import numpy as np

from . import _common as C

SIZES = ("2^25", "many")


def _measure_once(rule: str, size: str, repeats: int, seed: int) -> dict:
    """One set of buffers: per-round times of the ceiling, the numba step and the PyTorch step."""
    shapes, coupled = C.problem_shapes(rule, size)
    params = C.random_arrays(shapes, seed)
    grads = C.random_arrays(shapes, seed + 1, 1e-3)
    opt = C.make_optimizer(rule, "numba", params, coupled, check_finite=False)
    opt.step(grads)  # compile (or load) the kernels
    fns = {}
    fns["ceiling"], ceil_bytes = C.bench_ceiling.ceiling_on(*C.bench_ceiling.ceiling_buffers(params, grads, opt.state))
    fns["numba"] = lambda: opt.step(grads)
    pause = {}
    base = C.torch_baseline(rule, params, grads, share_with=opt)
    if base is not None:
        fns["torch"] = base[1]
        pause["torch"] = 0.05  # let PyTorch's OpenMP threads stop spinning before the next timing
    t = C.bench_ceiling.interleaved_times(fns, repeats=repeats, pause=pause)
    step_bytes = C.moved_bytes(rule, shapes, coupled, np.dtype(np.float32).itemsize)
    return {
        "times": t,
        "torch": base[0] if base is not None else None,
        # per round: numba time / the time the ceiling needs for the step's bytes; median over rounds
        "time_over_ceiling": C.bench_ceiling.paired_ratio(t["numba"], t["ceiling"]) * ceil_bytes / step_bytes,
        "time_over_torch": C.bench_ceiling.paired_ratio(t["numba"], t["torch"]) if "torch" in t else None,
        "step_bytes": step_bytes,
        "parameters": sum(math.prod(s) for s in shapes),
    }


def _geomean(values):
    return float(np.exp(np.mean(np.log(values))))


def measure_problem(rule: str, size: str, repeats: int = 11, allocations: int = 1, seed: int = 0) -> dict:
    """The numba step, the ceiling over its buffers and the PyTorch step, timed round-robin
    ``repeats`` times on each of ``allocations`` fresh sets of buffers.

    Each ratio is the median over rounds of the ratio within a round, then the geometric mean
    over the sets of buffers: on this VM where a buffer lands changes a step's speed by up to
    1.7x (README, "Performance"), and a second allocation halves that part of the spread."""
    runs = []
    for k in range(allocations):
        runs.append(_measure_once(rule, size, repeats, seed + 2 * k))
        gc.collect()
    numba_times = np.concatenate([r["times"]["numba"] for r in runs])
    return {
        "gbs": runs[0]["step_bytes"] / float(np.median(numba_times)) / 1e9,
        "time_over_ceiling": _geomean([r["time_over_ceiling"] for r in runs]),
        "time_over_torch": (
            _geomean([r["time_over_torch"] for r in runs]) if runs[0]["time_over_torch"] is not None else None
        ),
        "torch": runs[0]["torch"],
        "parameters": runs[0]["parameters"],
    }


class Ratios:
    """GB/s of the numba step, and its time over the ceiling's and over PyTorch's, from one process."""

    params = (list(C.RULES), list(SIZES))
    param_names = ["rule", "size"]
    timeout = 1800
    rounds = 1  # one measurement per commit (setup_cache); more rounds would repeat the same value
    repeat = 1
    number = 1
    REPEATS = 11  # round-robin rounds per set of buffers
    ALLOCATIONS = {"2^25": 2, "many": 1}  # sets of buffers (147 tensors already average placement)

    def setup_cache(self):
        results = {}
        try:
            C.backend("numba")
            C.bench_ceiling.ceiling_kernel()
        except NotImplementedError as exc:
            return {"skip": str(exc)}
        for rule in C.RULES:
            for size in SIZES:
                try:
                    results[(rule, size)] = measure_problem(rule, size, self.REPEATS, self.ALLOCATIONS[size])
                except NotImplementedError as exc:
                    results[(rule, size)] = {"skip": str(exc)}
                gc.collect()  # free this problem's buffers before the next one
        return results

    def setup(self, results, rule, size):
        if "skip" in results:
            C.skip(results["skip"])
        if "skip" in results[(rule, size)]:
            C.skip(results[(rule, size)]["skip"])

    track_time_over_ceiling = C.tracked("time_over_ceiling", "step time / ceiling time")
    track_time_over_torch = C.tracked("time_over_torch", "fisheropt time / torch time")
    track_gbs = C.tracked("gbs", "GB/s")


if __name__ == "__main__":
    # The tracked ratios without asv: python -m benchmarks.bench_track (from asv_bench/)
    import sys

    sizes = sys.argv[1:] or list(SIZES)
    for rule in C.RULES:
        for size in sizes:
            r = measure_problem(rule, size, Ratios.REPEATS, Ratios.ALLOCATIONS.get(size, 1))
            tt = f"{r['time_over_torch']:.3f}" if r["time_over_torch"] is not None else "-"
            print(
                f"{rule:13s} {size:5s} GB/s {r['gbs']:6.2f}  time/ceiling {r['time_over_ceiling']:.3f}  "
                f"time/torch {tt}",
                flush=True,
            )
            gc.collect()
