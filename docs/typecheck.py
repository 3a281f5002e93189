#!/usr/bin/env python3
"""Type-check fisheropt with pyright, in its installed layout.

    python docs/typecheck.py            # pyright, configured by [tool.pyright] in pyproject.toml
    python docs/typecheck.py --summary  # also: findings per file

The repository keeps refimpl/, backends/ and spec/ at the top; the install maps them to
fisheropt.refimpl, fisheropt.backends and fisheropt.spec ([tool.setuptools.package-dir]).
An editable install does that with an import hook that no static checker follows, so this
script lays the installed layout out as a tree of links under ``build/typecheck/``
(directories made, every ``.py``/``.pyi``/``py.typed`` file linked to its source), runs
pyright on it, and prints the findings with the source paths. Exit status: pyright's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
SUFFIXES = {".py", ".pyi"}


def package_dirs() -> dict[str, Path]:
    """Installed package name -> source folder, from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"].get("package-dir", {})
    return {name: ROOT / folder for name, folder in mapping.items() if name}


def lay_out() -> dict[Path, Path]:
    """Build the link tree; link path -> source path."""
    if TREE.exists():
        shutil.rmtree(TREE)
    links: dict[Path, Path] = {}
    dirs = package_dirs()
    # Deeper packages last, so that fisheropt/ does not shadow fisheropt.refimpl's folder.
    for name, source in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        target = TREE.joinpath(*name.split("."))
        nested = [ROOT / d for n, d in dirs.items() if n.startswith(name + ".")]
        for path in sorted(source.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix not in SUFFIXES and path.name != "py.typed":
                continue
            if any(path.is_relative_to(n) for n in nested if n != source):
                continue
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(path, link)
                links[link] = path
    return links


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python docs/typecheck.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", action="store_true", help="print the number of findings per file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pyright = shutil.which("pyright")
    if pyright is None:
        print("pyright is not installed: pip install 'pyright[nodejs]'", file=sys.stderr)
        return 2
    links = lay_out()
    # --project: this repository's configuration, never a pyrightconfig.json found above it.
    command = [pyright, "--outputjson", "--project", str(ROOT / "pyproject.toml")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
        return proc.returncode or 2
    per_file: collections.Counter[str] = collections.Counter()
    for diag in report.get("generalDiagnostics", []):
        path = Path(diag["file"])
        source = links.get(path, path)
        rel = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
        line = diag["range"]["start"]["line"] + 1
        col = diag["range"]["start"]["character"] + 1
        rule = f" ({diag['rule']})" if diag.get("rule") else ""
        message = diag["message"].replace("\n", " ")
        print(f"{rel}:{line}:{col}: {diag['severity']}: {message}{rule}")
        if diag["severity"] == "error":
            per_file[str(rel)] += 1
    summary = report.get("summary", {})
    if args.summary:
        for name, count in sorted(per_file.items()):
            print(f"{count:6d}  {name}")
    print(
        f"pyright: {summary.get('filesAnalyzed')} files, {summary.get('errorCount')} errors, "
        f"{summary.get('warningCount')} warnings"
    )
    if not summary.get("filesAnalyzed"):
        print("pyright checked no file: the configuration did not reach build/typecheck", file=sys.stderr)
        return 1
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
