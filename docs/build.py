#!/usr/bin/env python3
"""Build the documentation site, warnings as errors.

    pip install -e ".[test]"            # once: Sphinx, MyST, the theme, MathJax (all from PyPI), torch, jax
    python docs/build.py                # -> docs/_build/html/index.html
    python docs/build.py --screenshots  # also check the math in headless Chromium, refresh docs/img/*.png
    python docs/build.py --out DIR      # build somewhere else

It runs ``sphinx-build -W --keep-going -n -E -b html docs <out>``: any warning (a broken
cross-reference, a public name without a docstring, a docstring that is not valid reST, a
page outside the table of contents) fails the build, after all of them are reported.
The pages under docs/generated/ are not rebuilt here: ``python docs/generate.py`` does that.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent


def sphinx_command(out: Path, doctrees: Path, *, quiet: bool = False) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-n",
        "-E",
        "-b",
        "html",
        "-d",
        str(doctrees),
        str(DOCS),
        str(out),
    ]
    return cmd + (["-q"] if quiet else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python docs/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS / "_build" / "html", help="output folder")
    parser.add_argument(
        "--screenshots", action="store_true", help="check the math in headless Chromium and refresh docs/img/*.png"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError as exc:
        print(f"the docs toolchain is missing ({exc}): pip install -e '.[docs]'", file=sys.stderr)
        return 2
    out = args.out.resolve()
    doctrees = out.parent / "doctrees"
    rc = subprocess.call(sphinx_command(out, doctrees, quiet=args.quiet), cwd=ROOT)
    if rc != 0:
        print(f"docs build failed (exit {rc}): see the warnings above", file=sys.stderr)
        return rc
    print(f"site: {out / 'index.html'}")
    if args.screenshots:
        sys.path.insert(0, str(DOCS))
        from browser import PAGES, check_page

        failed = False
        for page, anchor, name in PAGES:
            shot = out.parent / "screenshots" / name
            result = check_page(out, page, anchor, screenshot=shot)
            where = f"{page}#{anchor}" if anchor else page
            print(
                f"{where}: {result.math_rendered}/{result.math_in_source} math elements rendered; "
                + ("ok" if result.ok else "; ".join(result.errors))
            )
            if result.ok and result.screenshot is not None:
                shutil.copyfile(result.screenshot, DOCS / "img" / name)
                print(f"  screenshot: docs/img/{name}")
            failed |= not result.ok
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
