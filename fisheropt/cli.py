"""The ``fisheropt`` command (also ``python -m fisheropt``).

::

    fisheropt demo [--quick] [--out DIR] [--seed N]
    fisheropt experiment NAME [--quick] [--out DIR] [--seed N]   # NAME: see `fisheropt experiment --list`
    fisheropt experiment all [--quick] [--out DIR]
    fisheropt bench ...                                          # benchmarks (fisheropt.bench)
    fisheropt bench torch ...                                    # against PyTorch (fisheropt.torch.bench)
    fisheropt info                                               # version and backends

Every run writes ``report.md`` and PNG plots into ``--out`` (default: a new
folder ``fisheropt-out/<name>-<time>`` under the current directory) and prints
where they are. ``--quick`` is a sub-minute smoke run of the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import time
from pathlib import Path

from . import __version__

# Seeds go to numpy.random.default_rng; the CLI takes NumPy's classic seed range, 0 .. 2**32-1.
SEED_MAX = 2**32 - 1


def _default_out(name: str) -> Path:
    return Path.cwd() / "fisheropt-out" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def out_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the output folder (None when it can be used or created).

    It must be an existing directory, or not exist yet with its nearest existing
    ancestor a directory this process can write into. Checked before anything is created."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there yet (or under a file: reported below)
        st = None
    except (OSError, ValueError) as exc:  # e.g. name too long, embedded NUL, no permission
        return f"cannot use {str(path)!r}: {getattr(exc, 'strerror', None) or exc}"
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            return f"{str(path)!r} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"no permission to write into {str(path)!r}"
        return None
    ancestor = Path(os.path.abspath(path)).parent
    while True:
        try:
            st = os.stat(ancestor)
            break
        except (FileNotFoundError, NotADirectoryError):
            if ancestor.parent == ancestor:
                return f"cannot create {str(path)!r}: no existing parent folder"
            ancestor = ancestor.parent
        except (OSError, ValueError) as exc:
            return f"cannot create {str(path)!r}: {getattr(exc, 'strerror', None) or exc} ({ancestor})"
    if not stat.S_ISDIR(st.st_mode):
        return f"cannot create {str(path)!r}: {str(ancestor)!r} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {str(path)!r}: no permission to write into {str(ancestor)!r}"
    return None


def out_dir_arg(text: str) -> Path:
    """argparse type for --out: a folder that exists or can be created (nothing is created here)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a folder name, got an empty string")
    path = Path(text)
    problem = out_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return path


def seed_arg(text: str) -> int:
    """argparse type for --seed: an integer NumPy accepts as a seed, 0 .. 2**32-1."""
    with contextlib.suppress(ValueError):  # not an integer: refused below, like one out of range
        if 0 <= (seed := int(text)) <= SEED_MAX:
            return seed
    raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX} (2**32-1), got {text!r}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small, sub-minute run of the same code (smoke test)")
    p.add_argument(
        "--out",
        type=out_dir_arg,
        default=None,
        metavar="DIR",
        help="folder for report.md and the plots (default: fisheropt-out/<name>-<time>); "
        "an existing folder is written into",
    )
    p.add_argument(
        "--seed", type=seed_arg, default=0, metavar="N", help=f"base random seed, 0 to {SEED_MAX} (default 0)"
    )


def _experiment_name_arg(text: str) -> str:
    from .experiments import EXPERIMENTS

    if text != "all" and text not in EXPERIMENTS:
        raise argparse.ArgumentTypeError(
            f"unknown experiment {text!r}; choose from: {', '.join(sorted(EXPERIMENTS))}, all"
        )
    return text


def _make_out(path: Path, parser: argparse.ArgumentParser) -> None:
    """Create the output folder; a folder that cannot be made is a usage error (exit 2), not a traceback."""
    problem = out_problem(path)
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except OSError as exc:
            problem = f"cannot create {str(path)!r}: {exc.strerror or exc}"
    parser.error(f"--out: {problem}")


def build_parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(
        prog="fisheropt",
        description="Fisher-information optimizers: a demo and small-scale reproductions of the papers' claims.",
    )
    parser.add_argument("--version", action="version", version=f"fisheropt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train the digits MLP with every optimizer on every backend",
        description="Train a NumPy MLP on scikit-learn's bundled digits with Adam, AdamW, "
        "FAdam and natural-gradient descent (EF, SF, iEF) on every available "
        "backend; print a table and write loss curves.",
    )
    _add_common(demo)
    demo.set_defaults(subparser=demo)

    names = ", ".join(sorted(EXPERIMENTS))
    exp = sub.add_parser(
        "experiment",
        help=f"run one experiment ({names}, or all)",
        description=f"Run a small-scale reproduction of a paper's claim. Experiments: {names}; "
        "'all' runs every one into subfolders of --out.",
    )
    exp.add_argument("name", nargs="?", type=_experiment_name_arg, help="experiment name, or 'all'")
    exp.add_argument("--list", action="store_true", help="list the experiments and exit")
    _add_common(exp)
    exp.set_defaults(subparser=exp)

    bench = sub.add_parser("bench", help="benchmarks (arguments are passed to fisheropt.bench)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)

    sub.add_parser("info", help="print the version and which backends are usable here")
    return parser


def _run_demo(args) -> int:
    from . import demo

    out = args.out or _default_out("demo")
    _make_out(out, args.subparser)
    demo.run(quick=args.quick, out_dir=out, seed=args.seed, verbose=True)
    print(f"\nReport and plots: {out.resolve()}")
    return 0


def _run_experiment(args, parser) -> int:
    from . import experiments

    if args.list or not args.name:
        if not args.list:
            print("fisheropt experiment: give an experiment name (or 'all')\n", file=sys.stderr)
        for name in sorted(experiments.EXPERIMENTS):
            try:
                line = experiments.describe(name)
            except ImportError as exc:  # e.g. a module another engineer has not finished
                line = f"(not importable: {exc})"
            print(f"  {name:14s} {line}")
        return 0 if args.list else 2
    names = sorted(experiments.EXPERIMENTS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in experiments.EXPERIMENTS]
    if unknown:  # normally caught while parsing (the name's type check)
        args.subparser.error(
            f"unknown experiment {unknown[0]!r}; choose from: {', '.join(sorted(experiments.EXPERIMENTS))}, all"
        )
    base = args.out or _default_out("experiment-" + args.name)
    outs = {name: base / name if len(names) > 1 else base for name in names}
    for out in outs.values():  # every folder checked before the first experiment starts
        problem = out_problem(out)
        if problem:
            args.subparser.error(f"--out: {problem}")
    status = 0
    for name in names:
        out = outs[name]
        _make_out(out, args.subparser)
        print(f"== experiment {name}{' (quick)' if args.quick else ''} ==")
        start = time.perf_counter()
        result = experiments.run(name, quick=args.quick, out_dir=out, seed=args.seed)
        summary = result.get("summary") if isinstance(result, dict) else None
        if summary:
            print(summary)
        print(f"Report: {(out / 'report.md').resolve()}  ({time.perf_counter() - start:.1f} s)")
    return status


def _run_info() -> int:
    from . import backends

    print(f"fisheropt {__version__}")
    print("backends available:", ", ".join(backends.available()))
    for name, reason in backends.unavailable().items():
        print(f"  {name}: unavailable ({reason})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # Pass everything through untouched (including --help) to the bench module;
        # `fisheropt bench torch ...` is the PyTorch comparison (fisheropt.torch.bench).
        if argv[1:2] == ["torch"]:
            from .torch import bench as torch_bench

            return int(torch_bench.main(argv[2:]) or 0)
        from . import bench

        result = bench.main(argv[1:])
        return int(result or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, so that its usage line is the one shown
        getattr(args, "subparser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "experiment":
            return _run_experiment(args, parser)
        if args.command == "info":
            return _run_info()
    except ImportError as exc:
        print(
            f"fisheropt: {exc}\n(the demo and experiments need the demo extra: pip install 'fisheropt[demo]')",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
