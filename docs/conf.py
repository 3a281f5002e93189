"""Sphinx configuration of the fisheropt site (Sphinx + MyST, API reference by autodoc).

Build (warnings are errors, broken references included): ``python docs/build.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

try:
    import fisheropt
except ImportError as exc:  # pragma: no cover - a checkout that was never installed
    raise RuntimeError(f"the docs document the installed fisheropt: pip install -e '.[docs]' ({exc})") from exc

project = "fisheropt"
author = "the fisheropt contributors"
copyright = "2026, the fisheropt contributors"  # noqa: A001 - Sphinx's name
version = release = fisheropt.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    # MathJax 3 from the PyPI package, copied into _static/mathjax: no CDN, renders offline.
    "sphinx-mathjax-offline",
    "fisheropt_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "generated/**/FAILED.txt",
    # spec/ is the repository's spec folder (a symlink): its pages are part of the site,
    # its vectors and C sources are files the pages link to.
    "spec/vectors/**",
    "spec/conformance/c/*.c",
    "spec/conformance/c/*.inc",
]

# --- Warnings are errors (python docs/build.py passes -W --keep-going -n) --------------------
nitpicky = True
# Names outside fisheropt: no intersphinx (the build is offline), so references to other
# projects' objects are not checked. Every fisheropt.* reference must resolve.
nitpick_ignore_regex = [
    # Private classes (a public class's base, shown by show-inheritance) are not documented.
    (r"py:class", r"fisheropt(\.\w+)*\._\w+"),
    (
        r"py:.*",
        r"(numpy|np|scipy|torch|jax|jnp|optax|cupy|chex|numba|collections|typing|typing_extensions"
        r"|pathlib|os|io|contextlib|dataclasses|enum|abc|types|argparse|threading|numbers)(\..*)?",
    ),
    (
        r"py:.*",
        r"(ArrayLike|NDArray|DTypeLike|Array|ArrayTree|PyTree|Params|Updates|GradientTransformation"
        r"|Schedule|ScalarOrSchedule|LinearOperator|Tensor|Module|Parameter|ParamsT|Path|PathLike"
        r"|Callable|Iterable|Iterator|Sequence|Mapping|MutableMapping|Any|Literal|Self|TypeAlias"
        r"|ModuleType|Number|Real|Integral|Enum|Generator)",
    ),
    (
        r"py:.*",
        r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|NoneType|complex"
        r"|Exception|ValueError|TypeError|RuntimeError|ImportError|KeyError|AttributeError|slice"
        r"|ellipsis|EllipsisType|NotImplemented)",
    ),
]

# spec/vectors.md shows JSON with "..." elisions; Pygments falls back to relaxed lexing there.
suppress_warnings = ["misc.highlighting_failure"]

# --- MyST (Markdown) ---------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_dmath_double_inline = True
myst_heading_anchors = 4

# --- autodoc -----------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = True
add_module_names = False

# --- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"fisheropt {release}"
html_static_path = ["_static"]
html_css_files = ["fisheropt.css"]
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {"navigation_with_keys": True}
# MathJax 3 (sphinx-mathjax-offline sets mathjax_path to its local copy).
mathjax3_config = {"tex": {"tags": "none"}}
