"""Writes docs/reference/config.md: every params.yaml key with its type, default and documentation,
read from the config dataclasses the sections load (``make config-reference``; ``--check`` only
compares). A field's documentation is its comment where its class defines it, the lines just above
it and the rest of its own line; a field a subclass overrides without a comment keeps its base's.

Which class a section loads is read from the code that loads it, not kept here: each stage's
``run_stage("<section>", <Config>, …, sections={"<section>": <Config>})`` in ``stages/`` and
``load_section(<Config>, …, "<section>")`` in ``pipelines/``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from palm.core.config import type_name

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "config.md"
REGENERATE = "make config-reference"
REQUIRED = object()  # a field without a default


@dataclasses.dataclass
class Key:
    """One row of the page: ``path`` within its section (``optim.lr``, ``reward[].name``)."""

    path: str
    type: str
    default: str
    doc: str


# --- which class each section loads --------------------------------------------------------------

def _resolve(module: str, tree: ast.Module, name: str) -> type:
    """The class ``name`` as ``module`` sees it: imported from another module, or its own."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name and not a.asname
                                                                     for a in node.names):
            return getattr(importlib.import_module(node.module), name)
    return getattr(importlib.import_module(module), name)


@functools.cache
def section_classes(root: Path = ROOT) -> dict[str, type]:
    """``{section: config class}`` for every section some stage or pipeline loads."""
    found: dict[str, type] = {}

    def add(section: str, cls: type, where: str) -> None:
        if found.setdefault(section, cls) is not cls:
            raise ValueError(f"{where}: section {section!r} loaded as {cls.__name__} and {found[section].__name__}")

    for path in sorted([*(root / "stages").glob("*.py"), *(root / "pipelines").glob("*.py")]):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
                continue
            args = call.args
            if call.func.id == "run_stage" and len(args) >= 2 and isinstance(args[0], ast.Constant) \
                    and isinstance(args[1], ast.Name):
                add(args[0].value, _resolve(module, tree, args[1].id), str(path))
                for kw in call.keywords:
                    if kw.arg == "sections" and isinstance(kw.value, ast.Dict):
                        for k, v in zip(kw.value.keys, kw.value.values):
                            if isinstance(k, ast.Constant) and isinstance(v, ast.Name):
                                add(k.value, _resolve(module, tree, v.id), str(path))
            elif call.func.id == "load_section" and len(args) >= 3 and isinstance(args[0], ast.Name) \
                    and isinstance(args[2], ast.Constant):
                add(args[2].value, _resolve(module, tree, args[0].id), str(path))
    return found


# --- documentation of each field -----------------------------------------------------------------

@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    """``{field: comment}`` for the fields ``cls``'s own body annotates (comments above a field,
    then on its line(s)); an uncommented field maps to ``""``."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    text = source.splitlines()
    docs = {}
    (node,) = ast.parse(source).body
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line >= 1 and text[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        docs[stmt.target.id] = " ".join(c for c in above + own if not c.startswith(("noqa", "type:")))
    return docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: documentation}`` for every field of ``cls``, inherited where ``cls`` is silent."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for name, doc in _own_field_docs(klass).items():
            if doc or name not in docs:
                docs[name] = doc
    return docs


def _plain(text: str) -> str:
    """A docstring's reST as Markdown, on one line: ``x`` and :role:`~a.b.x` become `x`."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1)}`", text)
    return " ".join(text.replace("``", "`").split())


def class_summary(cls: type) -> str:
    """The first paragraph of ``cls``'s own docstring (not one inherited or made by dataclass)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return _plain(inspect.cleandoc(doc).split("\n\n")[0])


# --- types and defaults --------------------------------------------------------------------------

def _unwrap(tp: Any) -> tuple[type | None, str]:
    """The dataclass a field nests (``None`` if none) and how it nests: "", "optional" or "list"."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0], "optional"
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return item, "list"
    return None, ""


def _value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _value(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (tuple, list)):
        return [_value(v) for v in value]
    return value


def default_text(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    return f"`{json.dumps(_value(value))}`"


def _defaults(cls: type, instance: Any) -> dict[str, Any]:
    """Each field's default: the enclosing default's value where there is one, else the class's."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if instance is not None:
            out[f.name] = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


def keys(cls: type, instance: Any = None, prefix: str = "") -> list[Key]:
    """Every key of a section loaded into ``cls``, nested keys after their parent."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = []
    for name, default in _defaults(cls, instance).items():
        tp = hints[name]
        nested, how = _unwrap(tp)
        doc = docs.get(name, "") or (class_summary(nested) if nested else "")
        shown = "" if nested and how == "" else default_text(default)
        rows.append(Key(prefix + name, type_name(tp), shown, doc))
        if nested:
            inner = default if how == "" else None
            rows.extend(keys(nested, inner, f"{prefix}{name}{'[].' if how == 'list' else '.'}"))
    return rows


# --- the page ------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    """``text`` in a table cell: outside code spans, ``|`` escaped and ``<`` not taken for HTML."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|").replace("<", "&lt;") for i, p in enumerate(parts))


def sections(params: Path = ROOT / "params.yaml") -> list[tuple[str, type]]:
    """The sections of ``params`` in their order, each with the class it loads."""
    classes = section_classes()
    names = list(yaml.safe_load(params.read_text(encoding="utf-8")))
    missing = [n for n in names if n not in classes]
    if missing:
        raise ValueError(f"params.yaml sections no stage or pipeline loads: {missing}")
    return [(n, classes[n]) for n in names]


def render(params: Path = ROOT / "params.yaml") -> str:
    out = [
        "# Configuration reference",
        "",
        f"<!-- Written by docs/config_reference.py from the config dataclasses: do not edit; `{REGENERATE}`. -->",
        "",
        ("Every key of `params.yaml`, section by section, with its type, its default (the value when the "
        "key is left out) and what it does. Each section is loaded strictly into its stage's frozen "
        "dataclass: an unknown key, a wrong type or an impossible value is a one-line error naming the key "
        "([Troubleshooting](../troubleshooting.md)). A key's documentation lives beside its field in the "
        "dataclass; this page is generated from there and a test fails when it is stale."),
        "",
        ("A `float` key takes an integer too; a `list of …` key takes a YAML list; a `mapping` key is a "
        "nested section, its keys listed below it with a dotted name (`optim.lr`); `reward[].name` is "
        "the key `name` of each entry of the list `reward`."),
        "",
    ]
    for section, cls in sections(params):
        out += [f"## `{section}`", ""]
        summary = class_summary(cls)
        out += [f"{summary} Loaded into `{cls.__module__}.{cls.__qualname__}`.", ""] if summary else \
            [f"Loaded into `{cls.__module__}.{cls.__qualname__}`.", ""]
        out += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for key in keys(cls):
            out.append(f"| `{key.path}` | {_cell(key.type)} | {_cell(key.default)} | {_cell(key.doc)} |")
        out.append("")
    return "\n".join(out)


def undocumented(params: Path = ROOT / "params.yaml") -> list[str]:
    """``section.key`` of every documented-nowhere key (every field of every section's class)."""
    return [f"{section}.{k.path}" for section, cls in sections(params) for k in keys(cls) if not k.doc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script: stages/ and pipelines/ import from the root
    sys.exit(main())
