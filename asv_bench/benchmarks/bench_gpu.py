"""GPU benchmarks of the cupy backend's update rules (skipped where no GPU is usable).

The measurement helpers here are also used by asv_bench/gpu_validate.py, which
prints the whole table (GB/s, ratio to an in-process device-to-device copy,
ratio to torch.optim.AdamW(fused=True)) in one command.

Bytes per parameter (float32), counted as the minimum traffic of each rule:
Adam/AdamW read θ, g, m, v and write θ, m, v: 28 B; FAdam reads g (RMS), then
θ, g, f and writes f (preconditioner RMS), then reads θ, g, m, f and writes
θ, m: 44 B; Coupled Adam reads g (column sums), then θ, g, m and writes θ, m:
24 B (+ the float64 column partial sums, ~1/rows_per_tile of g, not counted).
"""

from __future__ import annotations

import numpy as np

BYTES_PER_PARAM = {"adam": 7, "adamw": 7, "fadam": 11, "coupled_adam": 6}  # × itemsize
LARGE = 2**27


def transformer_shapes(layers: int = 12, d: int = 768, vocab: int = 8192, ctx: int = 1024):
    """~150 tensors like a GPT-2-small block stack: one 8192×768 embedding, 768×768 and
    768×3072 matrices, bias and layer-norm vectors (148 tensors, ~92 M parameters)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(d, 4 * d), (4 * d, d), (4 * d,), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def cupy_or_none():
    try:
        import fisheropt as fo

        if fo.backends.unavailable().get("cupy") is not None:
            return None
        import cupy

        return cupy
    except Exception:
        return None


def gpu_time_ms(fn, *, warmup: int = 5, reps: int = 30, sync=None) -> float:
    """Time per call of ``fn()`` in milliseconds: ``reps`` calls back to back between two CUDA
    events on the current CuPy stream, so the host runs ahead as in training (per-call
    Python overhead counts only where it is longer than the GPU work)."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    if sync is not None:
        sync()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    best = float("inf")
    for _ in range(3):  # best of three batches
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / reps)
    return best


def copy_gbps(n: int = LARGE, dtype="float32", reps: int = 30) -> float:
    """Device-to-device copy bandwidth (read + write counted) in GB/s, in this process."""
    import cupy

    src = cupy.ones(n, dtype=dtype)
    dst = cupy.empty_like(src)

    def copy():
        dst.data.copy_from_device_async(src.data, src.nbytes)

    ms = gpu_time_ms(copy, reps=reps)
    return 2 * n * np.dtype(dtype).itemsize / (ms * 1e-3) / 1e9


def make_problem(rule, shapes, dtype="float32", seed=0):
    """Device params, grads and state for ``rule`` (CuPy arrays)."""
    import cupy

    rng = cupy.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=dtype) for s in shapes]
    grads = [rng.standard_normal(s, dtype=dtype) * 1e-2 for s in shapes]
    m = [cupy.zeros_like(p) for p in params]
    if rule == "coupled_adam":
        v = [cupy.zeros(s[1], dtype=dtype) for s in shapes]
    else:
        v = [cupy.zeros_like(p) for p in params]
    return params, grads, m, v


HP = {
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
    "adamw": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    "fadam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps2=0.01, clip=1.0, p=0.5, weight_decay=0.1),
    "coupled_adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
}


def fo_step_ms(rule, shapes, dtype="float32", reps=30) -> float:
    """Median time of one backend step (no finiteness check) in ms."""
    import fisheropt as fo

    backend = fo.backends.get("cupy")
    fn = getattr(backend, f"{rule}_step")
    params, grads, m, v = make_problem(rule, shapes, dtype)
    state = {"t": 0}

    flags = {"coupled": [True] * len(params)} if rule == "coupled_adam" else {}  # every tensor V×d

    def step():
        state["t"] += 1
        fn(params, grads, m, v, step=state["t"], **HP[rule], **flags)

    return gpu_time_ms(step, reps=reps)


def torch_fused_ms(shapes, *, decoupled=True, dtype="float32", reps=30) -> float | None:
    """Median time of torch.optim.AdamW(fused=True) (Adam if not decoupled), or None without CUDA torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=tdt, generator=gen))
        p.grad = torch.randn(s, device="cuda", dtype=tdt, generator=gen) * 1e-2
        params.append(p)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    hp = HP["adamw" if decoupled else "adam"]
    opt = cls(
        params,
        lr=hp["lr"],
        betas=(hp["beta1"], hp["beta2"]),
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        fused=True,
    )
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    best = float("inf")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):  # same protocol as gpu_time_ms: back-to-back steps, best of three batches
        start.record()
        for _ in range(reps):
            opt.step()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    del opt, params
    torch.cuda.empty_cache()
    return best


# ---- asv -------------------------------------------------------------------------
class GPUUpdateRules:
    """asv: GB/s of each rule on one 2^27-parameter float32 tensor and on a 148-tensor model."""

    params = (["adam", "adamw", "fadam", "coupled_adam"], ["large", "transformer"])
    param_names = ["rule", "case"]
    unit = "GB/s"
    timeout = 600

    def setup(self, rule, case):
        if cupy_or_none() is None:
            raise NotImplementedError("cupy backend unavailable (no GPU)")

    def track_gbps(self, rule, case):
        if case == "large":
            shapes = [(LARGE // 1024, 1024)] if rule == "coupled_adam" else [(LARGE,)]
        else:
            shapes = transformer_shapes()
            if rule == "coupled_adam":
                shapes = [s for s in shapes if len(s) == 2]
        n = sum(int(np.prod(s)) for s in shapes)
        ms = fo_step_ms(rule, shapes)
        return BYTES_PER_PARAM[rule] * 4 * n / (ms * 1e-3) / 1e9


class GPUCopy:
    unit = "GB/s"

    def setup(self):
        if cupy_or_none() is None:
            raise NotImplementedError("cupy backend unavailable (no GPU)")

    def track_copy_gbps(self):
        return copy_gbps()
