"""Each DVC stage's code dependencies, derived from the code instead of written by hand.

A stage's code is what running its command executes: the module ``python -m stages.X`` starts,
and every module of this repository it imports, transitively (module-level and function-level
imports, ``from X import Y`` where Y is a submodule, relative imports; importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py`` too). Beyond ``import`` statements, a module reaches
code of the repository three more ways, followed the same way:

* a training worker is started by an entry string, ``"palm.train.pretrain:worker"`` (a string
  constant ``"<module>:<function>"`` naming a module of this repository);
* a file the module names by a path built from its own: ``Path(__file__).with_name("links.py")``
  (a script run in a subprocess), ``.with_name("decode.c")`` (the native kernels' source),
  ``Path(__file__).resolve().parents[1] / "apps" / "serving.py"`` (the served model's code, logged
  with each registered model); only files under ``palm/``, ``stages/``, ``pipelines/`` count;
* package data: the files ``[tool.setuptools.package-data]`` of pyproject.toml lists for a
  package in the closure (``palm/decode/native/decode.c``, the feedback page's templates).

Imports under ``if TYPE_CHECKING:`` never run and do not count; third-party modules are not
followed. :func:`check` compares the result with the code entries (paths under ``palm/``,
``stages/``, ``pipelines/``) of each stage's ``deps`` in dvc.yaml; :func:`write` rewrites those
entries to the derived list, leaving data deps, params, outs and comments as they are.

    python -m palm.ops.deps           # drift, one line each; exit 1 when there is any
    python -m palm.ops.deps --write   # make dvc.yaml's code deps the derived ones (make deps)
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

from palm.core.errors import UserError
from palm.core.io import atomic_file

CODE_TOPS = ("palm", "stages", "pipelines")  # the repository's Python trees
TOP_ORDER = ("stages", "pipelines", "palm")  # a stage's deps list: its own module, then stages/, ..., palm/
ENTRY = re.compile(rf"^((?:{'|'.join(CODE_TOPS)})(?:\.\w+)*):\w+$")  # "palm.train.pretrain:worker"
MODULE_ARG = re.compile(r"(?:^|\s)-m\s+([\w.]+)")  # the command's `python -m stages.X`
VAR = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def is_code(path: str) -> bool:
    """A dvc.yaml dep path that names code of this repository (not data, models, reports)."""
    return path.split("/", 1)[0] in CODE_TOPS and "/" in path


def module_file(root: Path, name: str) -> Path | None:
    """The file of module ``name`` in this repository (a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in CODE_TOPS:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


class _Refs(ast.NodeVisitor):
    """What one file reaches: the modules it names (import statements, entry strings) and the
    files it names by a path built from its own: ``Path(__file__)`` with ``.resolve()``,
    ``.parent``, ``.parents[N]``, ``.with_name("x")``, ``/ "x"``, directly or through a
    module-level name (``PALM = Path(__file__).resolve().parents[1]``, then ``PALM / "apps" / "serving.py"``)."""

    def __init__(self, file: Path, package: str):
        self.file = file
        self.package = package  # the package relative imports start from
        self.modules: set[str] = set()  # candidates: a name that is no module of the repo is dropped later
        self.paths: set[Path] = set()  # candidates: only existing files of the repository count
        self.names: dict[str, Path] = {}  # module-level names bound to such a path

    def run(self, tree: ast.Module) -> _Refs:
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = self.path(node.value)
                if value is not None and len(targets) == 1 and isinstance(targets[0], ast.Name):
                    self.names[targets[0].id] = value
        self.visit(tree)
        return self

    def path(self, node: ast.AST) -> Path | None:
        """The path ``node`` evaluates to, where it is built from ``__file__`` and constants."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Call):
            func, args = node.func, node.args
            if isinstance(func, (ast.Name, ast.Attribute)) and getattr(func, "id", getattr(func, "attr", "")) == "Path" \
                    and len(args) == 1 and isinstance(args[0], ast.Name) and args[0].id == "__file__":
                return self.file
            if not isinstance(func, ast.Attribute) or (base := self.path(func.value)) is None:
                return None
            if func.attr == "resolve" and not args:
                return base
            if all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args) and args:
                if func.attr == "with_name" and len(args) == 1:
                    return base.with_name(args[0].value)
                if func.attr == "joinpath":
                    return base.joinpath(*(a.value for a in args))
            return None
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            base = self.path(node.value)
            return base.parent if base is not None else None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents" \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
            base = self.path(node.value.value)
            return base.parents[node.slice.value] if base is not None and node.slice.value < len(base.parents) \
                else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and isinstance(node.right.value, str):
            base = self.path(node.left)
            return base / node.right.value if base is not None else None
        return None

    def visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.expr) and (found := self.path(node)) is not None:
            self.paths.add(found)
        super().visit(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:  # the body never runs
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.modules.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            up = parts[:len(parts) - node.level + 1]
            base = ".".join([*up, base] if base else up)
        self.modules.add(base)
        self.modules.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and (m := ENTRY.match(node.value)):
            self.modules.add(m.group(1))


def package_data(root: Path) -> dict[str, list[str]]:
    """pyproject.toml's ``[tool.setuptools.package-data]``: package -> glob patterns in its folder."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return {}
    table = tomllib.loads(path.read_text()).get("tool", {}).get("setuptools", {}).get("package-data", {})
    return {pkg: list(patterns) for pkg, patterns in table.items()}


def closure(root: Path, start: str) -> list[str]:
    """Repository-relative paths of every file running module ``start`` executes or reads (see the
    module docstring), sorted."""
    root = Path(root).resolve()
    data = package_data(root)
    files: set[Path] = set()
    seen: set[str] = set()
    todo = [start]
    if module_file(root, start) is None:
        raise UserError(f"module {start} not found under {root}")
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(root, name)
        if path is None:
            continue
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        files.add(path)
        is_package = path.name == "__init__.py"
        refs = _Refs(path, name if is_package else name.rpartition(".")[0])
        refs.run(ast.parse(path.read_text(), filename=str(path)))
        todo.extend(refs.modules)
        for other in refs.paths:
            other = Path(os.path.normpath(other))
            if not other.is_file() or not other.is_relative_to(root) \
                    or other.relative_to(root).parts[0] not in CODE_TOPS:
                continue  # a folder, a missing file, a file outside the code (requirements.lock)
            files.add(other)
            if other.suffix == ".py":
                todo.append(module_name(root, other))
        if is_package:
            for pattern in data.get(name, []):
                files.update(p for p in path.parent.glob(pattern) if p.is_file())
    return sorted(p.relative_to(root).as_posix() for p in files)


def _variables(root: Path, doc: dict) -> dict:
    """dvc.yaml's ``vars`` (inline mappings, and files such as params.yaml) as one mapping."""
    out: dict = {}
    for entry in doc.get("vars") or []:
        if isinstance(entry, dict):
            out.update(entry)
        elif isinstance(entry, str):
            file, _, keys = entry.partition(":")
            path = root / file
            if path.is_file():
                loaded = yaml.safe_load(path.read_text()) or {}
                out.update({k: loaded[k] for k in keys.split(",") if k in loaded} if keys else loaded)
    params = root / "params.yaml"  # DVC reads params.yaml's top-level keys as variables too
    if params.is_file():
        out = {**(yaml.safe_load(params.read_text()) or {}), **out}
    return out


def resolve(text: str, variables: dict) -> str:
    """``text`` with dvc.yaml's ``${name}`` / ``${a.b}`` interpolated (unknown names left as they are)."""
    def one(m: re.Match) -> str:
        value: object = variables
        for key in m.group(1).split("."):
            if not isinstance(value, dict) or key not in value:
                return m.group(0)
            value = value[key]
        return str(value)

    return VAR.sub(one, text)


def _load(root: Path) -> tuple[dict, dict]:
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        raise UserError(f"no dvc.yaml in {root}")
    doc = yaml.safe_load(path.read_text()) or {}
    return doc, _variables(Path(root), doc)


def _command(stage: dict) -> str:
    cmd = stage.get("cmd", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def derived(root: Path) -> dict[str, list[str]]:
    """For each stage of dvc.yaml whose command runs a module of this repository (``-m X``): its
    code dependencies, the stage's own module first, then the rest sorted (``stages/`` before
    ``pipelines/`` before ``palm/``)."""
    root = Path(root)
    doc, variables = _load(root)
    out = {}
    for name, stage in (doc.get("stages") or {}).items():
        m = MODULE_ARG.search(resolve(_command(stage), variables))
        if not m or module_file(root, m.group(1)) is None:
            continue
        first = module_file(root, m.group(1)).relative_to(root).as_posix()
        out[name] = sorted(closure(root, m.group(1)), key=lambda p: (p != first, TOP_ORDER.index(p.split("/")[0]), p))
    return out


def listed(root: Path) -> dict[str, list[str]]:
    """For each stage of dvc.yaml: the code entries of its ``deps`` (resolved, in file order)."""
    doc, variables = _load(Path(root))
    out = {}
    for name, stage in (doc.get("stages") or {}).items():
        deps = [resolve(d if isinstance(d, str) else next(iter(d)), variables) for d in stage.get("deps") or []]
        out[name] = [d for d in deps if is_code(d)]
    return out


def check(root: Path) -> list[str]:
    """Drift between dvc.yaml's code deps and the derived ones, one line per path:
    ``stage ppo: missing palm/decode/native/decode.c``, ``stage ppo: stale stages/sft.py``."""
    want, have = derived(root), listed(root)
    lines = []
    for stage, paths in want.items():
        got = have.get(stage, [])
        lines += [f"stage {stage}: missing {p}" for p in paths if p not in got]
        lines += [f"stage {stage}: stale {p}" for p in got if p not in paths]
        lines += [f"stage {stage}: listed twice {p}" for p in sorted({p for p in got if got.count(p) > 1})]
    return lines


_KEY = re.compile(r"^(\s*)([\w.-]+)\s*:\s*(?:#.*)?$")  # a mapping key that opens a block
_ITEM = re.compile(r"^(\s*)-\s+(.*?)\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _item_path(text: str) -> str:
    """The path of a deps item's text (``palm/x.py   # why``, ``"${corpus}"``)."""
    text = re.sub(r"\s+#.*$", "", text).strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def rewrite(text: str, want: dict[str, list[str]], variables: dict) -> str:
    """dvc.yaml's ``text`` with each stage of ``want`` listing exactly those code deps, first in its
    ``deps`` block; its other entries, comments and every other line unchanged. An entry that stays
    keeps its line (and comment)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i, stage_indent, stage = 0, None, None
    in_stages = False
    while i < len(lines):
        line = lines[i]
        key = _KEY.match(line)
        if key and _indent(line) == 0:
            in_stages, stage, stage_indent = key.group(2) == "stages", None, None
        elif in_stages and key and (stage_indent is None or _indent(line) == stage_indent):
            stage_indent, stage = _indent(line), key.group(2)
        elif in_stages and stage in want and key and key.group(2) == "deps" and _indent(line) > (stage_indent or 0):
            out.append(line)
            block_indent = _indent(line)
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")
                                      or _indent(lines[i]) > block_indent):
                block.append(lines[i])
                i += 1
            # trailing blank lines and comments belong to what follows
            tail = []
            while block and (not block[-1].strip() or (block[-1].lstrip().startswith("#")
                                                       and _indent(block[-1]) <= block_indent)):
                tail.insert(0, block.pop())
            items = [(ln, _ITEM.match(ln)) for ln in block]
            item_indent = next((_indent(ln) for ln, m in items if m), block_indent + 2)
            kept_code = {resolve(_item_path(m.group(2)), variables): ln for ln, m in items
                         if m and is_code(resolve(_item_path(m.group(2)), variables))}
            out.extend(kept_code.get(p) or f"{' ' * item_indent}- {p}\n" for p in want[stage])
            out.extend(ln for ln, m in items if not (m and is_code(resolve(_item_path(m.group(2)), variables))))
            out.extend(tail)
            continue
        out.append(line)
        i += 1
    return "".join(out)


def write(root: Path) -> list[str]:
    """Rewrite dvc.yaml so that each stage's code deps are the derived ones; the drift it fixed."""
    root = Path(root)
    drift = check(root)
    if not drift:
        return []
    want = derived(root)
    doc, variables = _load(root)
    missing_block = [s for s in want if not doc["stages"][s].get("deps")]
    if missing_block:
        raise UserError(f"dvc.yaml: stage(s) {', '.join(missing_block)} have no deps block to write into")
    path = root / "dvc.yaml"
    new = rewrite(path.read_text(), want, variables)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(new)
    left = check(root)
    if left:  # the line-based rewrite could not reach some entry
        raise UserError("dvc.yaml still differs after --write:\n" + "\n".join(left))
    return drift


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m palm.ops.deps", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path.cwd(), help="the project (default: the current folder)")
    p.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps to the derived ones")
    args = p.parse_args(argv)
    try:
        if args.write:
            fixed = write(args.root)
            for line in fixed:
                print(f"fixed: {line}")
            print(f"dvc.yaml: {len(fixed)} code deps fixed" if fixed else "dvc.yaml: code deps up to date")
            return 0
        drift = check(args.root)
    except UserError as e:
        print(f"error: deps: {e}", file=sys.stderr)
        return 2
    for line in drift:
        print(line)
    if drift:
        print(f"{len(drift)} drift line(s); `make deps` (python -m palm.ops.deps --write) rewrites dvc.yaml",
              file=sys.stderr)
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
