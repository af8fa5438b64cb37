"""docs/tutorial.md, run: its ```bash blocks, in page order, each with ``bash -euo pipefail``, in a
fresh copy of the project (tracked files only, as a clone has them). A failing block fails the test
with the block and its output. The commands are the page's exactly, and the outputs are then checked
against the inputs the page wrote: the corpus is the text files, the chat data and the pairs are
the rankings.

A comment line right above a block says how to treat it (a blank line between is allowed):

- ``<!-- tutorial: skip: <why> -->``: never run (setup that needs the network, interactive
  commands, the full-length run);
- ``<!-- tutorial: long: <why> -->``: the training blocks (the 10-step runs of three stages and
  `palm chat`): run, like every other block, unless ``PALM_TUTORIAL_QUICK=1`` (a quicker local
  check of the data blocks alone)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from helpers import ROOT, clone_project

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PAGE = ROOT / "docs" / "tutorial.md"
MARK = re.compile(r"<!-- tutorial: (skip|long): \S.* -->")
BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.S | re.M)
ALL = os.environ.get("PALM_TUTORIAL_QUICK") != "1"


def blocks(markdown: str) -> list[tuple[str, str]]:
    """``(code, kind)`` of every ```bash block, in page order; ``kind`` is ``run``, or the
    ``skip``/``long`` of the marker comment right above the block."""
    out = []
    for m in BLOCK.finditer(markdown):
        above = markdown[:m.start()].rstrip().splitlines()[-1].strip()
        mark = MARK.fullmatch(above)
        out.append((m.group(1), mark.group(1) if mark else "run"))
    return out


def test_every_marker_is_well_formed_and_most_blocks_run():
    page = PAGE.read_text()
    for line in page.splitlines():
        if line.startswith("<!-- tutorial"):
            assert MARK.fullmatch(line.strip()), f"a marker says skip or long, and why: {line}"
    kinds = [kind for _, kind in blocks(page)]
    assert page.count("<!-- tutorial") == sum(k != "run" for k in kinds), "a marker is not right above a block"
    assert kinds.count("run") >= 4 and "long" in kinds


def run_blocks(root, env) -> list[str]:
    ran = []
    for i, (code, kind) in enumerate(blocks(PAGE.read_text()), 1):
        if kind == "skip" or (kind == "long" and not ALL):
            continue
        start = time.monotonic()
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, (f"docs/tutorial.md block {i} failed (exit {res.returncode}):\n{code}\n"
                                     f"--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}")
        print(f"block {i}: {time.monotonic() - start:.1f} s")
        ran.append(res.stdout)
    return ran


def test_tutorial_runs_in_a_fresh_clone(tmp_path):
    from palm.data.corpus import read_corpus

    root = clone_project(tmp_path / "clone")
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    outputs = run_blocks(root, env)
    metrics = lambda stage: json.loads((root / "reports" / stage / "metrics.json").read_text())  # noqa: E731

    # the corpus is the text folder: a document per file that passed the filters, titled by its name
    files = {p.stem for p in (root / "my-text").iterdir()}
    titles = {t for batch in read_corpus(root / "data" / "corpus", ["title"]) for t in batch.column("title").to_pylist()}
    assert titles and titles <= files, titles - files
    assert metrics("tokenize")["documents"] == len(titles) and metrics("tokenize")["tokens"] > 0
    # the chat data and the pairs are the rankings: each one's best reply, every two replies ranked apart
    judgements = [json.loads(line) for line in (root / "data" / "feedback" / "rankings.jsonl").read_text().splitlines()]
    prefs, sft_data = metrics("prefs"), metrics("sft_data")
    assert prefs["rankings"] == sft_data["rankings"] == len(judgements)
    assert prefs["kept"] == sum(len(j["replies"]) * (len(j["replies"]) - 1) // 2 for j in judgements)
    assert sft_data["kept"] == len(judgements)
    if not ALL:
        return
    # the SFT model learnt the best replies, the reward model trained on the pairs, palm chat answered
    sft, reward = metrics("sft"), metrics("reward")
    assert sft["steps"] == reward["steps"] == 10 and sft["val_loss"] < sft["base_val_loss"]
    assert reward["train_pairs"] == prefs["train"] and 0.0 <= reward["val_accuracy"] <= 1.0
    assert json.loads((root / "models" / "reward" / "config.json").read_text())["kind"] == "reward"
    assert outputs[-1].strip(), "palm chat replied nothing"
