"""The `dpo` DVC stage on a tiny project: `dvc repro` of sft_data -> sft -> prefs -> dpo, the export
and its MLflow run, a `dpo` param reruns `dpo` alone; a run killed after its first checkpoint ends
like an uninterrupted one; and DPO on real human preferences (the OASST trees' ranked replies)
written as Anthropic hh-rlhf `.jsonl.gz` transcripts and as prompt/chosen/rejected records, read
through the prefs stage's readers."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, chat_data, finetune_project, make_parent, metrics, set_params  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.dist, pytest.mark.timeout(1200)]

TRAIN = {"train_steps": 4, "log_interval": 2, "eval_interval": 2, "checkpoint_interval": 2, "eval_batches": 2,
         "dtype": "fp32", "optim": {"lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1}}
CHAIN = ["sft_data", "sft", "prefs", "dpo"]


def project(tmp: Path, seq_len: int = 128, **sections) -> Path:
    return finetune_project(tmp, seq_len, sft={**TRAIN, "micro_batch_size": 2}, dpo={**TRAIN, "micro_batch_size": 4},
                            **sections)


def repro(root: Path, env: dict) -> list[str]:
    res = subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", "-s", *CHAIN], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root), **env}, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [s for s in CHAIN if f"Running stage '{s}'" in res.stdout]


def test_dvc_repro_trains_dpo_then_a_dpo_param_reruns_dpo_only(tmp_path):
    import mlflow

    root = project(tmp_path / "p")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert repro(root, env) == CHAIN

    m = metrics(root, "dpo")
    # before training the policy is its reference: every implicit reward is 0 and the loss log 2
    assert abs(m["base_val_loss"] - math.log(2)) <= 1e-5
    assert math.isfinite(m["val_loss"]) and 0.0 <= m["val_accuracy"] <= 1.0 and m["valid_pairs"] > 0
    for key in ("val_margin", "val_rewards_chosen", "val_rewards_rejected"):
        assert math.isfinite(m[key]), key
    assert abs(m["val_margin"] - (m["val_rewards_chosen"] - m["val_rewards_rejected"])) <= 1e-6
    assert m["steps"] == TRAIN["train_steps"] and m["train_pairs"] == metrics(root, "prefs")["train"]
    assert (root / "reports" / "dpo" / "curve.csv").read_text().startswith(
        "step,loss,accuracy,margin,rewards_chosen,rewards_rejected,val_loss,val_accuracy,")
    config = json.loads((root / "models" / "dpo" / "config.json").read_text())
    assert config["kind"] == "dpo" and config["parent"] == "models/sft"
    assert config["dpo"] == {"loss": "sigmoid", "beta": 0.5, "label_smoothing": 0.0, "simpo_gamma": 0.5}
    assert config["model"] == json.loads((root / "models" / "sft" / "config.json").read_text())["model"]

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("palm-rlhf").experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("palm.ops.stage") == "dpo"]
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    md5 = {d["path"]: d["md5"] for d in lock["dpo"]["deps"]}
    for dep in ("data/prefs", "models/sft"):
        assert run.data.tags[f"dvc.dep.{dep}.md5"] == md5[dep], dep

    assert repro(root, env) == []
    set_params(root, dpo={"loss": "simpo", "beta": 2.0})
    assert repro(root, env) == ["dpo"]
    simpo = metrics(root, "dpo")
    assert simpo["loss_type"] == "simpo" and math.isfinite(simpo["val_loss"])
    assert json.loads((root / "models" / "dpo" / "config.json").read_text())["dpo"]["loss"] == "simpo"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dpo")
    data = chat_data(root)
    data["parent"] = make_parent(root / "parent", data["tokenizer"])
    return data


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_resumes_exactly_after_sigkill(tmp_path, inputs, loss):
    """Killed right after its first checkpoint, the rerun ends like a run never interrupted: the
    same losses, held-out accuracy and weights (the reference's log-probs recomputed, not saved)."""
    from safetensors.torch import load_file

    from palm.train.dpo import DPOConfig, launch
    from palm.train.engine import OptimConfig
    from palm.train.loop import KILL_ENV, export

    cfg = DPOConfig(train_steps=4, micro_batch_size=4, dtype="fp32", log_interval=2, eval_interval=2, eval_batches=2,
                    checkpoint_interval=2, loss=loss, optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1))

    def run(name: str, env: dict | None = None) -> dict:
        tmp = tmp_path / name
        return launch(MODEL, cfg, data=inputs["prefs"], parent=inputs["parent"], tokenizer_sha256=inputs["sha"],
                      checkpoints=tmp / "ckpt", reports=tmp / "reports", run_dir=tmp / "run", peak_flops=1e11,
                      env=env)

    straight = run("a")
    with pytest.raises(RuntimeError):  # the worker SIGKILLs itself right after checkpoint 2
        run("b", env={KILL_ENV: "2"})
    resumed = run("b")
    assert resumed["resumed_from_step"] == 2 and straight["resumed_from_step"] == 0
    for key in ("final_train_loss", "val_loss", "val_accuracy", "val_margin"):
        assert abs(resumed[key] - straight[key]) <= 1e-6, key
    curves = [[{k: v for k, v in row.items() if k not in ("tokens_per_s", "mfu")}  # timings differ, not values
               for row in csv.DictReader((tmp_path / n / "reports" / "curve.csv").open())] for n in "ab"]
    assert curves[0] == curves[1] and len(curves[0]) == 2
    for name, result in (("a", straight), ("b", resumed)):
        export(Path(result["checkpoint"]), tmp_path / name / "model", {})
    wa, wb = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in "ab")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


# --- real human preferences in the public formats --------------------------------------------------

def human_pairs(shared_data: Path) -> list:
    """The OASST trees' ranked sibling replies (people's rankings), as the prefs readers see them."""
    from palm.data.chat_readers import read_examples

    trees = shared_data / "oasst" / "en_100_tree.jsonl"
    return list(read_examples(str(trees), "oasst", "prefs", Counter()))


def transcript(prompt, reply: str) -> str:
    """A conversation in hh-rlhf's transcript form: ``\\n\\nHuman: …\\n\\nAssistant: …`` turns."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[t.role]}: {t.text}" for t in prompt if t.role in names) + f"\n\nAssistant: {reply}"


@pytest.mark.parametrize("fmt", ["hh", "pairs"])
def test_dpo_trains_on_human_preferences_in_public_formats(tmp_path, shared_data, fmt):
    pairs = [p for p in human_pairs(shared_data) if all(t.role in ("user", "assistant") for t in p.prompt)]
    assert len(pairs) > 500
    root = project(tmp_path / "p", seq_len=512)
    if fmt == "hh":  # Anthropic's layout: chosen/rejected transcripts, gzipped JSON lines
        source = root / "human" / "hh.jsonl.gz"
        source.parent.mkdir()
        with gzip.open(source, "wt", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps({"chosen": transcript(p.prompt, p.chosen),
                                    "rejected": transcript(p.prompt, p.rejected)}) + "\n")
    else:  # prompt/chosen/rejected strings (single-turn prompts: the last user turn)
        source = root / "human" / "pairs.jsonl"
        source.parent.mkdir()
        source.write_text("".join(json.dumps({"prompt": p.prompt[-1].text, "chosen": p.chosen,
                                              "rejected": p.rejected}) + "\n" for p in pairs))
    set_params(root, prefs={"path": str(source.relative_to(root)), "format": "auto", "valid_fraction": 0.1,
                            "gold_fraction": 0.0}, dpo={"train_steps": 6})
    sft = make_parent(root / "models" / "sft", root / "artifacts" / "tokenizer",
                      type(MODEL)(**{**MODEL.__dict__, "seq_len": 512}), seed=12)
    config = json.loads((sft / "config.json").read_text())
    (sft / "config.json").write_text(json.dumps({**config, "kind": "sft"}))
    env = {**os.environ, "PYTHONPATH": str(root)}
    for stage, args in (("prefs", ["--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--out", "data/prefs"]),
                        ("dpo", ["--data", "data/prefs", "--parent", "models/sft", "--checkpoints", "checkpoints/dpo",
                                 "--out", "models/dpo"])):
        res = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args, "--no-mlflow"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    pr, m = metrics(root, "prefs"), metrics(root, "dpo")
    print(f"{fmt}: {pr['read']} records -> {pr['kept']} pairs ({pr['train']} train, {pr['valid']} held out); "
          f"dpo val_accuracy {m['val_accuracy']:.3f}, val_loss {m['val_loss']:.4f} (start {m['base_val_loss']:.4f})")
    # the tiny tokenizer spends many tokens per word: pairs longer than the context are dropped, counted
    dropped = sum(v for k, v in pr.items() if k.startswith("dropped_"))
    assert pr["read"] == len(pairs) == pr["kept"] + dropped and pr["kept"] > 200 and pr["dropped_too_long"] < 450
    assert m["train_pairs"] == pr["train"] and m["valid_pairs"] > 0 and math.isfinite(m["val_loss"])
    assert abs(m["base_val_loss"] - math.log(2)) <= 1e-5
    assert json.loads((root / "models" / "dpo" / "config.json").read_text())["kind"] == "dpo"


def test_dpo_with_lora_trains_the_adapters_alone_against_the_base(tmp_path, inputs):
    """With ``lora`` the reference is the policy with its adapters off (the start's loss is log 2:
    policy and reference agree), only the adapters train, and the export merges them: the merged
    weights differ from the parent's in the adapted linears alone."""
    from safetensors.torch import load_file

    from palm.model.lora import LoRAConfig
    from palm.train.dpo import DPOConfig, launch
    from palm.train.engine import OptimConfig
    from palm.train.loop import export

    cfg = DPOConfig(train_steps=2, micro_batch_size=4, dtype="fp32", log_interval=1, eval_interval=2, eval_batches=2,
                    checkpoint_interval=2, lora=LoRAConfig(rank=4, targets=("q", "down")),
                    optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0))
    result = launch(MODEL, cfg, data=inputs["prefs"], parent=inputs["parent"], tokenizer_sha256=inputs["sha"],
                    checkpoints=tmp_path / "ckpt", reports=tmp_path / "reports", run_dir=tmp_path / "run",
                    peak_flops=1e11)
    assert abs(result["base_val_loss"] - math.log(2)) <= 1e-5 and math.isfinite(result["val_loss"])
    export(Path(result["checkpoint"]), tmp_path / "model", {})
    merged = load_file(str(tmp_path / "model" / "model.safetensors"))
    parent = load_file(str(inputs["parent"] / "model.safetensors"))
    assert set(merged) == set(parent)  # an ordinary export: no adapter tensors left
    changed = {k for k in parent if not torch.equal(merged[k], parent[k])}
    assert changed and all(k.endswith(("attn.q.weight", "mlp.down.weight")) for k in changed), changed
