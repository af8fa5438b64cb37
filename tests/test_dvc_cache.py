"""What DVC sees of the pipeline's code, for real (DVC itself, no mocks): a code file reruns
exactly the stages whose commands execute it (dvc.yaml's code deps, derived by palm/ops/deps.py).

The dvc.lock is recorded without running the pipeline: every stage's data deps and outputs are
placeholders and ``dvc commit -f`` records them, so ``dvc status`` then compares only what the
test edits. (That a finished ``dvc repro`` restores every stage from the run cache, dvc.lock
deleted, is checked on the real pipeline: tests/test_pipeline_e2e.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import make_project

pytestmark = pytest.mark.e2e
WATCHED = ("pretrain", "sft", "reward", "gold_reward", "ppo", "dpo", "evaluate")


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / ".venv" / "bin" / "dvc"), *args], cwd=root, capture_output=True,
                          text=True, timeout=600)


def status(root: Path) -> dict:
    out = dvc(root, "status", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def locked(tmp_path_factory) -> Path:
    """A project copy whose dvc.lock records every stage, over placeholder data and outputs."""
    from dvc.repo import Repo

    root = make_project(tmp_path_factory.mktemp("project"))
    with Repo(str(root)) as repo:
        paths = {Path(entry.def_path) for stage in repo.index.stages for entry in [*stage.deps, *stage.outs]}
    for rel in paths:
        path = root / rel
        if path.exists():
            continue
        if rel.suffix:  # reports/ppo/samples.jsonl, metrics.json, curve.csv, report.html
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"placeholder {rel}\n")
        else:  # data/corpus, models/sft, reports/evaluate/plots
            path.mkdir(parents=True)
            (path / "placeholder").write_text(f"placeholder {rel}\n")
    out = dvc(root, "commit", "-f")
    assert out.returncode == 0, out.stderr[-3000:]
    assert status(root) == {}
    return root


@pytest.mark.parametrize(("edited", "changed"), [
    # the native kernels' source, compiled at run time: every stage that generates text
    ("palm/decode/native/decode.c", {"ppo", "evaluate"}),
    # a stage's own command: that stage only (reward and ppo once listed it as shared code)
    ("stages/sft.py", {"sft"}),
    # the launcher every training stage starts its workers with (evaluate starts none)
    ("palm/train/launch.py", {"pretrain", "sft", "reward", "gold_reward", "ppo", "dpo"}),
])
def test_a_code_file_changes_the_stages_that_run_it(locked, edited, changed):
    path = locked / edited
    before = path.read_bytes()
    comment = b"/* a comment */\n" if path.suffix == ".c" else b"# a comment\n"
    path.write_bytes(before + comment)
    try:
        now = status(locked)
    finally:
        path.write_bytes(before)
    assert {s for s in now if s in WATCHED} == changed, now
    assert set(now) == changed, now  # and none of the data stages
    for stage in changed:
        assert now[stage] == [{"changed deps": {edited: "modified"}}], now[stage]
    assert status(locked) == {}  # the file back as it was: nothing to rerun
