"""The `sft_data` and `prefs` DVC stages on a tiny project: `dvc repro` on the default data (then
nothing to rerun), the OASST trees through the params a user would set, and unusable input as
one line on stderr with exit code 2, never a traceback, and no output left behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import chat_project, metrics, run_stage_cli, set_params

from palm.core.tokenizer import sha256_file
from palm.data.chat import load_prefs, load_sft
from palm.data.chat_readers import DROP_REASONS

pytestmark = pytest.mark.timeout(900)
ARGS = ["--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--no-mlflow"]


def stage(root: Path, name: str, **env) -> subprocess.CompletedProcess:
    out = "data/sft" if name == "sft_data" else "data/prefs"
    return run_stage_cli(name, ARGS + ["--out", out], cwd=root, env=env)


@pytest.mark.e2e
def test_dvc_repro_default_then_nothing_to_rerun(tmp_path):
    root = chat_project(tmp_path / "p")
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    dvc = lambda *a: subprocess.run([str(root / ".venv" / "bin" / "dvc"), *a], cwd=root, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    first = dvc("repro", "-s", "sft_data", "prefs")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sha = sha256_file(root / "artifacts" / "tokenizer" / "tokenizer.json")
    for name, kept in (("sft_data", 8), ("prefs", 24)):
        m = metrics(root, name)
        assert m["read"] == 8 and m["kept"] == kept == m["train"] + m["valid"]
        assert {f"dropped_{r}" for r in DROP_REASONS} <= set(m)
    assert sum(load_sft(root / "data" / "sft", s, sha).num_rows for s in ("train", "valid")) == 8
    assert load_prefs(root / "data" / "prefs", "valid", sha).num_rows > 0
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock["sft_data"]["params"]["params.yaml"]["model.seq_len"] == 128
    assert {o["path"] for o in lock["prefs"]["outs"]} == {"data/prefs", "reports/prefs/metrics.json"}
    again = dvc("repro", "-s", "sft_data", "prefs")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


def test_oasst_trees_through_the_params(tmp_path, shared_data):
    trees = str(shared_data / "oasst" / "en_100_tree.jsonl")
    root = chat_project(tmp_path / "p", sft_data={"path": trees}, prefs={"path": trees, "format": "oasst"})
    set_params(root, model={"seq_len": 4096})
    sha = sha256_file(root / "artifacts" / "tokenizer" / "tokenizer.json")
    for name, folder, kept in (("sft_data", "sft", 95), ("prefs", "prefs", 732)):
        res = stage(root, name)
        assert res.returncode == 0, res.stderr[-3000:]
        m = metrics(root, name)
        # 100 trees; 5 have a synthetic prompt; the rest hold 95 conversations and 732 ranked pairs
        assert (m["read"], m["dropped_synthetic"]) == (100, 5)
        assert m["kept"] + m["dropped_too_long"] == kept and m["valid"] > 0
        meta = json.loads((root / "data" / folder / "meta.json").read_text())
        assert meta["tokenizer_sha256"] == sha and meta["seq_len"] == 4096 and meta["source"] == trees


def one_line_error(res: subprocess.CompletedProcess, name: str) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith(f"error: {name}: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def test_unusable_input_is_one_line_and_exit_2(tmp_path):
    root = chat_project(tmp_path / "p", sft_data={"path": "junk.jsonl"}, prefs={"path": "hf:nobody/nothing"})
    (root / "junk.jsonl").write_text('{"broken\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    line = one_line_error(stage(root, "sft_data"), "sft_data")
    assert ("junk.jsonl: no usable conversations (2 records read; dropped malformed_json: 1, "
            "no_assistant_turn: 1)") in line
    assert "check sft_data.path and sft_data.format" in line
    line = one_line_error(stage(root, "prefs", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), "prefs")
    assert "hf:nobody/nothing: cannot load the Hugging Face dataset" in line and "network" in line
    set_params(root, sft_data={"pth": "x"})
    assert "sft_data.pth: unknown key (did you mean 'path'?)" in one_line_error(stage(root, "sft_data"), "sft_data")
    assert not (root / "data" / "sft").exists() and not (root / "data" / "prefs").exists()
    assert not list((root / "data").glob(".*.tmp-*"))
