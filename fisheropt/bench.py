"""``fisheropt bench`` / ``python -m fisheropt.bench``: optimizer step throughput.

Prints one table row per update rule × backend × size: the median time of one
optimizer step (``check_finite=False``) and of one step with the default
finite check, the memory traffic it implies (GB/s, 1e9 bytes/s, from the
rule's byte count per element), the ratio of that to the in-process
bandwidth ceiling (``a += s*b`` in Numba, measured in this process over the
same parameter, gradient and optimizer-state buffers), and, where installed, the speed ratio of the
PyTorch baseline to this row (``torch.optim.Adam/AdamW(fused=True)`` for
Adam/AdamW, ``pytorch_optimizer.FAdam`` for FAdam; > 1 means fisheropt is faster).

Sizes are element counts of one tensor (``2^25``, ``1048576``, ``1e6``) or
``many``: a transformer-like list of 147 tensors (12 layers of 768×768 ×4,
768×3072, 3072×768 and vectors, plus an 8192×768 embedding; 91.3 M parameters).

The machine matters more than the code for absolute numbers; compare ratios
taken in one process.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import numpy as np

from .bench_ceiling import (
    ceiling_buffers,
    ceiling_kernel,
    ceiling_on,
    interleaved_medians,
    torch_baseline,
    torch_stepper,
    transformer_shapes,
)
from .refimpl import RULES as REGISTRY

RULES = tuple(REGISTRY)  # every update rule of the registry
DEFAULT_SIZES = ("2^16", "2^20", "2^25", "many")
QUICK_SIZES = ("2^16", "2^20", "many")

# Bytes moved per element by the fused schedules, in units of the itemsize (float32: × 4), come
# from each rule's descriptor (``items_per_element``; for tensors whose flag is False,
# ``items_per_element_unflagged``), e.g. Adam 7 (read θ,g,m,v, write θ,m,v), FAdam 10 (FAdam's
# tiny-gradient schedule moves 11: backends/numba/fadam.py). all_finite reads g: 1.
# The numpy reference moves several times more; its GB/s use the same count, as a speed measure.
FINITE_ITEMS = 1

# numpy reference rows above this many elements are skipped unless --numpy-large (too slow to be useful).
NUMPY_MAX_ELEMENTS = 1 << 22


# ---- problems -----------------------------------------------------------------
# Largest size accepted (elements of one tensor): 2^31, 8 GiB per float32 array; a row holds
# several such arrays (params, grads, optimizer state per backend), so larger is never sane here.
MAX_SIZE = 1 << 31
_SIZE_HELP = "a positive whole number of elements (2^25, 2**25, 1048576, 1e6) or 'many'"


def parse_size(text: str):
    """'many' or a positive element count ('2^25', '2**25', '1048576', '1e6'), at most MAX_SIZE.

    Anything else raises argparse.ArgumentTypeError with a one-line reason."""
    t = str(text).strip().lower()
    if t == "many":
        return "many"
    try:
        if "^" in t or "**" in t:
            base, exp = t.split("^", 1) if "^" in t else t.split("**", 1)
            base, exp = int(base), int(exp)
            if exp < 0:
                raise argparse.ArgumentTypeError(f"size {text!r}: the exponent must not be negative")
            if abs(base) > 1 and exp > MAX_SIZE.bit_length():  # too large; never compute the power
                n = (MAX_SIZE + 1) * (-1 if base < 0 and exp % 2 else 1)
            else:
                n = base**exp
        else:
            try:
                n = int(t)
            except ValueError:
                x = float(t)
                if not math.isfinite(x):
                    raise argparse.ArgumentTypeError(f"size {text!r} is not a finite number") from None
                if not x.is_integer():
                    raise argparse.ArgumentTypeError(f"size {text!r} is not a whole number of elements") from None
                n = int(x)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected {_SIZE_HELP}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    if n > MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is too large (at most 2^{MAX_SIZE.bit_length() - 1} = {MAX_SIZE} elements)"
        )
    return n


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def backend_name(text: str) -> str:
    """argparse type for --backends: a known fisheropt backend that is usable here on host arrays."""
    from fisheropt import backends

    if text not in backends.KNOWN:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; known backends: {', '.join(backends.KNOWN)}")
    reason = backends.unavailable().get(text)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"backend {text!r} is not usable here: {reason}")
    if backends.get(text).array_module is not np:
        raise argparse.ArgumentTypeError(
            f"backend {text!r} works on device arrays; fisheropt bench times host (NumPy) arrays only"
        )
    return text


def size_label(size) -> str:
    if size == "many":
        return "many"
    k = int(math.log2(size)) if size > 0 else 0
    return f"2^{k}" if 1 << k == size else str(size)


def problem_shapes(rule: str, size):
    """(shapes, coupled flags) for a rule and a size."""
    if size == "many":
        shapes = transformer_shapes()
        coupled = [s == (8192, 768) for s in shapes]
    elif REGISTRY[rule].tensor_flag is not None:  # one flagged matrix (Coupled Adam: an embedding)
        d = 768 if size >= 768 else size
        shapes = [(size // d, d)]
        coupled = [True]
    else:
        shapes = [(size,)]
        coupled = [False]
    return shapes, coupled


def moved_bytes(rule: str, shapes, coupled, itemsize: int) -> int:
    descriptor = REGISTRY[rule]
    total = 0
    for s, c in zip(shapes, coupled):
        items = descriptor.items_per_element
        if descriptor.tensor_flag is not None and not c:
            items = descriptor.items_per_element_unflagged
            if items is None:
                raise ValueError(f"rule {rule!r} gives no items_per_element_unflagged for its unflagged tensors")
        total += math.prod(s) * items * itemsize
    return total


def random_arrays(shapes, dtype, rng, scale=1.0):
    return [np.asarray(rng.standard_normal(s, dtype=np.float32) * np.float32(scale), dtype=dtype) for s in shapes]


def make_fisheropt(rule: str, backend: str, params, coupled, check_finite: bool):
    """fo.<Rule> with its default hyperparameters (lr 1e-3), flags from ``coupled``."""
    import fisheropt as fo

    descriptor = REGISTRY[rule]
    flags = {descriptor.tensor_flag.name: coupled} if descriptor.tensor_flag is not None else {}
    return getattr(fo, descriptor.title)(params, lr=1e-3, backend=backend, check_finite=check_finite, **flags)


# ---- the table ------------------------------------------------------------------
def _ceiling_measurable() -> bool:
    """Whether the bandwidth ceiling can be measured here (its kernel needs numba)."""
    try:
        ceiling_kernel()
    except NotImplementedError:
        return False
    return True


def measure_problem(
    rule, size, backends, dtype, repeats, *, numpy_large=False, torch_baselines=True, share_buffers=True, seed=0
):
    """Time one rule × size on one set of buffers, round-robin with the bandwidth ceiling.

    Every fisheropt backend and the PyTorch baseline step the same parameter and
    gradient arrays (and, with ``share_buffers``, torch's Adam state is fisheropt's
    m/v), and the ceiling ``a += 0*b`` runs over those same params/grads and over the
    numba optimizer's state (:func:`ceiling_buffers`), so that where the memory happens
    to sit affects all of them alike. Returns a list of rows."""
    import fisheropt as fo

    usable = set(fo.backends.available())
    rng = np.random.default_rng(seed)
    shapes, coupled = problem_shapes(rule, size)
    n = sum(math.prod(s) for s in shapes)
    itemsize = np.dtype(dtype).itemsize
    nbytes = moved_bytes(rule, shapes, coupled, itemsize)
    params = random_arrays(shapes, dtype, rng)
    grads = random_arrays(shapes, dtype, rng, scale=1e-3)

    fns, pause, opts = {}, {}, {}
    with_ceiling = _ceiling_measurable()
    if with_ceiling:
        fns["ceiling"] = None  # filled in below, once the state buffers exist; timed first
    for backend in backends:
        if backend not in usable or (backend == "numpy" and n > NUMPY_MAX_ELEMENTS and not numpy_large):
            continue
        opt = make_fisheropt(rule, backend, params, coupled, check_finite=False)
        opts[backend] = opt
        fns[backend] = (lambda o: lambda: o.step(grads))(opt)

        def checked(o=opt):
            o.check_finite = True
            try:
                o.step(grads)
            finally:
                o.check_finite = False

        fns[backend + "+finite"] = checked
    ceil_bytes = None
    if with_ceiling:
        from .backends.numba._core import CHUNK, launch

        numba_state = opts["numba"].state if "numba" in opts else None
        fns["ceiling"], ceil_bytes = ceiling_on(
            *ceiling_buffers(params, grads, numba_state), chunk=CHUNK, launch=launch
        )
    base = torch_baseline(rule) if torch_baselines else None
    torch_name = base[0] if base is not None else None
    if base is not None:
        shared = None
        if share_buffers and "numba" in opts and rule in ("adam", "adamw"):
            shared = (opts["numba"].state["m"], opts["numba"].state["v"])
        fns[torch_name] = torch_stepper(base[1], params, grads, shared)
        pause[torch_name] = 0.05  # let PyTorch's OpenMP threads stop spinning before the next timing

    medians = interleaved_medians(fns, repeats=repeats, pause=pause)
    ceil = (ceil_bytes / medians["ceiling"] / 1e9) if "ceiling" in medians else None
    torch_s = medians.get(torch_name) if torch_name else None
    rows = []
    for name in [b for b in backends if b in opts] + ([torch_name] if torch_name else []):
        t = medians[name]
        gbs = nbytes / t / 1e9
        is_fo = name in opts
        rows.append(
            {
                "rule": rule,
                "backend": name,
                "size": size_label(size),
                "tensors": len(shapes),
                "ms_per_step": t * 1e3,
                "gbs": gbs,
                "ceiling_gbs": ceil,
                "ratio_to_ceiling": gbs / ceil if ceil else None,
                "ms_per_step_with_finite_check": medians[name + "+finite"] * 1e3 if is_fo else None,
                "torch_speed_ratio": torch_s / t if (torch_s and is_fo) else None,
            }
        )
    return rows


def format_row(r) -> str:
    ratio = f"{r['ratio_to_ceiling']:6.2f}" if r["ratio_to_ceiling"] is not None else f"{'-':>6}"
    chk = (
        f"{r['ms_per_step_with_finite_check']:10.2f}"
        if r["ms_per_step_with_finite_check"] is not None
        else f"{'-':>10}"
    )
    vs = f"{r['torch_speed_ratio']:8.2f}" if r["torch_speed_ratio"] is not None else f"{'-':>8}"
    ceil = f"{r['ceiling_gbs']:6.2f}" if r["ceiling_gbs"] else f"{'-':>6}"
    return (
        f"{r['rule']:<13} {r['backend']:<24} {r['size']:>5} {r['tensors']:>7} {r['ms_per_step']:9.2f} "
        f"{r['gbs']:6.2f} {ceil} {ratio} {chk} {vs}"
    )


HEADER = (
    f"{'rule':<13} {'backend':<24} {'size':>5} {'tensors':>7} {'ms/step':>9} {'GB/s':>6} "
    f"{'ceil':>6} {'/ceil':>6} {'+finite ms':>10} {'vs torch':>8}"
)


def run(rules, sizes, backends, dtype, repeats, numpy_large=False, torch_baselines=True, out=sys.stdout):
    print(
        f"fisheropt bench: dtype={np.dtype(dtype).name}, median of {repeats} steps, timed round-robin with "
        "the ceiling (a += 0*b over the same params, grads and optimizer state, numba)",
        file=out,
    )
    try:
        import numba

        print(f"numba {numba.__version__}, {numba.get_num_threads()} threads; numpy {np.__version__}", file=out)
    except Exception:
        pass
    print(HEADER, file=out)
    print("-" * len(HEADER), file=out)
    rows = []
    for rule in rules:
        for size in sizes:
            for r in measure_problem(
                rule, size, backends, dtype, repeats, numpy_large=numpy_large, torch_baselines=torch_baselines
            ):
                print(format_row(r), file=out)
                out.flush()
                rows.append(r)
            gc.collect()  # free this problem's buffers before the next one
    items = ", ".join(f"{REGISTRY[r].title} {REGISTRY[r].items_per_element}" for r in rules)
    print(
        f"GB/s = the rule's bytes per element ({items} itemsizes) / time; "
        "ceil = GB/s of a += 0*b; vs torch = torch time / this time (> 1: fisheropt faster)",
        file=out,
    )
    return rows


def _duplicate(values):
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def validation_cost(rules, backend: str, repeats: int, out=sys.stdout) -> list[dict]:
    """Per rule, on the 147-tensor model (float32): the median time of the checks a step makes
    before it reads an element (:meth:`fisheropt.Optimizer.checked_grads`) and of a whole step,
    timed alternately in this process."""
    import fisheropt as fo  # noqa: F401  (the optimizer classes)

    shapes, coupled = problem_shapes(rules[0], "many")
    rng = np.random.default_rng(0)
    params = random_arrays(shapes, np.float32, rng)
    grads = random_arrays(shapes, np.float32, rng, scale=1e-3)
    rows = []
    print(f"{'rule':14s}{'tensors':>8s}{'checks ms':>11s}{'step ms':>10s}{'fraction':>10s}", file=out)
    for rule in rules:
        opt = make_fisheropt(rule, backend, params, problem_shapes(rule, "many")[1], check_finite=True)
        opt.step(grads)  # compile and plan outside the timing
        checks, steps = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            opt.checked_grads(grads)
            t1 = time.perf_counter()
            opt.step(grads)
            t2 = time.perf_counter()
            checks.append(t1 - t0)
            steps.append(t2 - t1)
        row = {
            "rule": rule,
            "tensors": len(params),
            "checks_ms": 1e3 * float(np.median(checks)),
            "step_ms": 1e3 * float(np.median(steps)),
        }
        row["fraction"] = row["checks_ms"] / row["step_ms"]
        rows.append(row)
        print(
            f"{rule:14s}{row['tensors']:8d}{row['checks_ms']:11.3f}{row['step_ms']:10.1f}{row['fraction']:10.4f}",
            file=out,
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fisheropt bench",
        description=(__doc__ or "").split("\n\n")[0],  # no docstrings under python -OO
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help=f"element counts (2^25, 1048576, 1e6; at most 2^{MAX_SIZE.bit_length() - 1}) or 'many' "
        "(default: 2^16 2^20 2^25 many)",
    )
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    ap.add_argument(
        "--backends",
        nargs="+",
        type=backend_name,
        default=None,
        metavar="BACKEND",
        help="fisheropt backends to time (default: numpy and numba, those usable here; "
        "naming an unknown or unusable one is an error)",
    )
    ap.add_argument(
        "--repeats", type=positive_int, default=None, help="steps timed per row, >= 1 (median; default 5, --quick 2)"
    )
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (no 2^25) and repeats")
    ap.add_argument(
        "--numpy-large",
        action="store_true",
        help=f"also time the numpy reference above {NUMPY_MAX_ELEMENTS} elements (slow)",
    )
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    ap.add_argument(
        "--validation-cost",
        action="store_true",
        help="instead of the table: the time of a step's pre-write checks against the whole step "
        "on the 147-tensor model, per rule (first --backends entry, default numba)",
    )
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    dup = _duplicate(args.backends or ())
    if dup is not None:  # one measurement per backend: a second copy would only repeat its row
        ap.error(f"argument --backends: {dup!r} given twice")
    sizes = args.sizes or [parse_size(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES)]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if args.backends is None:
        import fisheropt as fo

        usable = fo.backends.available()
        backends = [b for b in ("numpy", "numba") if b in usable]
    else:
        backends = args.backends
    if args.validation_cost:
        validation_cost(args.rules, backends[-1] if args.backends is None else backends[0], max(repeats, 9))
        return 0
    run(
        args.rules,
        sizes,
        backends,
        np.dtype(args.dtype),
        repeats,
        numpy_large=args.numpy_large,
        torch_baselines=not args.no_torch,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
