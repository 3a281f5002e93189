"""Natural-gradient descent on PyTorch models (``fisheropt.torch.NaturalGradient``), airspeed velocity.

Two workloads (issue 16, "Speed and scale"):

* ``IEFStep`` — one iEF step (per-sample gradients + the N×N Gram solve + the update) on an MLP
  with P ≈ 10⁶ float32 trainable parameters (512-1024-460-10, P = 1,001,422), N = 64, against one
  ``torch.optim.AdamW`` training step (forward, backward, update) on the same batch; the split
  between the per-sample gradients and the solve, and the solve's time over the bare ``G @ G.T``
  (target ≤ 1.3, as for ``fisheropt.fisher.ngd_direction``).
* ``ExactDirection`` — the exact natural-gradient direction (F + λI)⁻¹∇L (N = 64, C = 10):
  matrix-free (``FisherOperator`` + conjugate gradients, a fixed number of iterations) at
  P ≈ 10⁷ and at the J-based comparison size, and through the logits Jacobian J
  (``exact_method="woodbury"``, ``fisheropt.fisher.ngd_direction``) at P = 2¹⁸ (J alone is then
  640 MiB float32, plus its float64 factor, 1.25 GiB: the J-based path needs about 7.5 KiB per
  parameter, so it stops near P ≈ 2·10⁶ on a 24 GiB machine). Time and peak resident memory
  above the model (VmHWM, every allocation torch makes included).

Threads: torch runs with ``FISHEROPT_BENCH_TORCH_THREADS`` threads (default 1), and the optimizer
limits BLAS to the same number. On the shared 2-core development machine, whose load is often
above its core count, a torch parallel region waits for its slowest thread, so two threads made
single operations 10-50× slower and the timings meaningless (e.g. a 1 M-element ``add_`` 16 ms
with 2 threads, 0.5 ms with 1); AdamW and iEF are measured under the same setting.

Every benchmark skips ("n/a") at commits without ``fisheropt.torch.NaturalGradient`` or without torch.
``python asv_bench/benchmarks/bench_natural_gradient.py [ief|exact|all]`` prints the headline numbers.
"""

from __future__ import annotations

import gc
import time

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

N, CLASSES = 64, 10


def _modules():
    try:
        import torch
    except ImportError:
        C.skip("torch is not installed")
    fo = C.fisheropt()
    try:
        import fisheropt.torch as fot

        fot.NaturalGradient  # noqa: B018
    except (ImportError, AttributeError) as exc:
        C.skip(f"no fisheropt.torch.NaturalGradient at this commit: {exc}")
    import os

    torch.set_num_threads(int(os.environ.get("FISHEROPT_BENCH_TORCH_THREADS", "1")))
    return torch, fo, fot


def _mlp(torch, sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _batch(torch, n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, n_in, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def _min_time(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class IEFStep:
    """iEF step vs AdamW step at P ≈ 10⁶, N = 64 (CPU, float32)."""

    SIZES = (512, 1024, 460, CLASSES)
    timeout = 600
    number = 1
    repeat = 5
    warmup_time = 0

    def setup(self):
        torch, fo, fot = _modules()
        self.torch, self.fo = torch, fo
        self.model = _mlp(torch, self.SIZES)
        self.x, self.y = _batch(torch, self.SIZES[0])
        self.ief = fot.NaturalGradient(self.model, kind="ief", lr=0.0, damping=1e-3)  # lr 0: same point every run
        self.adamw = torch.optim.AdamW(self.model.parameters(), lr=0.0)
        self.ief.step(self.x, self.y)  # warm up (numba compile, allocator)
        self.adamw_step()

    def adamw_step(self):
        torch = self.torch
        self.adamw.zero_grad()
        torch.nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.adamw.step()

    def time_ief_step(self):
        self.ief.step(self.x, self.y)

    def time_adamw_step(self):
        self.adamw_step()

    def track_ief_over_adamw(self):
        """min-of-3 iEF step time / min-of-3 AdamW step time (interleaved)."""
        t_ief, t_adam = [], []
        for _ in range(3):
            t_ief.append(_min_time(lambda: self.ief.step(self.x, self.y), 1))
            t_adam.append(_min_time(self.adamw_step, 1))
        return min(t_ief) / min(t_adam)

    track_ief_over_adamw.unit = "ratio"

    def track_per_sample_share(self):
        """Fraction of the iEF step spent on per-sample gradients (the rest: the solve and the update)."""
        shares = []
        for _ in range(3):
            self.ief.step(self.x, self.y)
            s = self.ief.last_stats
            shares.append(s["time_grads"] / s["time_total"])
        return min(shares)

    track_per_sample_share.unit = "fraction"

    def track_solve_over_gram(self):
        """The direction's solve (``ngd_direction("ief")`` inside the step) over
        ``G @ G.T`` alone on the same G (min of 3 each, interleaved)."""
        G = self.fo_G()
        t_solve, t_gram = [], []
        for _ in range(3):
            self.ief.step(self.x, self.y)
            t_solve.append(self.ief.last_stats["time_solve"])
            t_gram.append(_min_time(lambda: G @ G.T, 1))
        return min(t_solve) / min(t_gram)

    track_solve_over_gram.unit = "ratio"

    def fo_G(self):
        import fisheropt.torch as fot

        return fot.per_sample_grads(self.model, self.x, self.y).G.numpy()


class ExactDirection:
    """Exact natural-gradient direction: matrix-free CG at P ≈ 10⁷ and 2¹⁸, J-based at 2¹⁸ (N = 64, C = 10)."""

    params = (("cg-1e7", "cg-2^18", "woodbury-2^18"),)
    param_names = ("method-P",)
    SIZES = {
        "cg-1e7": (1024, 4096, 1415, CLASSES),
        "cg-2^18": (256, 512, 250, CLASSES),
        "woodbury-2^18": (256, 512, 250, CLASSES),
    }
    CG_ITERS = 30  # a fixed amount of work: rtol tiny, maxiter = CG_ITERS
    timeout = 1800
    number = 1
    repeat = 1
    rounds = 1
    warmup_time = 0

    def setup(self, case):
        torch, fo, fot = _modules()
        self.torch, self.fot = torch, fot
        sizes = self.SIZES[case]
        self.model = _mlp(torch, sizes)
        self.x, self.y = _batch(torch, sizes[0])
        self.P = sum(p.numel() for p in self.model.parameters())
        method = case.split("-")[0]
        self.opt = fot.NaturalGradient(
            self.model,
            kind="exact",
            lr=0.0,
            damping=1e-3,
            damping_mode="absolute",
            exact_method=method,
            cg_rtol=1e-30 if method == "cg" else 1e-4,
            cg_maxiter=self.CG_ITERS,
            on_cg_fail="warn",
        )

    def _direction(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fixed iteration count never meets rtol=1e-30
            self.opt.step(self.x, self.y)
        return self.opt.last_stats

    def time_direction(self, case):
        self._direction()

    def track_seconds(self, case):
        t = time.perf_counter()
        self._direction()
        return time.perf_counter() - t

    track_seconds.unit = "s"

    def track_peak_extra_mib(self, case):
        """Peak resident memory during one step above the resident memory before it (VmHWM)."""
        gc.collect()
        extra, _ = C.peak_extra_bytes(self._direction)
        return extra / 2**20

    track_peak_extra_mib.unit = "MiB"


def _report_ief():
    b = IEFStep()
    b.setup()
    t_ief = _min_time(b.time_ief_step, 3)
    t_adam = _min_time(b.time_adamw_step, 3)
    s = b.ief.last_stats
    P = sum(p.numel() for p in b.model.parameters())
    print(
        f"iEF step, P={P}, N={N}, float32: {t_ief * 1e3:.0f} ms (min of 3); AdamW step {t_adam * 1e3:.1f} ms; "
        f"ratio {t_ief / t_adam:.1f}x"
    )
    print(
        f"  split: per-sample grads {s['time_grads'] * 1e3:.0f} ms, damping scale (diag GGᵀ) "
        f"{s.get('time_scale', 0.0) * 1e3:.0f} ms, solve {s['time_solve'] * 1e3:.0f} ms, "
        f"update {s['time_update'] * 1e3:.1f} ms; solve / (G @ G.T) = {b.track_solve_over_gram():.2f}; "
        f"per-sample share {b.track_per_sample_share():.2f}"
    )


def _report_exact(cases):
    for case in cases:
        b = ExactDirection()
        b.setup(case)
        gc.collect()
        t = time.perf_counter()
        extra, stats = C.peak_extra_bytes(b._direction)
        dt = time.perf_counter() - t
        model_mib = b.P * 4 / 2**20
        print(
            f"exact {case}: P={b.P}: {dt:.1f} s, peak extra {extra / 2**20:.0f} MiB (model {model_mib:.0f} MiB); "
            f"method {stats.get('method')}, grads {stats['time_grads']:.1f} s, solve {stats['time_solve']:.1f} s, "
            f"CG iterations {stats.get('cg_iterations', '-')}"
        )
        del b
        gc.collect()


if __name__ == "__main__":
    import sys

    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("ief", "all"):
        _report_ief()
    if what in ("exact", "all"):
        _report_exact(sys.argv[2:] or ("woodbury-2^18", "cg-2^18", "cg-1e7"))
