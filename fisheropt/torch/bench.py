"""``python -m fisheropt.torch.bench``: fisheropt.torch against PyTorch optimizers, side by side.

Every number is a ratio of medians measured in ONE process, the contenders timed
round-robin (alternating, so that a busy machine slows them alike) over the same
parameter and gradient memory:

* optimizer step, ``fot.X`` (``check_finite=False`` and the default ``True``) against
  ``torch.optim.AdamW(fused=True)`` (AdamW; it steps the very same state tensors),
  ``pytorch_optimizer.FAdam`` (FAdam) and :class:`ForeachCoupledAdam` (Coupled Adam:
  torch ``_foreach`` ops, the official rule, written here), and against ``fo.X`` on NumPy
  views of the same tensors (the adapter's overhead, with the budget
  ``fot ≤ 1.05 × fo + 2 µs per tensor``);
* a whole training step (forward, backward, optimizer, zero_grad) of a ~17 M-parameter
  tied-embedding transformer on the word corpus, with fot AdamW, FAdam, CoupledAdam,
  torch fused AdamW and pytorch_optimizer FAdam.

Problems: ``many`` (the 147-tensor GPT-2-small-like list of ``fisheropt bench``, 91.3 M
parameters, random gradients), ``lm`` (the transformer's own 100 tensors with gradients
from a real backward pass), ``small`` (147 tensors of 32×32: the per-tensor overhead).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
from collections.abc import Callable
from typing import Any, overload

import numpy as np

from fisheropt.bench_ceiling import interleaved_medians, interleaved_times

RULES = ("adamw", "fadam", "coupled_adam")
PROBLEMS = ("small", "lm", "many")
BASELINE = {
    "adamw": "torch AdamW(fused)",
    "fadam": "pytorch_optimizer FAdam",
    "coupled_adam": "torch foreach CoupledAdam",
}
HYPER: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=1e-3, weight_decay=0.01),
    "fadam": dict(lr=1e-3),
    "coupled_adam": dict(lr=1e-3),
}
# The ~17 M-parameter transformer: every word of the corpus (~3000), d=512, 5 layers.
LM = dict(vocab=100_000, dim=512, layers=5, heads=8, context=64, batch=8)
LM_QUICK = dict(vocab=2000, dim=128, layers=2, heads=4, context=32, batch=8)


def _torch():
    import torch

    return torch


# ---- the comparison implementation of Coupled Adam ------------------------------------------
def foreach_coupled_adam_class():
    torch = _torch()
    # torch.optim's own multi-tensor ops; torch leaves them out of its exports, hence one ignore each.
    foreach_mul_ = torch._foreach_mul_  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_lerp_ = torch._foreach_lerp_  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_addcmul_ = torch._foreach_addcmul_  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_sqrt_ = torch._foreach_sqrt_  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_sqrt = torch._foreach_sqrt  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_div_ = torch._foreach_div_  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_add_ = torch._foreach_add_  # pyright: ignore[reportPrivateImportUsage]  # unexported
    foreach_addcdiv_ = torch._foreach_addcdiv_  # pyright: ignore[reportPrivateImportUsage]  # unexported

    class ForeachCoupledAdam(torch.optim.Optimizer):
        """Coupled Adam in torch ``_foreach`` ops, as the official implementation defines it: AdamW,
        except that a coupled (V×d embedding) tensor divides by the mean over its V rows of the
        per-element second moment ``exp_avg_sq`` (kept V×d). Param groups take ``coupled``."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, coupled=False))

        @overload
        def step(self, closure: None = None) -> None: ...

        @overload
        def step(self, closure: Callable[[], float]) -> float: ...

        @torch.no_grad()
        def step(self, closure: Callable[[], float] | None = None) -> float | None:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                if not ps:
                    continue
                gs = [p.grad for p in ps]
                for p in ps:
                    st = self.state[p]
                    if not st:
                        st["step"] = 0
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    st["step"] += 1
                ms = [self.state[p]["exp_avg"] for p in ps]
                vs = [self.state[p]["exp_avg_sq"] for p in ps]
                step = self.state[ps[0]]["step"]
                lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                foreach_mul_(ps, 1 - lr * wd)
                foreach_lerp_(ms, gs, 1 - b1)
                foreach_mul_(vs, b2)
                foreach_addcmul_(vs, gs, gs, value=1 - b2)
                step_size = lr / (1 - b1**step)
                bc2 = math.sqrt(1 - b2**step)
                if group["coupled"]:
                    denom = [v.mean(dim=0, keepdim=True) for v in vs]
                    foreach_sqrt_(denom)
                else:
                    denom = foreach_sqrt(vs)
                foreach_div_(denom, bc2)
                foreach_add_(denom, eps)
                if group["coupled"]:
                    for p, m, d in zip(ps, ms, denom):
                        p.addcdiv_(m, d, value=-step_size)
                else:
                    foreach_addcdiv_(ps, ms, denom, value=-step_size)
            return loss

    return ForeachCoupledAdam


# ---- problems ------------------------------------------------------------------------------
def lm_model(cfg, seed=0):
    from fisheropt.experiments.torch_lm import build_model, load_data

    data_cfg = dict(cfg, n_val=1)
    train, _, vocab, _ = load_data(data_cfg)
    cfg = dict(cfg, vocab=vocab)
    return build_model(cfg, seed), train, cfg


def lm_batch(train, cfg, rng):
    from fisheropt.experiments.torch_lm import batch_at

    return batch_at(train, cfg, rng)


def problem(name, *, quick=False, seed=0):
    """(params, grads, coupled flags, description): torch tensors; params are nn.Parameters."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    if name == "lm":
        model, train, cfg = lm_model(LM_QUICK if quick else LM, seed)
        x, y = lm_batch(train, cfg, rng)
        model.loss(x, y).backward()
        params = list(model.parameters())
        grads = []
        for p in params:
            assert p.grad is not None, "the backward pass reaches every parameter of the model"
            grads.append(p.grad.detach().clone())
            p.grad = None
        coupled = [p is model.tok.weight for p in params]
        return params, grads, coupled, f"transformer LM (d={cfg['dim']}, {cfg['layers']} layers, V={cfg['vocab']})"
    if name == "many":
        from fisheropt.bench_ceiling import transformer_shapes

        d, vocab = (256, 2048) if quick else (768, 8192)
        shapes = transformer_shapes(layers=2 if quick else 12, d=d, vocab=vocab)
        coupled = [s == (vocab, d) for s in shapes]  # the embedding
        desc = "GPT-2-small-like list"
    elif name == "small":
        shapes = [(32, 32)] * 147
        coupled = [True] + [False] * 146
        desc = "147 tensors of 32x32"
    else:
        raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s, dtype=np.float32))) for s in shapes]
    grads = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3)) for s in shapes]
    return params, grads, coupled, desc


# ---- contenders ----------------------------------------------------------------------------
def _fot(rule, params, coupled, check_finite):
    import fisheropt.torch as fot

    cls = fot.CLASSES[rule]
    if rule == "coupled_adam":
        yes = [p for p, c in zip(params, coupled) if c]
        no = [p for p, c in zip(params, coupled) if not c]
        groups = [g for g in ({"params": yes, "coupled": True}, {"params": no}) if g["params"]]
        return cls(groups, check_finite=check_finite, **HYPER[rule])
    return cls(params, check_finite=check_finite, **HYPER[rule])


def _fo(rule, params, coupled, check_finite):
    from fisheropt.optim import CLASSES

    arrays = [p.detach().numpy() for p in params]
    cls = CLASSES[rule]
    kw = {"coupled": coupled} if rule == "coupled_adam" else {}
    return cls(arrays, check_finite=check_finite, **kw, **HYPER[rule])


def _baseline(rule, params, coupled, share_with=None):
    torch = _torch()
    if rule == "adamw":
        opt = torch.optim.AdamW(params, fused=True, **HYPER[rule])
        if share_with is not None:  # the same state tensors as fot's (same memory for both: a fair race)
            opt.step()
            for p in params:
                st = opt.state[p]
                own = share_with.state[p]
                st["exp_avg"], st["exp_avg_sq"] = own["exp_avg"], own["exp_avg_sq"]
        return opt
    if rule == "fadam":
        from pytorch_optimizer import FAdam

        return FAdam(params, **HYPER[rule])
    if rule == "coupled_adam":
        yes = [p for p, c in zip(params, coupled) if c]
        no = [p for p, c in zip(params, coupled) if not c]
        groups = [g for g in ({"params": yes, "coupled": True}, {"params": no}) if g["params"]]
        return foreach_coupled_adam_class()(groups, **HYPER[rule])
    raise ValueError(rule)


def _stepper(opt, check_finite: bool, *args):
    """The timed unit: ``opt.step(*args)`` with its finite check set to ``check_finite``."""

    def run():
        opt.check_finite = check_finite
        opt.step(*args)

    return run


def measure_steps(rule, prob, *, repeats=7, quick=False, baseline=True, adapter=True, seed=0):
    """One row: medians (ms) of fot (check_finite False/True), fo (False/True) and the baseline."""
    torch = _torch()
    params, grads, coupled, desc = problem(prob, quick=quick, seed=seed)
    for p, g in zip(params, grads):
        p.grad = g
    arrays = [g.numpy() for g in grads]
    row = {
        "rule": rule,
        "problem": prob,
        "desc": desc,
        "tensors": len(params),
        "params_M": sum(p.numel() for p in params) / 1e6,
    }
    fot_opt = _fot(rule, params, coupled, check_finite=False)
    row["backend"] = fot_opt.backends.get("cpu")
    if adapter:  # pass 1: fot and fo on the same memory
        fo_opt = _fo(rule, params, coupled, check_finite=False)
        times = interleaved_times(
            {
                "fot": _stepper(fot_opt, False),
                "fo": _stepper(fo_opt, False, arrays),
                "fot+finite": _stepper(fot_opt, True),
                "fo+finite": _stepper(fo_opt, True, arrays),
            },
            repeats,
        )
        row.update({f"{k}_ms": float(np.median(v)) * 1e3 for k, v in times.items()})
        # the fastest round of each: on a busy machine the least disturbed estimate of the overhead
        row["overhead_us_per_tensor_min"] = (min(times["fot"]) - min(times["fo"])) * 1e6 / len(params)
        fo_opt = None  # its state freed before the baseline allocates its own
        gc.collect()
    if baseline:  # pass 2: fot and the PyTorch baseline
        fot_opt.step()  # fot's state exists (torch AdamW steps the very same state tensors)
        try:
            base = _baseline(rule, params, coupled, share_with=fot_opt if rule == "adamw" else None)
        except ImportError as exc:
            row["baseline_missing"] = str(exc)
        else:

            def base_step():
                with torch.no_grad():
                    base.step()

            med = interleaved_medians(
                {"fot ": _stepper(fot_opt, False), "base": base_step, "fot+finite ": _stepper(fot_opt, True)},
                repeats,
                pause={"base": 0.02},
            )
            row["baseline"] = BASELINE[rule]
            row["base_ms"] = med["base"] * 1e3
            row["fot_vs_base_ms"] = med["fot "] * 1e3
            row["fotf_vs_base_ms"] = med["fot+finite "] * 1e3
            row["speed_vs_base"] = med["base"] / med["fot "]
            row["speed_vs_base_finite"] = med["base"] / med["fot+finite "]
            del base
    if adapter:
        n = len(params)
        row["overhead_us_per_tensor"] = (row["fot_ms"] - row["fo_ms"]) * 1e3 / n
        row["overhead_ok"] = row["fot_ms"] <= 1.05 * row["fo_ms"] + 2e-3 * n
        row["overhead_ok_finite"] = row["fot+finite_ms"] <= 1.05 * row["fo+finite_ms"] + 2e-3 * n
    for p in params:
        p.grad = None
    fot_opt = None
    gc.collect()
    return row


TRAIN_CONTENDERS = ("fot AdamW", "fot FAdam", "fot CoupledAdam", "torch AdamW(fused)", "pytorch_optimizer FAdam")


def _train_step(model, opt, batches):
    def train_step():
        x, y = next(batches)
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


def measure_training(*, repeats=5, quick=False, seed=0, contenders=TRAIN_CONTENDERS):
    """Median time of a whole training step (forward, backward, step, zero_grad) per optimizer,
    each on its own copy of the transformer, the same batch for all, timed round-robin."""
    torch = _torch()
    import fisheropt.torch as fot

    cfg = LM_QUICK if quick else LM
    model0, train, cfg = lm_model(cfg, seed)
    rng = np.random.default_rng(seed)
    batches = [lm_batch(train, cfg, rng) for _ in range(repeats + 1)]
    fns, rows = {}, []
    for name in contenders:
        model, _, _ = lm_model(cfg, seed)
        if name == "fot AdamW":
            opt = fot.AdamW(model.parameters(), **HYPER["adamw"])
        elif name == "fot FAdam":
            opt = fot.FAdam(model.parameters(), **HYPER["fadam"])
        elif name == "fot CoupledAdam":
            opt = fot.CoupledAdam(fot.coupled_param_groups(model, named=False), **HYPER["coupled_adam"])
        elif name == "torch AdamW(fused)":
            opt = torch.optim.AdamW(model.parameters(), fused=True, **HYPER["adamw"])
        else:
            try:
                from pytorch_optimizer import FAdam
            except ImportError:
                continue
            opt = FAdam(model.parameters(), **HYPER["fadam"])

        fns[name] = _train_step(model, opt, itertools.cycle(batches))  # the same batches for every one
    med = interleaved_medians(fns, repeats, pause={n: 0.02 for n in fns})
    base = med.get("torch AdamW(fused)")
    for name, t in med.items():
        rows.append({"optimizer": name, "step_ms": t * 1e3, "vs_torch_fused_adamw": (base / t) if base else None})
    n_params = sum(p.numel() for p in model0.parameters())
    return rows, {"params_M": n_params / 1e6, "config": cfg, "tokens_per_step": cfg["batch"] * cfg["context"]}


def set_threads(n: int) -> None:
    """n threads for numba's kernels and for torch's (numba first: its OpenMP layer shares torch's count)."""
    try:
        import numba
        from numba.core import config

        most: int = config.NUMBA_NUM_THREADS  # pyright: ignore[reportAttributeAccessIssue]  # set at numba's import
        numba.set_num_threads(min(n, most))
    except ImportError:
        pass
    _torch().set_num_threads(n)


# ---- printing ------------------------------------------------------------------------------
def _f(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_step_rows(rows) -> str:
    head = (
        "| rule | problem | tensors | params (M) | fot ms | fot+finite ms | fo ms | fo+finite ms | "
        "adapter µs/tensor (median, fastest) | within budget | baseline | baseline ms | fot speed × | "
        "fot+finite speed × |"
    )
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["rule"],
                    r["problem"],
                    str(r["tensors"]),
                    _f(r["params_M"], 1),
                    _f(r.get("fot_ms")),
                    _f(r.get("fot+finite_ms")),
                    _f(r.get("fo_ms")),
                    _f(r.get("fo+finite_ms")),
                    _f(r.get("overhead_us_per_tensor")) + ", " + _f(r.get("overhead_us_per_tensor_min")),
                    _f(r.get("overhead_ok")) + "/" + _f(r.get("overhead_ok_finite")),
                    r.get("baseline", "-"),
                    _f(r.get("base_ms")),
                    _f(r.get("speed_vs_base")),
                    _f(r.get("speed_vs_base_finite")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def format_train_rows(rows, info) -> str:
    title = (
        f"Whole training step, {info['params_M']:.1f} M-parameter tied-embedding transformer, "
        f"{info['tokens_per_step']} tokens per step:"
    )
    lines = [title, "", "| optimizer | ms per training step | speed vs torch fused AdamW |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['step_ms']:.1f} | {_f(r['vs_torch_fused_adamw'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fisheropt.torch.bench", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    ap.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    ap.add_argument("--repeats", type=int, default=None, help="rounds per measurement (median; default 7, --quick 3)")
    ap.add_argument("--train-repeats", type=int, default=None, help="training steps timed per optimizer (default 5)")
    ap.add_argument("--no-train", action="store_true", help="skip the whole-training-step table")
    ap.add_argument("--no-steps", action="store_true", help="skip the optimizer-step table")
    ap.add_argument("--quick", action="store_true", help="small problems and few repeats (a smoke run)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every number as JSON")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and for numba alike (default: leave both as they are)",
    )
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    torch = _torch()
    import fisheropt as fo

    if args.threads:
        set_threads(args.threads)
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"fisheropt.torch bench: torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
        f"load average {load:.1f}; backends "
        f"{', '.join(fo.backends.available())}; medians of {repeats} rounds, contenders alternating in one process"
    )
    out = {"steps": [], "train": None, "torch_threads": torch.get_num_threads(), "load_average": load}
    if not args.no_steps:
        for prob in args.problems:
            for rule in args.rules:
                row = measure_steps(rule, prob, repeats=repeats, quick=args.quick)
                out["steps"].append(row)
                print(
                    f"  {rule:13s} {prob:6s} fot {row.get('fot_ms', 0):9.2f} ms  base {_f(row.get('base_ms'))} ms  "
                    f"speed x{_f(row.get('speed_vs_base'))} (finite x{_f(row.get('speed_vs_base_finite'))})  "
                    f"adapter {_f(row.get('overhead_us_per_tensor'))} us/tensor",
                    flush=True,
                )
        print()
        print(format_step_rows(out["steps"]))
    if not args.no_train:
        rows, info = measure_training(repeats=args.train_repeats or (2 if args.quick else 5), quick=args.quick)
        out["train"] = {"rows": rows, **info}
        print()
        print(format_train_rows(rows, info))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
