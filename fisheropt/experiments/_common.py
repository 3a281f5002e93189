"""Shared helpers for the demo and the experiments: progress bars, thread limits, plots,
Markdown tables, and the pieces every report has (title, file list, metrics.json, result).

matplotlib (Agg, no display needed) and tqdm come with ``pip install fisheropt[demo]``;
they are imported lazily so that ``import fisheropt`` never needs them.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

DEMO_EXTRA_HINT = "install the demo extra: pip install 'fisheropt[demo]'"


T = TypeVar("T")


class ProgressBar(Protocol):
    """A bar advanced by hand: ``update(n)`` after each unit of work, ``close()`` at the end."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


class _NoBar:
    """The :class:`ProgressBar` without tqdm: does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _tqdm(iterable: Iterable[Any] | None, total: int | None, desc: str | None, leave: bool) -> Any:
    """A tqdm bar on stderr, shown on a terminal and silent otherwise (``FISHEROPT_PROGRESS=1``
    forces it on, ``=0`` off); None when tqdm is not installed."""
    flag = os.environ.get("FISHEROPT_PROGRESS")
    disable = None if flag is None else flag.strip() in ("0", "", "false", "no")
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the demo extra; the runs go on without a bar
        return None
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable, dynamic_ncols=True, file=sys.stderr)


def progress(iterable: Iterable[T], *, desc: str | None = None, leave: bool = False) -> Iterable[T]:
    """``iterable`` with a progress bar (see :func:`_tqdm`); the bare iterable without tqdm."""
    bar = _tqdm(iterable, None, desc, leave)
    return iterable if bar is None else bar


def progress_bar(total: int, *, desc: str | None = None) -> ProgressBar:
    """A progress bar over ``total`` units advanced by hand; one that does nothing without tqdm."""
    bar = _tqdm(None, total, desc, False)
    return _NoBar() if bar is None else bar


@contextmanager
def blas_threads(default: int = 1, *, numba: bool = False):
    """Context manager: limit BLAS threads (``FISHEROPT_BLAS_THREADS`` overrides ``default``).

    The models here multiply small matrices (e.g. 128×32 by 32×2000), where
    multi-threaded BLAS costs more than it saves, and on a shared or busy machine
    its spinning threads can slow a run down twenty-fold. One thread is the
    default for the demo and the experiments; set ``FISHEROPT_BLAS_THREADS=0``
    to leave BLAS alone. Needs threadpoolctl (installed with scikit-learn);
    without it BLAS is left alone.

    ``numba=True`` gives Numba's thread pool (the fused optimizer kernels) the same
    limit, for runs whose tensors are too small for a thread team to pay off.
    Everything is restored on exit. This is the one BLAS limiter of the demo and the
    experiments (:func:`torch_threads` is torch's)."""
    value = os.environ.get("FISHEROPT_BLAS_THREADS", "").strip()
    n = int(value) if value.isdigit() else default
    with ExitStack() as limits:
        if n > 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
                pass
            else:
                limits.enter_context(threadpool_limits(limits=n, user_api="blas"))
            if numba:
                limits.enter_context(_numba_threads(n))
        yield


@contextmanager
def _numba_threads(n: int):
    """Numba's thread count (of this thread) set to at most ``n``, restored afterwards."""
    try:
        import numba
        from numba.core import config
    except ImportError:  # pragma: no cover - numba is in the demo extra
        yield
        return
    most: int = config.NUMBA_NUM_THREADS  # pyright: ignore[reportAttributeAccessIssue]  # set at numba's import
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, most)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def import_torch(experiment: str):
    """The ``torch`` module; without PyTorch, an ImportError that names the experiment needing it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is in the test and bench extras
        raise ImportError(f"the {experiment} experiment needs PyTorch (pip install torch)") from exc
    return torch


@contextmanager
def torch_threads(n: int, *, numba: bool = False):
    """Context manager: torch's thread count set to ``n`` (0 leaves it alone), and with
    ``numba=True`` Numba's too, so that torch's and fisheropt's kernels compare like with
    like. Restored on exit, Numba's first: its OpenMP layer shares torch's thread count."""
    import torch

    with ExitStack() as limits:
        if n > 0:
            limits.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(n)
            if numba:
                limits.enter_context(_numba_threads(n))
        yield


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover
        raise ImportError(f"plots need matplotlib; {DEMO_EXTRA_HINT}") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, *, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (PNG; laid out tightly unless ``tight=False``, for a figure
    with a layout engine of its own), close it and return the path."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_curves(
    path: Path,
    curves: dict,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    bands: dict | None = None,
    xs=None,
    logx: bool = False,
    marker: str | None = None,
    hline: float | None = None,
) -> Path:
    """One line per entry of ``curves`` (label -> y values); optional shaded ``bands``
    (label -> (low, high)), x values (label -> xs, or one sequence for every curve; 1, 2, ...
    where none is given), point ``marker`` and a dashed horizontal reference line at
    ``hline``. Writes a PNG and returns its path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, ys in curves.items():
        ys = np.asarray(ys, dtype=float)
        x = xs.get(label) if isinstance(xs, dict) else xs
        x = np.arange(1, ys.size + 1) if x is None else np.asarray(x)
        (line,) = ax.plot(x, ys, label=label, lw=1.4, marker=marker)
        if bands and label in bands:
            lo, hi = bands[label]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls="--")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 5 else 1)
    return save_figure(fig, path)


def plot_seed_curves(
    out_dir: Path,
    histories: dict,
    names,
    seeds,
    metrics,
    *,
    x_key: str = "step",
    xlabel: str = "step",
    title: str = "{label} (mean over {n} seeds, band = min..max)",
) -> list[Path]:
    """One PNG ``<metric>.png`` per ``(metric, label, logy)`` of ``metrics``: per name, the mean
    over ``seeds`` of ``histories[(name, seed)][metric]`` in its min..max band (the seeds'
    curves cut to the shortest), against ``histories[(name, seeds[0])][x_key]``. ``title`` is
    formatted with the ``label`` and ``n``, the number of seeds. Returns the paths."""
    plots = []
    for metric, label, logy in metrics:
        curves, bands, xs = {}, {}, {}
        for name in names:
            curves[name], bands[name] = seed_band([histories[(name, s)][metric] for s in seeds])
            xs[name] = histories[(name, seeds[0])][x_key][: len(curves[name])]
        path = out_dir / f"{metric}.png"
        title_text = title.format(label=label, n=len(seeds))
        plots.append(
            plot_curves(path, curves, bands=bands, xs=xs, logy=logy, title=title_text, xlabel=xlabel, ylabel=label)
        )
    return plots


def plot_bars(path: Path, labels, values, errors=None, *, title: str, ylabel: str, logy=False) -> Path:
    """A bar chart (mean ± error) written as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 4), dpi=110)
    ax.bar(range(len(labels)), values, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def fmt(value, digits=4) -> str:
    """Compact number formatting for tables (handles ints, nan, inf, tiny/huge)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def markdown_table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None) -> str:
    """Rows of dicts as a GitHub Markdown table."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    headers = headers or {}
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def text_table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None) -> str:
    """The same table, aligned for a terminal."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    headers = headers or {}
    cells = [[headers.get(c, c) for c in columns]] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluation_steps(steps: int, evaluations: int) -> set[int]:
    """The steps of a ``steps``-step run at which to evaluate: ``evaluations`` + 1 of them,
    evenly spaced, the first (0) and the last included."""
    return set(np.linspace(0, steps, evaluations + 1).astype(int).tolist())


def with_std(keys, std_of) -> list[str]:
    """The columns ``keys`` in order, each key of ``std_of`` followed by its ``<key>_std``
    column (as :func:`mean_std_columns` names it)."""
    return [column for key in keys for column in ((key, f"{key}_std") if key in std_of else (key,))]


def mean_std(values) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def mean_std_columns(rows: list[dict], keys) -> dict:
    """``{key: mean, key + "_std": std}`` over ``rows`` (one per seed) for each of ``keys``."""
    out = {}
    for key in keys:
        out[key], out[key + "_std"] = mean_std([r[key] for r in rows])
    return out


def seed_values(rows, seeds, key, **match) -> list:
    """``row[key]`` of each seed of ``seeds``, in that order, from the ``rows`` (one per run,
    with a ``"seed"`` field) whose fields equal ``match``: the per-seed values to pair."""
    return [next(r[key] for r in rows if r["seed"] == s and all(r[k] == v for k, v in match.items())) for s in seeds]


def seed_band(runs) -> tuple:
    """(mean curve, (min, max) band) over the seeds' curves ``runs``, each cut to the shortest."""
    n = min(len(r) for r in runs)
    arr = np.array([r[:n] for r in runs], dtype=float)
    return arr.mean(axis=0), (arr.min(axis=0), arr.max(axis=0))


def paired_difference(a, b) -> dict:
    """Paired comparison of per-seed values (same seeds, same order): d = a - b.

    Returns the mean difference, its standard error SE = sd(d)/sqrt(n), the
    two-sided 95 % Student-t critical value ``t`` (n-1 degrees of freedom) and
    ``sign``: -1 when a < b beyond noise (mean + t·SE < 0), +1 when a > b beyond
    noise, 0 when the 95 % interval contains 0 (or n < 2)."""
    from scipy.stats import t as student_t

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(d.mean())
    n = int(d.size)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    crit = float(student_t.ppf(0.975, n - 1)) if n > 1 else float("inf")
    sign = 0
    if n > 1 and math.isfinite(se):
        if mean + crit * se < 0:
            sign = -1
        elif mean - crit * se > 0:
            sign = 1
    return {"mean": mean, "se": se, "t": crit, "sign": sign, "n": n}


AGREES = "**Agrees with the paper**"
DISAGREES = "**Disagrees with the paper**"
INCONCLUSIVE = "**Inconclusive at this scale**"


def agreement(agrees: bool, why_agrees: str, why_disagrees: str) -> str:
    """A verdict line: "**Agrees with the paper**: <why_agrees>" or "**Disagrees ...**: <why_disagrees>"."""
    return f"{AGREES}: {why_agrees}" if agrees else f"{DISAGREES}: {why_disagrees}"


def environment_line() -> str:
    import fisheropt

    return (
        f"fisheropt {fisheropt.__version__}, Python {platform.python_version()}, "
        f"NumPy {np.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"backends available: {', '.join(fisheropt.backends.available())}"
    )


@contextmanager
def stopwatch():
    """``with stopwatch() as t: ...``; then ``t()`` is the elapsed seconds."""
    start = time.perf_counter()
    end = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


QUICK_NOTE = "**Quick mode** (smoke-test sizes; numbers are not meaningful)."


def report_title(title: str, quick: bool) -> str:
    """A report's first lines: ``# title``, then in quick mode :data:`QUICK_NOTE`."""
    return f"# {title}\n\n{QUICK_NOTE if quick else ''}"


def file_list(plots) -> str:
    """The plots as the Markdown list that opens a report's "Files" section."""
    return "\n".join(f"- `{Path(p).name}`" for p in plots)


def write_report(out_dir: Path, text: str) -> Path:
    path = Path(out_dir) / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def publish(out_dir: Path, report: str, metrics: dict, *, plots, summary: str, **results) -> dict:
    """Write ``report.md`` and ``metrics.json`` into ``out_dir`` and return the experiment's
    result: ``results`` (its tables, ``rows`` first), then the paths of the ``plots`` and of
    the report, and ``summary``, the text that ``fisheropt experiment`` prints."""
    path = write_report(out_dir, report)
    save_metrics(out_dir, metrics)
    return {**results, "plots": [str(p) for p in plots], "report": str(path), "summary": summary}


def save_metrics(out_dir: Path, payload: dict, name: str = "metrics.json") -> Path:
    """Write the raw numbers next to the report (JSON, NaN/inf as strings; a tuple key
    such as ``(optimizer, seed)`` becomes ``"optimizer|seed"``)."""
    import json

    def clean(o):
        if isinstance(o, dict):
            return {"|".join(map(str, k)) if isinstance(k, tuple) else str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        if isinstance(o, (np.floating, float)):
            v = float(o)
            return v if math.isfinite(v) else str(v)
        if isinstance(o, np.integer):
            return int(o)
        return o

    path = Path(out_dir) / name
    path.write_text(json.dumps(clean(payload), indent=1), encoding="utf-8")
    return path
