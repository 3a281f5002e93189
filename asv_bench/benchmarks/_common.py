"""Helpers shared by the benchmarks; every one works against any commit of fisheropt's history.

asv runs the benchmarks of the working tree against the fisheropt of each commit
it builds, so nothing here may assume more than the oldest commit offers: imports
happen inside functions, and whatever a commit lacks (a backend, a rule, a
function, numba, torch) raises ``NotImplementedError``, which asv records as a
skipped benchmark ("n/a") instead of a failure. Only the public optimizer classes
(``fo.Adam(params, lr=..., weight_decay=..., backend=..., check_finite=...)``,
``opt.step(grads)``, ``opt.state``) and ``fo.backends`` are relied upon: they
are unchanged since the first commit.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np


def _working_tree_module(relative_path: str, name: str):
    """A module of this repository's working tree, loaded by path (not the installed fisheropt's)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: pickle finds functions through sys.modules
    spec.loader.exec_module(module)
    return module


# The bandwidth ceiling, round-robin timing and the PyTorch baselines: the same file at every
# commit asv measures, so the ratios of the history share one ruler (it imports nothing from
# fisheropt, and the oldest commits have no fisheropt.bench_ceiling at all).
bench_ceiling = _working_tree_module("fisheropt/bench_ceiling.py", "fisheropt_bench_ceiling_of_the_working_tree")

RULES = ("adam", "adamw", "fadam", "coupled_adam")

# Bytes each rule must move per element, in itemsizes (the minimum traffic of the rule, as in
# README "Performance"): Adam/AdamW read θ,g,m,v and write θ,m,v = 7; FAdam (two passes)
# 10; Coupled Adam 6 on a coupled matrix (7, as AdamW, on the others). Fixed here, not read
# from the installed package, so that GB/s mean the same thing at every commit.
ITEMS_PER_ELEMENT = {"adam": 7, "adamw": 7, "fadam": 10, "coupled_adam": 6}

_CLASS = {"adam": "Adam", "adamw": "AdamW", "fadam": "FAdam", "coupled_adam": "CoupledAdam"}


try:  # asv >= 0.6: the exception that also skips when raised inside the benchmark function
    from asv_runner.benchmarks.mark import SkipNotImplemented as _Skip
except ImportError:  # outside asv, or an older asv (where setup's NotImplementedError skips)
    _Skip = NotImplementedError


def skip(reason) -> None:
    """Raise the exception asv reports as "skipped" ("n/a"), from setup or from the benchmark."""
    raise _Skip(str(reason))


def tracked(key: str, unit: str):
    """A ``track_`` method in ``unit``: figure ``key`` of the row that the class's ``setup_cache``
    measured for these parameters (rows keyed by the parameter tuple, or by the one parameter);
    skipped where that figure was not measured."""

    def track(self, results, *params):
        value = (results.get(params if len(params) > 1 else params[0]) or {}).get(key)
        if value is None:
            skip(f"{key} was not measured for {', '.join(map(str, params))} here")
        return value

    track.unit = unit
    return track


def fisheropt():
    try:
        import fisheropt as fo
    except ImportError as exc:
        skip(f"fisheropt does not import: {exc}")
    return fo


def backend(name: str):
    """The backend module ``name``; skip where this commit or this environment lacks it."""
    fo = fisheropt()
    if name not in fo.backends.available():
        skip(f"{name}: {fo.backends.unavailable().get(name, 'no such backend at this commit')}")
    return fo.backends.get(name)


# ---- problems -------------------------------------------------------------------
def parse_size(text: str):
    if text == "many":
        return "many"
    base, exp = text.split("^")
    return int(base) ** int(exp)


def problem_shapes(rule: str, size, d: int = 768):
    """(shapes, coupled flags) for a rule and a size ("many" or an element count).

    Coupled Adam steps a (size // d) × d matrix whose second moment is one length-d vector;
    the other rules one flat tensor."""
    size = parse_size(size) if isinstance(size, str) else size
    if size == "many":
        shapes = bench_ceiling.transformer_shapes()
        return shapes, [s == (8192, 768) for s in shapes]
    if rule == "coupled_adam":
        d = min(d, size)
        return [(size // d, d)], [True]
    return [(size,)], [False]


def moved_bytes(rule: str, shapes, coupled, itemsize: int) -> int:
    total = 0
    for s, c in zip(shapes, coupled):
        items = ITEMS_PER_ELEMENT[rule] if (rule != "coupled_adam" or c) else ITEMS_PER_ELEMENT["adamw"]
        total += math.prod(s) * items * itemsize
    return total


def random_arrays(shapes, seed: int, scale: float = 1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s, dtype=np.float32) * np.float32(scale), dtype=dtype) for s in shapes]


def make_optimizer(rule: str, backend_name: str, params, coupled, check_finite: bool = False):
    """A fisheropt optimizer of ``rule`` on ``backend_name`` (skip where this commit lacks either)."""
    fo = fisheropt()
    backend(backend_name)
    cls = getattr(fo, _CLASS[rule], None)
    if cls is None:
        skip(f"no {_CLASS[rule]} at this commit")
    kw = {"lr": 1e-3, "backend": backend_name, "check_finite": check_finite}
    if rule == "adam":
        kw["weight_decay"] = 0.0
    elif rule in ("adamw", "coupled_adam"):
        kw["weight_decay"] = 0.01
    if rule == "coupled_adam":
        kw["coupled"] = list(coupled)
    return cls(params, **kw)


def state_nbytes(opt) -> int:
    return sum(int(a.nbytes) for arrays in opt.state.values() for a in arrays)


# ---- PyTorch baselines ------------------------------------------------------------
def torch_baseline(rule: str, params, grads, share_with=None):
    """(name, step callable) of the PyTorch counterpart of ``rule`` on the same numpy buffers, or
    None (``bench_ceiling.torch_baseline``). With ``share_with`` (a fisheropt Adam/AdamW optimizer)
    torch's m and v are fisheropt's arrays, so both race over the same memory."""
    base = bench_ceiling.torch_baseline(rule)
    if base is None:
        return None
    shared = None
    if share_with is not None and rule in ("adam", "adamw"):
        shared = (share_with.state["m"], share_with.state["v"])
    return base[0], bench_ceiling.torch_stepper(base[1], params, grads, shared)


# ---- memory -----------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn):
    """(peak resident memory during ``fn()`` above the resident memory before it, fn's result).

    Linux only: resets the process's high-water mark (``/proc/self/clear_refs``) and reads
    VmHWM afterwards, so it counts every allocation that was touched (NumPy, Numba's NRT,
    BLAS), unlike tracemalloc."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    except (OSError, KeyError) as exc:
        skip(f"cannot reset the resident-memory high-water mark here: {exc}")
    result = fn()
    return _status_bytes("VmHWM") - before, result
