"""Optimizer steps (airspeed velocity): Adam, AdamW, FAdam, Coupled Adam.

* ``Step.time_step`` / ``Step.time_step_checked``: one optimizer step (the class's
  ``step``, ``check_finite=False`` / ``True``) per rule × backend × size, where
  backend is a fisheropt backend ("numpy" reference, "numba") or "torch"
  (``torch.optim.Adam/AdamW(fused=True)``; ``pytorch_optimizer.FAdam`` for FAdam).
* ``Finite.time_all_finite``: the pre-step finiteness check alone.
* ``PeakMem.peakmem_step``: peak RSS of a process that set up and stepped.
* ``Track``: measured in ONE process (so the ratios are comparable): achieved
  GB/s of the numba backend, its ratio to the in-process bandwidth ceiling
  (``a += s*b`` over the same buffers, timed round-robin with the step; see
  ``_ceiling.py`` and ``fisheropt.bench.measure_problem``) and its speed ratio
  to the PyTorch baseline.

Sizes: element counts of one tensor, or "many" (147 tensors of a GPT-2-small-like
model, 91.3 M parameters; see ``fisheropt.bench.transformer_shapes``). The numpy
reference is skipped above 2^22 elements (seconds per step).
"""
from __future__ import annotations

import gc
import math

import numpy as np

from fisheropt import bench as fb


RULES = ["adam", "adamw", "fadam", "coupled_adam"]
SIZES = ["2^16", "2^20", "2^25", "many"]
DTYPE = np.float32


def _problem(rule, size):
    shapes, coupled = fb.problem_shapes(rule, fb.parse_size(size))
    return shapes, coupled, sum(math.prod(s) for s in shapes)


def _fill(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s, dtype=np.float32) * np.float32(scale), dtype=DTYPE) for s in shapes]


def _fisheropt_stepper(rule, backend, shapes, coupled, check_finite):
    import fisheropt as fo
    if backend not in fo.backends.available():
        raise NotImplementedError(f"{backend}: {fo.backends.unavailable().get(backend)}")
    params = _fill(shapes, 0)
    grads = _fill(shapes, 1, 1e-3)
    opt = fb.make_fisheropt(rule, backend, params, coupled, check_finite=check_finite)
    opt.step(grads)  # compile / load the kernels, allocate nothing later
    return lambda: opt.step(grads)


def _torch_stepper(rule, shapes):
    base = fb.torch_baseline(rule)
    if base is None:
        raise NotImplementedError(f"no PyTorch baseline for {rule} here")
    import torch
    params = []
    for i, s in enumerate(shapes):
        p = torch.from_numpy(_fill([s], 2 * i)[0]).requires_grad_()
        p.grad = torch.from_numpy(_fill([s], 2 * i + 1, 1e-3)[0])
        params.append(p)
    opt = base[1](params)
    opt.step()

    def step():
        with torch.no_grad():
            opt.step()
    return step


class Step:
    params = (RULES, ["numpy", "numba", "torch"], SIZES)
    param_names = ["rule", "backend", "size"]
    timeout = 600
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, rule, backend, size):
        shapes, coupled, n = _problem(rule, size)
        if backend == "numpy" and n > fb.NUMPY_MAX_ELEMENTS:
            raise NotImplementedError("the numpy reference is too slow at this size")
        if backend == "torch":
            self.step = _torch_stepper(rule, shapes)
            self.step_checked = None
        else:
            self.step = _fisheropt_stepper(rule, backend, shapes, coupled, check_finite=False)
            self.shapes, self.coupled, self.backend_name = shapes, coupled, backend

    def teardown(self, rule, backend, size):
        self.step = None
        gc.collect()

    def time_step(self, rule, backend, size):
        self.step()


class StepChecked:
    """A step with the default finiteness check (one more read of every gradient)."""
    params = (RULES, ["numpy", "numba"], SIZES)
    param_names = ["rule", "backend", "size"]
    timeout = 600
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, rule, backend, size):
        shapes, coupled, n = _problem(rule, size)
        if backend == "numpy" and n > fb.NUMPY_MAX_ELEMENTS:
            raise NotImplementedError("the numpy reference is too slow at this size")
        self.step = _fisheropt_stepper(rule, backend, shapes, coupled, check_finite=True)

    def teardown(self, rule, backend, size):
        self.step = None
        gc.collect()

    def time_step_checked(self, rule, backend, size):
        self.step()


class Finite:
    params = (["numpy", "numba"], SIZES)
    param_names = ["backend", "size"]
    timeout = 300

    def setup(self, backend, size):
        import fisheropt as fo
        if backend not in fo.backends.available():
            raise NotImplementedError(backend)
        shapes, _, _ = _problem("adam", size)
        self.grads = _fill(shapes, 1)
        self.mod = fo.backends.get(backend)
        assert self.mod.all_finite(self.grads)

    def time_all_finite(self, backend, size):
        self.mod.all_finite(self.grads)


class PeakMem:
    params = (RULES, ["numba", "torch"], ["2^25"])
    param_names = ["rule", "backend", "size"]
    timeout = 300

    def setup(self, rule, backend, size):
        Step.setup(self, rule, backend, size)

    def peakmem_step(self, rule, backend, size):
        self.step()


class Track:
    """GB/s, ratio to the ceiling, and speed ratio to PyTorch, all from one process.

    Uses ``fisheropt.bench.measure_problem``: numba, the PyTorch baseline and the
    ceiling (``a += 0*b`` over the same params, grads and optimizer state) timed round-robin
    on the same buffers."""
    params = (RULES, ["2^25", "many"])
    param_names = ["rule", "size"]
    timeout = 1800
    REPEATS = 5

    def setup_cache(self):
        results = {}
        for rule in RULES:
            for size in ["2^25", "many"]:
                rows = fb.measure_problem(rule, fb.parse_size(size), ["numba"], DTYPE, self.REPEATS)
                row = next((r for r in rows if r["backend"] == "numba"), None)
                if row is None:
                    continue
                results[(rule, size)] = {
                    "gbs": row["gbs"],
                    "ratio": row["ratio_to_ceiling"] if row["ratio_to_ceiling"] is not None else float("nan"),
                    "torch": row["torch_speed_ratio"] if row["torch_speed_ratio"] is not None else float("nan"),
                }
        return results

    def _get(self, results, rule, size, key):
        if (rule, size) not in results:
            raise NotImplementedError("numba backend unavailable")
        return results[(rule, size)][key]

    def track_gbs(self, results, rule, size):
        return self._get(results, rule, size, "gbs")
    track_gbs.unit = "GB/s"

    def track_ratio_to_ceiling(self, results, rule, size):
        return self._get(results, rule, size, "ratio")
    track_ratio_to_ceiling.unit = "fraction of a += s*b"

    def track_speed_ratio_vs_torch(self, results, rule, size):
        return self._get(results, rule, size, "torch")
    track_speed_ratio_vs_torch.unit = "torch time / numba time"
