"""The documentation cannot drift from the code.

* Every ``python`` block of the docs (``docs/**/*.md``) and of README.md is executed, page by
  page and in order (a page's blocks share one namespace, in a scratch folder). A block
  that needs an optional dependency says so on the line before it::

      <!-- test: requires torch -->          (or: jax optax, gpu, ...)

  and is skipped, with that reason, where the dependency is missing. No block is skipped
  silently.
* Every command line of the shell blocks that can be checked without running it is checked:
  ``fisheropt ...`` and ``python -m fisheropt...`` against the CLI's argument parsers,
  ``python docs/*.py`` against the scripts' parsers, ``pip install -e ".[extra]"`` against
  pyproject's extras, ``python -m pytest -m EXPR`` against the registered markers, and
  every script path named exists.
* The relative links and images of README.md exist.
* The site builds with warnings as errors (``python docs/build.py``), when the docs extra is
  installed.
* ``slow``: the built site in headless Chromium: the API page of ``fisheropt.torch.FAdam``
  and the FAdam spec page show rendered math, no raw TeX; screenshots are saved under
  docs/_build/screenshots/ (``python docs/build.py --screenshots`` refreshes docs/img/).

The site tests skip, saying why, without the docs extra or Chromium; with
``FISHEROPT_DOCS_REQUIRED=1`` (CI) they fail instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

# The pages whose snippets are run: the hand-written docs, README and CONTRIBUTING (not the
# generated reports, not the build output).
PAGES = sorted(
    p for p in DOCS.rglob("*.md") if not {"_build", "generated", "spec"} & set(p.relative_to(DOCS).parts)
) + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)(.*)$")
_MARKER = re.compile(r"^\s*<!--\s*test:\s*(.*?)\s*-->\s*$")
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "console", "shell"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str = ""  # the text of a "<!-- test: ... -->" line just before the fence

    @property
    def requires(self) -> tuple[str, ...]:
        words = self.marker.split()
        return tuple(words[1:]) if words[:1] == ["requires"] else ()

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (MyST directives such as ```{toctree} excluded)."""
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])
        ):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        i += 1
        marker = ""
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (mm := _MARKER.match(lines[j])):
            marker = mm.group(1)
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", marker))
    return out


def _all_blocks(langs: set[str]) -> list[Block]:
    return [b for page in PAGES if page.exists() for b in blocks(page) if b.lang in langs]


# --- requirements -------------------------------------------------------------------------------


def missing_requirement(requires: tuple[str, ...]) -> str | None:
    """Why a block with these requirements cannot run here (None when it can)."""
    for req in requires:
        if req == "gpu":
            import fisheropt as fo

            reason = fo.backends.unavailable().get("cupy")
            if reason:
                return f"needs a CUDA GPU and CuPy: cupy backend unavailable ({reason})"
            if "torch" in sys.modules or importlib.util.find_spec("torch"):
                import torch

                if not torch.cuda.is_available():
                    return "needs a CUDA GPU: torch.cuda.is_available() is False"
        elif importlib.util.find_spec(req) is None:
            return f"needs {req} (not installed)"
    return None


# --- running a page's python blocks in order ----------------------------------------------------


@dataclass
class PageRun:
    namespace: dict = field(default_factory=dict)
    done: int = 0  # blocks [0, done) were handled
    outcomes: dict = field(default_factory=dict)  # index -> None (ran) | ("skip", why) | ("fail", why)


_RUNS: dict[Path, PageRun] = {}
_WORKDIRS: dict[Path, Path] = {}


def _run_block(block: Block, run: PageRun, workdir: Path) -> None:
    old = Path.cwd()
    os.chdir(workdir)
    try:
        exec(compile("\n" * block.line + block.code, str(block.page), "exec"), run.namespace)  # noqa: S102 - the docs' own code
    finally:
        os.chdir(old)


def run_page_upto(page: Path, index: int, workdir: Path):
    """Run the page's python blocks up to ``index`` (once each); the outcome of block ``index``."""
    py = [b for b in blocks(page) if b.lang in PYTHON]
    run = _RUNS.setdefault(page, PageRun(namespace={"__name__": f"docs_snippets_{page.stem}"}))
    while run.done <= index:
        i = run.done
        block = py[i]
        failed_before = [j for j, o in run.outcomes.items() if o and o[0] == "fail"]
        why = missing_requirement(block.requires)
        if block.marker and not block.requires:
            raise AssertionError(
                f"{block.id}: unknown test marker {block.marker!r} (use '<!-- test: requires MODULE ... -->')"
            )
        if why:
            run.outcomes[i] = ("skip", why)
        elif failed_before:
            run.outcomes[i] = ("skip", f"an earlier block of the page failed ({py[failed_before[0]].id})")
        else:
            try:
                _run_block(block, run, workdir)
                run.outcomes[i] = None
            except BaseException as exc:  # noqa: BLE001 - reported as the block's failure
                import traceback

                run.outcomes[i] = ("fail", "".join(traceback.format_exception(exc)))
        run.done += 1
    return run.outcomes[index]


PY_BLOCKS = _all_blocks(PYTHON)


def _py_params():
    params = []
    for page in PAGES:
        if not page.exists():
            continue
        for i, b in enumerate(b for b in blocks(page) if b.lang in PYTHON):
            marks = [pytest.mark.gpu] if "gpu" in b.requires else []
            params.append(pytest.param(page, i, id=b.id, marks=marks))
    return params


@pytest.mark.parametrize(("page", "index"), _py_params())
def test_python_snippet(page: Path, index: int, tmp_path_factory):
    if page not in _WORKDIRS:
        _WORKDIRS[page] = tmp_path_factory.mktemp(f"snippets-{page.stem}")
    workdir = _WORKDIRS[page]
    os.environ.setdefault("MPLBACKEND", "Agg")
    outcome = run_page_upto(page, index, workdir)
    if outcome is None:
        return
    kind, why = outcome
    if kind == "skip":
        pytest.skip(why)
    pytest.fail(f"the snippet failed:\n{why}", pytrace=False)


def test_every_page_has_checked_snippets():
    """The runner found the pages and their blocks (a parser change cannot make it vacuous)."""
    assert (ROOT / "README.md") in PAGES and (DOCS / "getting-started.md") in PAGES
    assert len(PY_BLOCKS) >= 10
    for block in PY_BLOCKS:
        if block.marker:
            assert block.requires, f"{block.id}: marker {block.marker!r} names no requirement"


# --- shell command lines ------------------------------------------------------------------------


def _pyproject() -> dict | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return None
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _parse_ok(parser: argparse.ArgumentParser, argv: list[str], what: str, *, known: bool = False) -> None:
    try:
        if known:
            _, extra = parser.parse_known_args(argv)
            assert not extra, f"{what}: unrecognized arguments {extra}"
        else:
            parser.parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), f"{what}: the argument parser refused it (exit {exc.code})"


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"docs_script_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_command(argv: list[str], where: str) -> str | None:
    """Check one command line; returns what was checked (None: not checkable, ignored)."""
    if not argv:
        return None
    what = f"{where}: {' '.join(argv)}"
    if argv[0] == "fisheropt" or argv[:3] in (["python", "-m", "fisheropt"], ["python3", "-m", "fisheropt"]):
        args = argv[1:] if argv[0] == "fisheropt" else argv[3:]
        if args[:1] == ["bench"]:
            from fisheropt import bench

            _parse_ok(bench.build_parser(), args[1:], what)
        else:
            from fisheropt import cli

            _parse_ok(cli.build_parser(), args, what, known=True)
        return "fisheropt"
    if argv[:3] in (["python", "-m", "fisheropt.bench"], ["python3", "-m", "fisheropt.bench"]):
        from fisheropt import bench

        _parse_ok(bench.build_parser(), argv[3:], what)
        return "fisheropt.bench"
    if argv[:3] == ["python", "-m", "pytest"]:
        args = argv[3:]
        if "-m" in args:
            expr = args[args.index("-m") + 1]
            config = _pyproject()
            if config is not None:
                markers = {m.split(":")[0].strip() for m in config["tool"]["pytest"]["ini_options"]["markers"]}
                for word in re.findall(r"[A-Za-z_]\w*", expr):
                    assert word in markers | {"and", "or", "not"}, f"{what}: no pytest marker {word!r}"
        for arg in args:
            if arg.startswith("tests/"):
                assert (ROOT / arg.split("::")[0]).exists(), f"{what}: {arg} does not exist"
        return "pytest"
    if argv[:2] in (["pip", "install"], ["python", "-m"]) and "install" in argv:
        config = _pyproject()
        for arg in argv:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            if m and config is not None:
                extras = set(config["project"].get("optional-dependencies", {}))
                for extra in m.group(1).split(","):
                    assert extra in extras, f"{what}: pyproject.toml has no extra {extra!r}"
        return "pip"
    if argv[0] in ("python", "python3", "bash") and len(argv) > 1 and argv[1].endswith((".py", ".sh")):
        script = ROOT / argv[1]
        if not script.exists() and (ROOT / "asv_bench" / argv[1]).exists():
            script = ROOT / "asv_bench" / argv[1]  # shown after "cd asv_bench"
        assert script.exists(), f"{what}: {argv[1]} does not exist"
        if script.parent == DOCS and script.suffix == ".py":
            _parse_ok(_load_script(script).build_parser(), argv[2:], what)
        return "script"
    scripts = [a for a in argv[1:] if "/" in a and re.fullmatch(r"[\w./-]+\.(py|sh)", a)]
    for script in scripts:  # torchrun ... examples/x.py, asv ... : the files named exist
        assert (ROOT / script).exists(), f"{what}: {script} does not exist"
    return "script" if scripts else None


def _command_lines():
    for block in _all_blocks(SHELL):
        for k, line in enumerate(block.code.splitlines()):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            command: list[str] = []
            for tok in [*tokens, "&&"]:
                if tok in ("&&", ";", "||", "|"):
                    if command:
                        yield pytest.param(command, f"{block.id}+{k}", id=f"{block.id}+{k}:{command[0]}")
                    command = []
                elif "=" in tok and not command and re.match(r"^[A-Z_]+=", tok):
                    continue  # FOO=bar command ...
                else:
                    command.append(tok)


@pytest.mark.parametrize(("argv", "where"), list(_command_lines()))
def test_command_line(argv, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_command(argv, where)


def test_command_lines_are_checked():
    checked = [check_command(p.values[0], p.values[1]) for p in _command_lines() if p.values[0][:1] == ["fisheropt"]]
    assert checked and all(kind == "fisheropt" for kind in checked)


# --- README links -------------------------------------------------------------------------------


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"


# --- the site -----------------------------------------------------------------------------------

REQUIRED = os.environ.get("FISHEROPT_DOCS_REQUIRED") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (FISHEROPT_DOCS_REQUIRED=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def built_site(tmp_path_factory):
    for module in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(module) is None:
            _unavailable(f"the docs toolchain is not installed ({module}): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site") / "html"
    proc = subprocess.run(
        [sys.executable, str(DOCS / "build.py"), "--out", str(out), "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, proc


def test_docs_build_without_warnings(built_site):
    out, proc = built_site
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}"
    assert (out / "index.html").exists() and (out / "api" / "torch.html").exists()
    assert (out / "_static" / "mathjax" / "tex-chtml.js").exists(), "MathJax is not bundled with the site"
    html = (out / "api" / "torch.html").read_text(encoding="utf-8")
    assert 'id="fisheropt.torch.FAdam"' in html
    assert "cdn." not in (out / "spec" / "fadam.html").read_text(encoding="utf-8"), "a CDN is referenced"


@pytest.mark.slow
def test_site_math_renders_in_chromium(built_site):
    from browser import PAGES as BROWSER_PAGES
    from browser import check_page, find_chromium

    out, proc = built_site
    if proc.returncode != 0:
        pytest.fail("the docs build failed (see test_docs_build_without_warnings)", pytrace=False)
    if find_chromium() is None:
        _unavailable("headless Chromium is not installed (apt-get install chromium)")
    shots = DOCS / "_build" / "screenshots"
    problems = []
    for page, anchor, name in BROWSER_PAGES:
        result = check_page(out, page, anchor, screenshot=shots / name)
        problems += result.errors
        if result.ok:
            assert result.math_rendered >= result.math_in_source > 0
            assert result.screenshot is not None and result.screenshot.stat().st_size > 10_000
    assert not problems, "\n".join(problems)
