"""The `sft`, `reward` and `gold_reward` DVC stages on a tiny project (the pydoc-like test corpus, a tiny
tokenizer, a tiny randomly initialised parent in models/pretrain): `dvc repro` of the chat stages,
with no third-party warning in their output, then nothing to rerun, a `reward` param reruns
`reward` only, MLflow runs carry the md5 of their data and parent; the gold reward model trains on
prefs' gold split alone; the OASST trees through the params; bad input is one line with exit code 2."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, finetune_project, make_parent, metrics, set_params, with_kind  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.dist, pytest.mark.timeout(1200)]

TRAIN = {"train_steps": 4, "log_interval": 2, "eval_interval": 2, "checkpoint_interval": 2, "eval_batches": 2,
         "dtype": "fp32", "optim": {"lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1}}
CHAIN = ["sft_data", "sft", "prefs", "reward"]
# a third-party warning in a stage's output (palm/core/quiet.py silences the known-benign ones), or
# one of DVC's (`WARNING: 'palm/train/__init__.py' is empty.`, once per stage and dependency): a
# user sees progress, the stage's own lines and real warnings only
NOISE = re.compile(r"UserWarning|FutureWarning|DeprecationWarning|Transformer Engine|Apex|^WARNING: ")


def project(tmp: Path, seq_len: int = 128, **sections) -> Path:
    return finetune_project(tmp, seq_len, sft={**TRAIN, "micro_batch_size": 2}, reward={**TRAIN, "micro_batch_size": 4},
                            gold_reward={**TRAIN, "micro_batch_size": 4}, **sections)


def repro(root: Path, env: dict) -> subprocess.CompletedProcess:
    """The chat stages only (-s): the tiny project has no scrape/tokenize/pretrain runs."""
    res = subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", "-s", *CHAIN], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root), **env}, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def ran(res: subprocess.CompletedProcess) -> list[str]:
    return [s for s in CHAIN if f"Running stage '{s}'" in res.stdout]


def noise(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (res.stdout + res.stderr).splitlines() if NOISE.search(line)]


def test_dvc_repro_chain_then_nothing_then_a_reward_param_reruns_reward_only(tmp_path):
    import mlflow
    from safetensors.torch import load_file

    root = project(tmp_path / "p")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = repro(root, env)
    assert ran(first) == CHAIN
    # the stages, their training workers and MLflow print no third-party warning
    assert noise(first) == [], "\n".join(noise(first))

    sft = metrics(root, "sft")
    for key in ("val_loss", "base_val_loss", "val_perplexity", "final_train_loss", "tokens_per_s"):
        assert isinstance(sft[key], float) and math.isfinite(sft[key]), key
    assert sft["val_loss"] < sft["base_val_loss"]  # the random parent knows nothing of the replies
    assert sft["steps"] == 4 and sft["valid_conversations"] > 0
    assert (root / "reports" / "sft" / "curve.csv").read_text().startswith("step,loss,val_loss,")
    config = json.loads((root / "models" / "sft" / "config.json").read_text())
    assert config["kind"] == "sft" and config["model"]["d_model"] == MODEL.d_model
    assert config["metrics"]["base_val_loss"] == sft["base_val_loss"]
    assert (root / "models" / "sft" / "tokenizer.json").read_bytes() == \
        (root / "artifacts" / "tokenizer" / "tokenizer.json").read_bytes()

    rm = metrics(root, "reward")
    assert 0.0 <= rm["val_accuracy"] <= 1.0 and math.isfinite(rm["val_margin"]) and rm["valid_pairs"] > 0
    assert rm["reward_std"] > 0 and math.isfinite(rm["reward_mean"]) and "val_perplexity" not in rm
    # the default pairs carry their kind: held-out accuracy per kind, over all held-out pairs
    kinds = {k[len("valid_pairs_"):] for k in rm if k.startswith("valid_pairs_")}
    assert kinds and kinds <= {"other", "shuffled", "repeated"}
    assert sum(rm[f"valid_pairs_{k}"] for k in kinds) == metrics(root, "prefs")["valid"]
    assert all(0.0 <= rm[f"val_accuracy_{k}"] <= 1.0 for k in kinds)
    assert (root / "reports" / "reward" / "curve.csv").read_text().startswith(
        "step,loss,accuracy,val_loss,val_accuracy,")
    config = json.loads((root / "models" / "reward" / "config.json").read_text())
    assert config["kind"] == "reward" and config["parent"] == "models/sft"
    assert config["reward"]["mean"] == rm["reward_mean"] and config["reward"]["std"] == rm["reward_std"]
    assert load_file(str(root / "models" / "reward" / "model.safetensors"))["head.weight"].shape == (1, MODEL.d_model)

    # MLflow: each stage one finished run, tagged with the DVC md5 of its data and parent model
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("palm-rlhf").experiment_id])
    for stage, data, parent in (("sft", "data/sft", "models/pretrain"), ("reward", "data/prefs", "models/sft")):
        (run,) = [r for r in runs if r.data.tags.get("palm.ops.stage") == stage]
        assert run.info.status == "FINISHED" and run.data.params and "val_loss" in run.data.metrics
        md5 = {d["path"]: d["md5"] for d in lock[stage]["deps"]}
        for dep in (data, parent):
            assert run.data.tags[f"dvc.dep.{dep}.md5"] == md5[dep], (stage, dep)

    assert ran(repro(root, env)) == []  # nothing changed: nothing reruns
    set_params(root, reward={"margin": 0.1})
    assert ran(repro(root, env)) == ["reward"]
    assert json.loads((root / "models" / "reward" / "config.json").read_text())["margin"] == 0.1


def test_gold_reward_trains_on_the_gold_split_alone(tmp_path, monkeypatch, stage_error):
    """The gold judge's stage: the prefs' gold pairs (never the proxy's train split), validated on
    the same held-out pairs, exported with "split": "gold"; an empty gold split is one line."""
    from stages.gold_reward import main
    from stages.prefs import main as prefs

    root = project(tmp_path / "p", prefs={"gold_fraction": 0.5})
    with_kind(make_parent(root / "models" / "sft", root / "artifacts" / "tokenizer", seed=12), "sft")
    monkeypatch.chdir(root)
    data = ["--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--out", "data/prefs", "--no-mlflow"]
    assert prefs(data) == 0
    pr = metrics(root, "prefs")
    args = ["--data", "data/prefs", "--parent", "models/sft", "--checkpoints", "checkpoints/gold_reward",
            "--out", "models/gold_reward"]
    assert main(args + ["--no-mlflow"]) == 0
    gm = metrics(root, "gold_reward")
    assert gm["train_pairs"] == pr["gold"] > 0 and pr["train"] > 0
    assert sum(v for k, v in gm.items() if k.startswith("valid_pairs_")) == pr["valid"]  # the proxy's held-out pairs
    assert gm["steps"] == TRAIN["train_steps"] and gm["reward_std"] > 0 and 0.0 <= gm["val_accuracy"] <= 1.0
    config = json.loads((root / "models" / "gold_reward" / "config.json").read_text())
    assert config["kind"] == "reward" and config["split"] == "gold" and config["reward"]["std"] == gm["reward_std"]
    assert (root / "reports" / "gold_reward" / "curve.csv").is_file()
    assert list((root / "checkpoints" / "gold_reward").glob("*")) and not (root / "checkpoints" / "reward").exists()

    set_params(root, prefs={"gold_fraction": 0.0})
    assert prefs(data) == 0 and metrics(root, "prefs")["gold"] == 0
    line = stage_error("gold_reward", args)
    assert "data/prefs: no gold pairs for the gold reward model; set prefs.gold_fraction above 0" in line


def test_oasst_trees_through_the_params(tmp_path, shared_data):
    trees = str(shared_data / "oasst" / "en_100_tree.jsonl")
    # the 100 trees hold 95 conversations and 732 ranked pairs (tests/test_chat.py counts them);
    # the tiny tokenizer spends many tokens per word, so at 512 the long ones are dropped and counted
    root = project(tmp_path / "p", seq_len=512, sft_data={"path": trees, "valid_fraction": 0.2},
                   prefs={"path": trees, "format": "oasst", "valid_fraction": 0.2})
    set_params(root, sft={"eval_batches": 30}, reward={"eval_batches": 40})  # every held-out example
    assert ran(repro(root, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})) == CHAIN
    sd, pr = metrics(root, "sft_data"), metrics(root, "prefs")
    assert sd["kept"] + sd["dropped_too_long"] == 95 and pr["kept"] + pr["dropped_too_long"] == 732
    sft, rm = metrics(root, "sft"), metrics(root, "reward")
    print(f"OASST (tiny model): {sd['kept']} conversations, sft val_loss {sft['val_loss']:.3f} vs base "
          f"{sft['base_val_loss']:.3f}; {pr['kept']} pairs, reward val_accuracy {rm['val_accuracy']:.3f} "
          f"on {rm['valid_pairs']} held-out pairs")
    assert sft["train_conversations"] + sft["valid_conversations"] <= sd["kept"]
    assert math.isfinite(sft["val_loss"]) and math.isfinite(sft["base_val_loss"])
    assert sft["valid_conversations"] == sd["valid"] > 0
    assert rm["train_pairs"] == pr["train"] and rm["valid_pairs"] == pr["valid"] > 0
    assert 0.0 <= rm["val_accuracy"] <= 1.0 and math.isfinite(rm["reward_std"])


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, stage_error):
    root = project(tmp_path / "p")
    monkeypatch.chdir(root)
    for stage, out in (("sft_data", "data/sft"), ("prefs", "data/prefs")):
        assert importlib.import_module(f"stages.{stage}").main(
            ["--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--out", out, "--no-mlflow"]) == 0
    sft = ["--data", "data/sft", "--checkpoints", "checkpoints/sft", "--out", "models/sft"]
    reward = ["--data", "data/prefs", "--checkpoints", "checkpoints/reward", "--out", "models/reward"]

    assert "models/sft: parent model not found" in stage_error("reward", reward + ["--parent", "models/sft"])
    assert "run the sft stage first" in stage_error("reward", reward + ["--parent", "models/sft"])
    assert "parent model not found" in stage_error("sft", sft + ["--parent", "models/none"])

    config = root / "models" / "pretrain" / "config.json"
    good = config.read_text()
    config.write_text(json.dumps({**json.loads(good), "tokenizer_sha256": "0" * 64}))
    line = stage_error("sft", sft + ["--parent", "models/pretrain"])
    assert "data/sft was tokenized with tokenizer sha256" in line and "000000000000" in line
    config.write_text("{not json")
    assert "not a palm model export" in stage_error("sft", sft + ["--parent", "models/pretrain"])
    config.write_text(good)

    set_params(root, sft={"tensor_parallel": 3})
    assert "sft.tensor_parallel: model.n_heads=2 is not divisible by tensor_parallel=3" in \
        stage_error("sft", sft + ["--parent", "models/pretrain"])
    set_params(root, sft={"tensor_parallel": 1}, reward={"micro_batch_size": 3})
    assert "reward.micro_batch_size" in stage_error("reward", reward + ["--parent", "models/pretrain"])
    assert not (root / "models" / "sft").exists() and not (root / "models" / "reward").exists()
