"""Small-scale reproductions of the papers' claims, run with ``fisheropt experiment NAME``.

:data:`EXPERIMENTS` maps a name to a module path. Each module exposes
``run(*, quick: bool, out_dir: pathlib.Path, seed: int = 0) -> dict`` that writes
``report.md`` and PNG plots into ``out_dir`` and returns its metrics table
(``{"rows": [...], ...}``). To add one, add a line here.
"""

from __future__ import annotations

import importlib

EXPERIMENTS = {
    "coupled-adam": "fisheropt.experiments.coupled_adam",
    "ief": "fisheropt.experiments.ief",
    "ief-finetune": "fisheropt.experiments.ief_finetune",
    "fadam": "fisheropt.experiments.fadam",
    "esimcse": "fisheropt.experiments.esimcse",
    "torch-lm": "fisheropt.experiments.torch_lm",
}


def get(name: str):
    """The experiment module called ``name`` (imported on demand)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return importlib.import_module(EXPERIMENTS[name])


def describe(name: str) -> str:
    """First line of the experiment module's docstring."""
    doc = (get(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def run(name: str, *, quick: bool, out_dir, seed: int = 0) -> dict:
    from pathlib import Path

    from ._common import blas_threads

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = get(name)
    with blas_threads():
        return module.run(quick=quick, out_dir=out_dir, seed=seed)
