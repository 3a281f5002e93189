"""fisheropt.torch (airspeed velocity): the torch.optim adapter against PyTorch optimizers.

* ``TorchStep.time_step``: one optimizer step per rule × implementation × problem, where
  implementation is ``fot`` (``fisheropt.torch``, ``check_finite=False``), ``fot+finite``
  (the default guard), ``fo`` (``fisheropt.*`` on NumPy views of the same tensors) or
  ``baseline`` (``torch.optim.AdamW(fused=True)``, ``pytorch_optimizer.FAdam``, a torch
  ``_foreach`` Coupled Adam); problems as in ``fisheropt.torch.bench``: ``lm`` (the ~17 M
  tied-embedding transformer, gradients from a real backward pass) and ``many`` (147 tensors,
  91.3 M parameters).
* ``TorchTrack``: ratios measured side by side in ONE process (contenders alternating):
  speed against the PyTorch baseline with and without the finiteness guard, and the adapter's
  overhead over ``fisheropt.*`` in µs per tensor (``fisheropt.torch.bench.measure_steps``).
* ``TorchTrain.track_train_speed``: a whole training step of the transformer, speed relative to
  torch fused AdamW (``fisheropt.torch.bench.measure_training``).

Commits without ``fisheropt.torch``, torch or pytorch_optimizer are skipped ("n/a").
"""

from __future__ import annotations

import gc

from . import _common as C

RULES = ["adamw", "fadam", "coupled_adam"]
PROBLEMS = ["lm", "many"]
IMPLS = ["fot", "fot+finite", "fo", "baseline"]


def _bench():
    try:
        import torch  # noqa: F401

        from fisheropt.torch import bench
    except ImportError as exc:
        C.skip(f"fisheropt.torch or torch is not available: {exc}")
    return bench


class TorchStep:
    params = (RULES, IMPLS, PROBLEMS)
    param_names = ["rule", "impl", "problem"]
    timeout = 900
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, rule, impl, problem):
        bench = _bench()
        import torch

        params, grads, coupled, _ = bench.problem(problem)
        for p, g in zip(params, grads):
            p.grad = g
        self.keep = (params, grads)
        if impl in ("fot", "fot+finite"):
            opt = bench._fot(rule, params, coupled, check_finite=impl == "fot+finite")
            self.step = opt.step
        elif impl == "fo":
            opt = bench._fo(rule, params, coupled, check_finite=False)
            arrays = [g.numpy() for g in grads]
            self.step = lambda: opt.step(arrays)
        else:
            try:
                opt = bench._baseline(rule, params, coupled)
            except ImportError as exc:
                C.skip(f"no baseline here: {exc}")

            def step():
                with torch.no_grad():
                    opt.step()

            self.step = step
        self.step()  # kernels loaded, state allocated

    def teardown(self, rule, impl, problem):
        self.step = self.keep = None
        gc.collect()

    def time_step(self, rule, impl, problem):
        self.step()


class TorchTrack:
    """Ratios from one process: fot vs the PyTorch baseline, and fot's overhead over fisheropt.*."""

    params = (RULES, PROBLEMS)
    param_names = ["rule", "problem"]
    timeout = 3600
    REPEATS = 7

    def setup_cache(self):
        bench = _bench()
        return {
            (rule, problem): bench.measure_steps(rule, problem, repeats=self.REPEATS)
            for problem in PROBLEMS
            for rule in RULES
        }

    track_speed_vs_baseline = C.tracked("speed_vs_base", "baseline time / fot time")
    track_speed_vs_baseline_finite = C.tracked("speed_vs_base_finite", "baseline time / fot (check_finite) time")
    track_adapter_overhead = C.tracked("overhead_us_per_tensor", "µs per tensor (fot - fo)")


class TorchTrain:
    """A whole training step (forward, backward, optimizer) of the ~17 M transformer."""

    params = (["fot AdamW", "fot FAdam", "fot CoupledAdam", "torch AdamW(fused)", "pytorch_optimizer FAdam"],)
    param_names = ["optimizer"]
    timeout = 3600

    def setup_cache(self):
        bench = _bench()
        rows, _ = bench.measure_training(repeats=5)
        return {r["optimizer"]: r for r in rows}

    track_train_speed = C.tracked("vs_torch_fused_adamw", "torch fused AdamW step time / this step time")
