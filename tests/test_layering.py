"""Imports point downwards, and the folder tree says which way down is.

The library's packages are layers; a module imports only its own package and the layers below
(lazy, function-level imports included):

    palm.apps     the palm command, chat, the feedback page, the UI link, the served model, the OpenAI-compatible server
    palm.eval     held-out evaluation and its report
    palm.train    the loop, the engine, the launcher, the objectives
    palm.decode   KV cache, fused decoder and its plan, weight layouts, native kernels, sampling
    palm.model    the network, the reward head, the TP/PP plan, megatron on CPU, exported weights
    palm.data     sources, cleaning, dedup, tokenizing, chat data    (beside palm.model, apart)
    palm.ops      stage runner, MLflow tracking, registry, lineage   (no model, no training)
    palm.core     configs, errors, atomic writes, the tokenizer, process settings

Above the library: ``stages/`` (one thin command per DVC stage; no stage imports another),
``pipelines/`` (Prefect), ``tests/`` (test modules import no other test module: shared builders
live in ``tests/helpers.py``, fixtures in ``conftest.py``). No import circle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"palm.core": 0, "palm.ops": 1, "palm.data": 2, "palm.model": 2, "palm.decode": 3, "palm.train": 4,
          "palm.eval": 5, "palm.apps": 6}
TOP = ("palm", "stages", "pipelines", "tests")


def modules() -> dict[str, Path]:
    """Every module of the repository's Python trees, by dotted name (tests by their file stem,
    as they import each other: ``tests/`` and, in the torchrun workers, ``tests/dist/`` are on
    ``sys.path``)."""
    found = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if top == "tests":  # tests/ and tests/dist/ are on sys.path: their modules go by stem
                parts = parts[-1:]
            name = ".".join(parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(files: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> modules of this repository it imports`` (every import statement in the file)."""
    graph = {}
    for name, path in files.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name and d not in TOP}
    return graph


GRAPH = imports(modules())


def layer(module: str) -> str | None:
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), None)


def test_every_library_module_sits_in_a_layer():
    loose = sorted(m for m in GRAPH if m.startswith("palm.") and layer(m) is None)
    assert loose == [], f"modules outside the layers {list(LAYERS)}: {loose}"


def test_the_library_imports_only_its_own_package_and_layers_below():
    wrong = []
    for module, deps in GRAPH.items():
        if not module.startswith("palm."):
            continue
        mine = layer(module)
        for dep in deps:
            theirs = layer(dep)
            if theirs is None:
                wrong.append(f"{module} -> {dep} (outside the library)")
            elif theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(f"{module} -> {dep}")
    assert wrong == [], "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_no_import_circles_anywhere():
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in GRAPH[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    circles = sorted(m for m in GRAPH if m in reach(m))
    assert circles == [], f"modules that import themselves back: {circles}"


def test_the_model_decoding_and_shared_training_code_import_no_objective():
    objectives = {"palm.train.pretrain", "palm.train.sft", "palm.train.reward", "palm.train.ppo", "palm.train.rlhf"}
    objectives |= {m for m in GRAPH if m.startswith("palm.train.rlhf.")}
    for shared in ("palm.train.loop", "palm.train.launch", "palm.train.engine", "palm.train.checkpoint"):
        assert not GRAPH[shared] & objectives, shared
    assert GRAPH["palm.model.parallel"] <= {"palm.core.errors", "palm.core.process", "palm.model.megatron_compat"}
    network = GRAPH["palm.model.network"]
    assert not {d for d in network if layer(d) != "palm.core" and d not in ("palm.model", "palm.model.parallel")}, network


def test_the_stage_runner_imports_nothing_of_training():
    assert not {d for d in GRAPH["palm.ops.stage"] if not d.startswith("palm.core") and d != "palm.ops.tracking"}


def test_stages_import_the_library_only():
    wrong = {m: sorted(d for d in deps if not d.startswith("palm."))
             for m, deps in GRAPH.items() if m.startswith("stages.")}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_pipelines_import_the_library_and_pipelines_only():
    wrong = {m: sorted(d for d in deps if not d.startswith(("palm.", "pipelines")))
             for m, deps in GRAPH.items() if m.startswith("pipelines")}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_test_modules_import_no_other_test_module():
    tests = {m for m, p in modules().items() if p.is_relative_to(ROOT / "tests")}
    wrong = {m: sorted(d for d in GRAPH[m] if d in tests and d != "helpers")
             for m in tests}
    assert {m: d for m, d in wrong.items() if d} == {}, (
        "shared builders go in tests/helpers.py, fixtures in conftest.py")


def test_the_check_sees_a_wrong_import(tmp_path):
    """The graph builder finds function-level and relative imports (so the checks above can fail)."""
    (tmp_path / "a.py").write_text("def f():\n    from palm.apps import cli\n")
    (tmp_path / "b.py").write_text("from . import a\n")
    fake = {"palm.core.a": tmp_path / "a.py", "palm.core.b": tmp_path / "b.py", "palm.apps.cli": tmp_path / "a.py"}
    graph = imports(fake)
    assert graph["palm.core.a"] == {"palm.apps.cli"} and graph["palm.core.b"] == {"palm.core.a"}
