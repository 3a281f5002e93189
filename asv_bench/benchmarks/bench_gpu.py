"""GPU benchmarks of the cupy backend's update rules (skipped where no GPU is usable).

The measurement helpers here are also used by asv_bench/gpu_validate.py, which
prints the whole table (GB/s, ratio to an in-process device-to-device copy,
ratio to torch.optim.AdamW(fused=True)) in one command.

Every fact about a rule comes from its descriptor in the registry
(``fisheropt.refimpl.RULES``): which rules run (every rule with a kernel module
``backends/cupy/<name>.py``: :func:`gpu_rules`), their hyperparameters (the
defaults, with the deliberate :data:`OVERRIDES`), their state arrays
(``Rule.state``) and tensor flag (``Rule.tensor_flag``), and the bytes a step
moves (``fisheropt.bench.moved_bytes``, from ``Rule.items_per_element``: the
spec's fused schedule, e.g. Adam 7 itemsizes per parameter, read θ, g, m, v and
write θ, m, v). GB/s count those bytes, as ``fisheropt bench`` does, also where
a kernel moves more (CuPy's FAdam reads g once more, for RMS(g): 11 itemsizes
against the schedule's 10; Coupled Adam's float64 column partial sums are not
counted).

fisheropt is imported inside the functions (the rule list of the asv class
tolerates a fisheropt without the registry), and CuPy only where a GPU runs:
asv discovers these benchmarks on machines without CuPy and runs them against
old commits (``setup`` skips there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LARGE = 2**27
COLUMNS = 1024  # a rule with a tensor flag (V×d matrices) steps the large case as LARGE/COLUMNS × COLUMNS

# Deliberate departures from the descriptors' defaults, {rule: {hyperparameter: value}} by the
# descriptor's names ("betas", not "beta1"), for a default that would leave a path of the kernel
# unexercised. None is needed now: AdamW's and Coupled Adam's default decay (1e-2) and FAdam's (0.1)
# run their decay paths; Adam's 0 is torch.optim.Adam's default too, the configuration compared with
# torch fused; Lion's kernel computes its decay term whatever its value.
OVERRIDES: dict[str, dict[str, float]] = {}

# The rules with a torch.optim fused counterpart: rule -> decoupled (torch AdamW) or not (Adam).
# The others (FAdam, Coupled Adam, Lion) have none: their rows show no torch comparison.
TORCH_FUSED = {"adam": False, "adamw": True}


def gpu_rules() -> list[str]:
    """The registry's rules that have a CuPy kernel module (``backends/cupy/<name>.py`` of the
    installed fisheropt), in registry order: the rules benchmarked here. Imports no CuPy."""
    import fisheropt.backends
    from fisheropt.refimpl import RULES

    kernels = Path(str(fisheropt.backends.__file__)).parent / "cupy"
    return [name for name in RULES if (kernels / f"{name}.py").is_file()]


def _asv_rules() -> list[str]:
    try:
        return gpu_rules()
    except ImportError:  # a fisheropt without the registry (an old commit): no rule to list
        return []


def kernel_hyperparams(rule: str) -> dict[str, float]:
    """The hyperparameter keywords of ``rule``'s step function: the descriptor's defaults with
    :data:`OVERRIDES`, pairs split into their kernel names (betas -> beta1, beta2)."""
    from fisheropt.refimpl import RULES

    descriptor = RULES[rule]
    return descriptor.kernel_kwargs({**descriptor.defaults(), **OVERRIDES.get(rule, {})})


def tensor_flags(rule: str, n: int) -> dict[str, list[bool]]:
    """The keyword of the rule's tensor flag (Coupled Adam's ``coupled``) with all ``n`` tensors
    flagged (a flagged rule gets V×d matrices only: :func:`case_shapes`); {} for a rule without."""
    from fisheropt.refimpl import RULES

    flag = RULES[rule].tensor_flag
    return {} if flag is None else {flag.name: [True] * n}


def case_shapes(case: str, rule: str | None = None) -> list[tuple[int, ...]]:
    """The tensor shapes of ``case``: "large" (one 2^27-parameter tensor) or "transformer"
    (:func:`transformer_shapes`), as ``rule`` steps them. A rule with a tensor flag, which requires
    V×d matrices, gets the large tensor as rows of COLUMNS and the transformer's matrices only;
    the other rules (and ``rule`` None: torch's baselines) get every shape."""
    flagged = False
    if rule is not None:
        from fisheropt.refimpl import RULES

        flagged = RULES[rule].tensor_flag is not None
    if case == "large":
        return [(LARGE // COLUMNS, COLUMNS)] if flagged else [(LARGE,)]
    if case == "transformer":
        shapes = transformer_shapes()
        return [s for s in shapes if len(s) == 2] if flagged else shapes
    raise ValueError(f"unknown case {case!r}; cases: 'large', 'transformer'")


def step_bytes(rule: str, shapes, dtype="float32") -> int:
    """Bytes one step of ``rule`` moves over ``shapes`` (all flagged where the rule has a flag):
    ``fisheropt.bench.moved_bytes``, the descriptor's ``items_per_element`` × the itemsize."""
    from fisheropt.bench import moved_bytes

    flags = tensor_flags(rule, len(shapes))
    flagged = next(iter(flags.values()), [False] * len(shapes))
    return moved_bytes(rule, shapes, flagged, np.dtype(dtype).itemsize)


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


def make_problem(rule, shapes, dtype="float32", seed=0, xp=None):
    """(params, grads, *state) for ``rule``, arrays of the module ``xp`` (CuPy by default).

    The state lists are the descriptor's (``Rule.state``, in its order, as the step function
    takes them): zeros shaped like each parameter, or (d,) for a ``per_column`` array of a
    flagged V×d tensor (every tensor is flagged where the rule has a flag: :func:`tensor_flags`)."""
    if xp is None:
        import cupy as xp
    from fisheropt.refimpl import RULES

    descriptor = RULES[rule]
    flagged = descriptor.tensor_flag is not None
    rng = xp.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=dtype) for s in shapes]
    grads = [rng.standard_normal(s, dtype=dtype) * 1e-2 for s in shapes]
    state = [
        [xp.zeros(s[1] if spec.per_column and flagged else s, dtype=dtype) for s in shapes] for spec in descriptor.state
    ]
    return (params, grads, *state)


def make_step(rule, shapes, dtype="float32", *, backend="cupy", xp=None):
    """A callable taking one step of ``rule`` (``Rule.step_function`` of ``backend``, no
    finiteness check) on a fresh :func:`make_problem`, its step count advancing from 1."""
    import fisheropt as fo
    from fisheropt.refimpl import RULES

    fn = getattr(fo.backends.get(backend), RULES[rule].step_function)
    params, grads, *state = make_problem(rule, shapes, dtype, xp=xp)
    hyperparams = kernel_hyperparams(rule)
    flags = tensor_flags(rule, len(shapes))
    count = {"t": 0}

    def step():
        count["t"] += 1
        fn(params, grads, *state, step=count["t"], **hyperparams, **flags)

    return step


def fo_step_ms(rule, shapes, dtype="float32", reps=30) -> float:
    """Time of one cupy backend step (no finiteness check) in ms, by :func:`gpu_time_ms`."""
    return gpu_time_ms(make_step(rule, shapes, dtype), reps=reps)


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
    hp = kernel_hyperparams("adamw" if decoupled else "adam")  # the same values as our rows
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
    """asv: GB/s of each rule with a CuPy kernel (:func:`gpu_rules`) on one 2^27-parameter
    float32 tensor and on a 148-tensor model (:func:`case_shapes`)."""

    params = (_asv_rules(), ["large", "transformer"])
    param_names = ["rule", "case"]
    unit = "GB/s"
    timeout = 600

    def setup(self, rule, case):
        if cupy_or_none() is None:
            raise NotImplementedError("cupy backend unavailable (no GPU)")
        try:
            from fisheropt.bench import moved_bytes  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError(f"this fisheropt predates the rule registry: {exc}") from exc
        if rule not in gpu_rules():
            raise NotImplementedError(f"no cupy kernel for {rule} in this fisheropt")

    def track_gbps(self, rule, case):
        shapes = case_shapes(case, rule)
        ms = fo_step_ms(rule, shapes)
        return step_bytes(rule, shapes) / (ms * 1e-3) / 1e9


class GPUCopy:
    unit = "GB/s"

    def setup(self):
        if cupy_or_none() is None:
            raise NotImplementedError("cupy backend unavailable (no GPU)")

    def track_copy_gbps(self):
        return copy_gbps()
