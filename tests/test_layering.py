"""Imports point downwards: no import circle anywhere in ``palm`` (lazy, function-level imports
included), the model knows nothing of training, and the training loop and launcher never import
an objective module (objectives hand themselves over)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def palm_imports() -> dict[str, set[str]]:
    """``module -> palm modules it imports`` (every import statement in the file)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "palm").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("palm"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("palm."))
        graph[name] = {d for d in deps if d in files and d not in (name, "palm")}
    return graph


def test_no_import_circles():
    graph = palm_imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert circles == [], f"modules that import themselves back: {circles}"


def test_the_model_and_the_shared_training_code_import_no_objective():
    graph = palm_imports()
    assert not {d for d in graph["palm.model"] if d.startswith("palm.train")}
    assert graph["palm.parallel"] <= {"palm.errors", "palm.megatron_compat"}
    objectives = {"palm.train.pretrain", "palm.train.sft", "palm.train.reward", "palm.train.ppo"}
    for shared in ("palm.train.loop", "palm.train.launch", "palm.train.engine"):
        assert not graph[shared] & objectives, shared
