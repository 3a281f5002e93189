"""Sphinx extension of the fisheropt site.

* **Public API check.** Every name in ``__all__`` of the public modules (:data:`PUBLIC_MODULES`)
  must have a docstring (a ``#:`` comment for data) and must be documented in the API
  reference; every public method or property of a documented fisheropt class must have a
  docstring. Each miss is a warning of type ``fisheropt.undocumented``, so the build (``-W``)
  fails on it.
* **Re-exported data.** A constant re-exported by a public module (``fisheropt.torch.CLASSES``
  is ``fisheropt.torch.optim.CLASSES``) gets the ``#:`` comment of the module that defines it.
* **Spec links.** The spec pages (``spec/``, included as they are) link to their reference
  module as ``../refimpl/NAME.py`` and to folders; on the site these become links to the API
  page of ``fisheropt.refimpl.NAME`` and to the folder's README.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import posixpath
import re
import sys
import types
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode, nested_parse_with_titles

logger = logging.getLogger(__name__)

#: The modules whose ``__all__`` is the public API; each has a page in api/.
PUBLIC_MODULES = ("fisheropt", "fisheropt.fisher", "fisheropt.torch", "fisheropt.optax", "fisheropt.backends")

_REFIMPL_LINK = re.compile(r"\[([^\]]*)\]\(\.\./refimpl/(\w+)\.py\)")
_FOLDER_LINK = re.compile(r"\]\(((?:[\w.-]+/)*[\w.-]+)/\)")


def _rewrite_spec_links(app: Sphinx, docname: str, source: list[str]) -> None:
    if not docname.startswith("spec/"):
        return
    text = source[0]
    text = _REFIMPL_LINK.sub(lambda m: f"{{py:mod}}`{m.group(1).strip('`')} <fisheropt.refimpl.{m.group(2)}>`", text)
    text = _FOLDER_LINK.sub(r"](\1/README.md)", text)
    source[0] = text


def _fix_symlinked_doc_refs(app: Sphinx, doctree: nodes.document) -> None:
    """docs/spec is a symlink to the repository's spec/. Sphinx resolves a link's path with
    ``Path.resolve()``, so a Markdown link to a page in there names the real file
    (``/repo/spec/adam``) instead of the document (``spec/adam``): map it back."""
    srcdir = Path(app.srcdir)
    links = {str(p.resolve()): p.name for p in srcdir.iterdir() if p.is_symlink() and p.is_dir()}
    for node in doctree.findall(addnodes.pending_xref):
        if node.get("refdomain") != "doc":
            continue
        target = str(node.get("reftarget", ""))
        for real, name in links.items():
            if target.startswith(real + os.sep):
                node["reftarget"] = posixpath.join(name, *Path(target[len(real) + 1 :]).parts)


# --- attribute docs (#: comments), wherever the object is defined ------------------------------------


def _attr_doc(modname: str, name: str) -> list[str] | None:
    try:
        docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # noqa: BLE001 - no source (C module, frozen, ...)
        return None
    return docs.get(("", name))


def _data_doc(modname: str, name: str) -> list[str] | None:
    """The ``#:`` doc of ``modname.name``, or of the fisheropt module that defines the same object."""
    doc = _attr_doc(modname, name)
    if doc:
        return doc
    obj = getattr(sys.modules.get(modname), name, None)
    for other, module in sorted(sys.modules.items()):
        if other != modname and other.startswith("fisheropt") and getattr(module, name, _MISSING) is obj:
            doc = _attr_doc(other, name)
            if doc:
                return doc
    return None


_MISSING = object()


def _is_data(obj: object) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or callable(obj))


_GOOGLE_SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Yields):$")


def _process_docstring(app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]) -> None:
    """Google-style sections (``Args:``, ``Returns:``) become field lists, in the docstrings that
    have them (napoleon for every docstring would read any "text: more text" first line of a
    property or constant as "type: description"). A re-exported constant gets the ``#:`` doc of
    the module that defines it, not its type's docstring."""
    if what in ("function", "method", "class") and any(_GOOGLE_SECTION.match(line.strip()) for line in lines):
        from sphinx.ext.napoleon import Config, GoogleDocstring

        config = Config(napoleon_use_param=True, napoleon_use_rtype=True)
        lines[:] = GoogleDocstring(lines, config, None, what, name, obj, options).lines()
        return
    if what not in ("data", "attribute") or "." not in name:
        return
    modname, attr = name.rsplit(".", 1)
    if modname not in sys.modules or _attr_doc(modname, attr):
        return
    type_doc = inspect.cleandoc(type(obj).__doc__ or "")
    if any(line.strip() for line in lines) and "\n".join(lines).strip() != type_doc:
        return
    doc = _data_doc(modname, attr)
    if doc:
        lines[:] = list(doc)


# --- the public API check ---------------------------------------------------------------------


def _own_doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__) if isinstance(getattr(obj, "__doc__", None), str) else ""


def undocumented() -> list[str]:
    """Public names without a docstring, as ``module.name`` (with why)."""
    missing = []
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        if not _own_doc(module):
            missing.append(f"{modname} (module docstring)")
        for name in getattr(module, "__all__", ()):
            if name.startswith("__"):
                continue  # __version__
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                if not _own_doc(obj):
                    missing.append(f"{modname}.{name} (module docstring)")
            elif _is_data(obj):
                if not _data_doc(modname, name):
                    missing.append(f"{modname}.{name} (data: no '#:' comment where it is assigned)")
            elif not _own_doc(obj):
                missing.append(f"{modname}.{name}")
            if inspect.isclass(obj) and obj.__module__.startswith("fisheropt"):
                missing += [f"{modname}.{name}.{m}" for m in _undocumented_members(obj)]
    return sorted(set(missing))


def _undocumented_members(cls: type) -> list[str]:
    out = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("fisheropt"):
            continue  # inherited from torch.optim.Optimizer, Exception, ...: documented there
        for member, value in vars(klass).items():
            if member.startswith("_") or member in out:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                doc = value.__doc__
                if not doc:  # an override without its own docstring inherits the base's
                    doc = next(
                        (
                            getattr(getattr(b, member, None), "__doc__", None)
                            for b in cls.__mro__[1:]
                            if getattr(b, member, None) is not None and getattr(getattr(b, member), "__doc__", None)
                        ),
                        None,
                    )
                if not doc:
                    out.append(member)
    return out


def _check_public_api(app: Sphinx, env) -> None:
    for name in undocumented():
        logger.warning("public name without a docstring: %s", name, type="fisheropt", subtype="undocumented")
    objects = env.get_domain("py").objects
    modules = env.get_domain("py").modules
    for modname in PUBLIC_MODULES:
        if modname not in modules:
            logger.warning(
                "public module %s is not in the API reference (add an automodule to api/)",
                modname,
                type="fisheropt",
                subtype="undocumented",
            )
        module = sys.modules[modname]
        for name in getattr(module, "__all__", ()):
            full = f"{modname}.{name}"
            if name.startswith("__") or full in modules or isinstance(getattr(module, name), types.ModuleType):
                continue
            if full not in objects:
                logger.warning(
                    "public name %s is not in the API reference", full, type="fisheropt", subtype="undocumented"
                )


# --- the API pages: one directive per module ----------------------------------------------------


class FisheroptApi(SphinxDirective):
    """``.. fisheropt-api:: MODULE`` documents MODULE with ``automodule`` (members from ``__all__``),
    plus the constants it re-exports from a submodule (``autodoc`` documents only the data whose
    ``#:`` comment is in the module itself).

    ``:submodules:`` adds a section per public submodule (``:exclude:`` names the ones to leave
    out), documenting the names of its ``__all__`` that the package does not export already:
    the API is documented where users import it, and the names behind it (return types, the
    classes a docstring refers to) where they live."""

    required_arguments = 1
    option_spec: ClassVar[dict] = {
        "submodules": directives.flag,
        "no-members": directives.flag,
        "exclude": directives.unchanged,
        "inherited-members": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        lines = [f".. automodule:: {modname}"]
        if "no-members" in self.options:
            lines += ["   :no-members:", ""]
        else:
            lines.append("")
            for name in getattr(module, "__all__", ()):
                obj = getattr(module, name)
                if (
                    _is_data(obj)
                    and not name.startswith("__")
                    and not _attr_doc(modname, name)
                    and _data_doc(modname, name)
                ):
                    lines += [f".. autodata:: {modname}.{name}", "   :no-value:", ""]
        if "submodules" in self.options:
            exclude = set((self.options.get("exclude") or "").split())
            exported = {id(getattr(module, n)) for n in getattr(module, "__all__", ())}
            for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda i: i.name):
                if info.name.startswith("_") or info.name in exclude:
                    continue
                sub = f"{modname}.{info.name}"
                submodule = importlib.import_module(sub)
                title = f"``{sub}``"
                lines += [title, "-" * len(title), "", f".. automodule:: {sub}"]
                if "inherited-members" in self.options:
                    lines.append("   :inherited-members:")
                if not hasattr(submodule, "__all__"):
                    lines += ["   :members:", ""]  # autodoc: the public names defined there
                    continue
                names = [
                    n
                    for n in submodule.__all__
                    if id(getattr(submodule, n)) not in exported
                    and (not _is_data(getattr(submodule, n)) or _attr_doc(sub, n))
                ]
                lines += [f"   :members: {', '.join(names)}" if names else "   :no-members:", ""]
        content = StringList(lines, source=f"<fisheropt-api {modname}>")
        node = nodes.section() if "submodules" in self.options else nodes.container()
        node.document = self.state.document
        nested_parse_with_titles(self.state, content, node)
        return list(node.children)


# --- tables generated from the code and from docs/generated --------------------------------------


def _table(state, header: list[str], rows: list[list[str]], source: str) -> list[nodes.Node]:
    """A Markdown-free table: reST list-table parsed in place (cells are reST)."""
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    node = nodes.container()
    node.document = state.document
    nested_parse_with_titles(state, StringList(lines, source=source), node)
    return list(node.children)


class FisheroptRules(SphinxDirective):
    """``.. fisheropt-rules::`` the update rules of the registry (:data:`fisheropt.refimpl.RULES`):
    the classes in each framework, the paper, the hyperparameters with their defaults and the state."""

    def run(self) -> list[nodes.Node]:
        from fisheropt.refimpl import RULES

        rows = []
        for name, rule in RULES.items():
            hps = ", ".join(f"``{h.name}={h.default!r}``" for h in rule.hyperparams)
            if rule.tensor_flag is not None:
                hps += f", ``{rule.tensor_flag.name}`` (per tensor)"
            classes = (
                f":class:`fisheropt.{rule.title}`, :class:`fisheropt.torch.{rule.title}`, "
                f":func:`fisheropt.optax.{name}`"
            )
            state = ", ".join(f"``{st.name}``" for st in rule.state)
            rows.append(
                [
                    f"**{rule.title}** ({rule.paper}): {rule.summary}. Spec: :doc:`/spec/{rule.spec_page[:-3]}`",
                    classes,
                    hps,
                    state,
                ]
            )
        return _table(
            self.state, ["rule", "classes", "hyperparameters (defaults)", "state per tensor"], rows, "<fisheropt-rules>"
        )


class FisheroptExperiments(SphinxDirective):
    """``.. fisheropt-experiments::`` the runs behind docs/generated/experiments (its manifest.json)."""

    def run(self) -> list[nodes.Node]:
        manifest_path = Path(self.env.srcdir) / "generated" / "manifest.json"
        self.env.note_dependency(str(manifest_path))
        if not manifest_path.exists():
            return [nodes.paragraph(text="No generated results yet: run python docs/generate.py.")]
        manifest = json.loads(manifest_path.read_text())
        meta = manifest.get("experiments_meta", {})
        rows = []
        for name, entry in sorted(manifest.get("experiments", {}).items()):
            report = Path(self.env.srcdir) / "generated" / "experiments" / name / "report.md"
            page = f":doc:`{name} </generated/experiments/{name}/report>`" if report.exists() else name
            status = "ok" if entry["exit_status"] == 0 else f"**failed** (exit {entry['exit_status']})"
            rows.append([page, f"``{entry['command']}``", status, f"{entry['seconds']:.0f}"])
        machine = meta.get("machine", {})
        intro = self.parse_text_to_nodes(
            f"Last run on {meta.get('date', '?')} at commit ``{meta.get('commit', '?')}``, "
            f"on {machine.get('cpu', '?')} "
            f"({machine.get('cores', '?')} cores, load average {machine.get('load_average_1min', '?')} at the end)."
        )
        return [
            *intro,
            *_table(self.state, ["experiment", "command", "status", "seconds"], rows, "<fisheropt-experiments>"),
        ]


# --- references to a module-level alias of a documented object ------------------------------------


def _import(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return _MISSING
        return obj
    return _MISSING


def _resolve_alias(app: Sphinx, env, node: addnodes.pending_xref, contnode: nodes.Element) -> nodes.Element | None:
    """A reference to an object under another of its names (``fisheropt.torch.optim.optimizer_class``,
    documented as ``fisheropt.torch.optimizer_class``; ``optimizer_class`` inside the module's own
    docstring) resolves to the documented name: same object, found by identity."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    modname, clsname = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if modname:
        candidates += [f"{modname}.{clsname}.{target}"] if clsname else []
        candidates.append(f"{modname}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        if not candidate.startswith("fisheropt"):
            continue
        obj = _import(candidate)
        if obj is _MISSING or not (inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, (dict, tuple))):
            continue
        for full, entry in domain.objects.items():
            if entry.aliased or not full.startswith("fisheropt"):
                continue
            if _import(full) is obj:
                return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, full)
    # A bare name used in a docstring rendered under a re-exporting module (``CGResult`` in
    # fisheropt.torch.conjugate_gradient, defined in fisheropt.torch.fisher_operator): the one
    # documented fisheropt object of that name, if there is exactly one.
    if "." not in target:
        found = {}
        for full, entry in domain.objects.items():
            if full.startswith("fisheropt") and full.rsplit(".", 1)[-1] == target and not entry.aliased:
                found.setdefault(id(_import(full)), (full, entry))
        if len(found) == 1:
            full, entry = next(iter(found.values()))
            return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, full)
    return None


def setup(app: Sphinx) -> dict:
    app.add_directive("fisheropt-api", FisheroptApi)
    app.add_directive("fisheropt-rules", FisheroptRules)
    app.add_directive("fisheropt-experiments", FisheroptExperiments)
    app.connect("missing-reference", _resolve_alias)
    app.connect("source-read", _rewrite_spec_links)
    app.connect("doctree-read", _fix_symlinked_doc_refs)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("env-check-consistency", _check_public_api)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
