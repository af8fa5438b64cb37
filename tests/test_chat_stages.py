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
from helpers import chat_project, make_tokenizer, metrics, pydoc_corpus, run_stage_cli, set_params

from palm.core.errors import ConfigError, UserError
from palm.core.tokenizer import sha256_file
from palm.data.chat import ChatDataConfig, build_chat_data, gold_groups, load_prefs, load_sft
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
        assert m["read"] == 8 and m["kept"] == kept == m["train"] + m["valid"] + m.get("gold", 0)
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


# ---- the gold split of prefs (the gold reward model's pairs) ------------------------------------

def build_prefs(tmp: Path, out: str, **cfg) -> tuple[Path, dict, dict[str, set[str]]]:
    """prefs on the pydoc-like corpus into ``tmp/out``: the folder, the metrics and each split's groups."""
    corpus, tok = tmp / "corpus", tmp / "tok"
    if not corpus.exists():
        pydoc_corpus(corpus)
        make_tokenizer(tok)
    folder = tmp / out
    folder.mkdir()
    m = build_chat_data("prefs", ChatDataConfig(seed=5, min_valid=4, **cfg), corpus=corpus, tokenizer=tok,
                        seq_len=128, out=folder)
    sha = sha256_file(tok / "tokenizer.json")
    groups = {s: set(load_prefs(folder, s, sha).column("group_id").to_pylist()) for s in ("train", "valid", "gold")}
    return folder, m, groups


def test_the_gold_split_is_apart_deterministic_and_leaves_valid_as_it_was(tmp_path):
    _, none, before = build_prefs(tmp_path, "none", valid_fraction=0.2)
    folder, m, split = build_prefs(tmp_path, "gold", valid_fraction=0.2, gold_fraction=0.5)
    _, _, again = build_prefs(tmp_path, "again", valid_fraction=0.2, gold_fraction=0.5)
    assert before["gold"] == set() and none["gold"] == 0  # gold_fraction 0: gold.parquet written, empty
    assert split["valid"] == before["valid"] and m["valid"] == none["valid"]  # valid as without a gold split
    assert split["gold"] and not split["gold"] & split["train"] and not split["gold"] & split["valid"]
    assert split["train"] | split["gold"] == before["train"]  # only train gave its groups
    assert m["gold"] + m["train"] == none["train"] and m["gold"] > 0 and m["gold_tokens"] > 0
    assert again == split  # the hash decides, nothing random
    assert json.loads((folder / "meta.json").read_text())["counts"]["gold"] == m["gold"]


def test_the_gold_hash_is_salted_apart_from_the_valid_split():
    from palm.data.tokenize import TokenizeConfig, choose_valid

    ids = [f"{i:040x}" for i in range(4000)]
    valid = choose_valid(ids, TokenizeConfig(valid_fraction=0.25, seed=5))
    gold = gold_groups(ids, 0.25, 5)
    assert gold == gold_groups(list(reversed(ids)), 0.25, 5) and 900 < len(gold) < 1100
    assert 150 < len(gold & valid) < 350  # independent (about 1/16 of the ids), not the same hash (1/4)
    assert gold_groups(ids, 0.0, 5) == set() and gold_groups(ids[:2], 0.99, 5) != set(ids[:2])  # never all


def test_gold_only_for_prefs_and_an_old_prefs_folder_says_rerun(tmp_path):
    folder, _, _ = build_prefs(tmp_path, "p", valid_fraction=0.2, gold_fraction=0.3)
    sha = sha256_file(tmp_path / "tok" / "tokenizer.json")
    (folder / "gold.parquet").unlink()  # a folder the prefs stage made before gold existed
    with pytest.raises(UserError, match=r"no gold split .*rerun the prefs stage \(dvc repro prefs\)"):
        load_prefs(folder, "gold", sha)
    (tmp_path / "sft").mkdir()
    with pytest.raises(ConfigError, match="sft_data.gold_fraction: only prefs sets a gold split apart"):
        build_chat_data("sft", ChatDataConfig(gold_fraction=0.2), corpus=tmp_path / "corpus", tokenizer=tmp_path / "tok",
                        seq_len=128, out=tmp_path / "sft")
    with pytest.raises(ConfigError, match="gold_fraction: must be in"):
        ChatDataConfig(gold_fraction=1.0)
