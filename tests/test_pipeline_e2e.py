"""The pipeline end to end, on the embedded default (pydoc), for real: the Prefect flow (one task
per DVC stage) on a Prefect server started for this module, DVC caching, MLflow runs on SQLite,
the token shards read back through megatron-core, the chat data, SFT and the reward model.

The data stages run with the default params; the training stages with fewer steps (:data:`SHORT`),
so that `make test` stays within its time budget on 2 cores. What the full default reaches (the
acceptance numbers) is checked by `tests/test_default_pipeline.py` (`make check-default`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import commit, make_project, prefect_server

pytestmark = pytest.mark.e2e
STAGES = ["scrape", "tokenizer", "tokenize", "pretrain", "sft_data", "prefs", "sft", "reward", "gold_reward", "ppo", "dpo",
          "evaluate"]
# The training stages' overrides for this short run: fewer steps, one evaluation and checkpoint.
SHORT = {
    "pretrain": {"train_steps": 80, "eval_interval": 80, "checkpoint_interval": 40},
    "sft": {"train_steps": 30, "eval_interval": 30, "checkpoint_interval": 30},
    "reward": {"train_steps": 60, "eval_interval": 60, "checkpoint_interval": 60, "stats_pairs": 256},
    "gold_reward": {"train_steps": 20, "eval_interval": 20, "checkpoint_interval": 20, "stats_pairs": 256},
    "ppo": {"train_steps": 3, "checkpoint_interval": 3, "prompts_per_rollout": 8, "max_new_tokens": 32,
            "sample_interval": 3},
    "dpo": {"train_steps": 20, "eval_interval": 20, "checkpoint_interval": 20},
    "evaluate": {"prompts": 16, "max_new_tokens": 32, "pairs": 64, "windows": 4, "replies": 16, "samples": 4,
                 "min_prompts": 8, "kl_limit": 50.0},  # tiny models: a verdict from 16 prompts, any KL (the registry test)
}
# What these few steps reach, with a margin. Measured (fp32, 2 cores, two runs): pretrain 6.41 vs
# unigram 6.68 and 6.12 vs 6.56 nats per token after 80 steps; sft 6.54 vs its parent's 7.40 and
# 6.51 vs 7.33. The reward model, from a fresh head, on the 261 held-out pairs: the fresh head's
# accuracy is luck, whatever direction its seeded init happens to point in over the SFT features
# (seen 0.39, 0.42, 0.47, 0.51, 0.55, 0.69 on different crawls), so a fixed gain over it fails
# on a lucky head (one did: 0.69 -> 0.77 after training, short of +0.1), while its held-out
# pairwise loss is log 2 (0.694: its scores are near 0). After 60 steps, on six projects: accuracy
# 0.68-0.77; held-out loss 0.60 and 0.58 on the two that recorded it. So the check is what the
# claim means: the held-out loss below the fresh head's, and the held-out accuracy above chance by
# REWARD_SIGMAS binomial standard errors (0.5 + 3 x 0.031 = 0.593 with 261 pairs, which a model
# ranking at chance passes with probability 0.001).
PRETRAIN_MARGIN = 0.15  # nats per token below the unigram loss
REWARD_SIGMAS = 3.0  # held-out accuracy above 0.5 by this many binomial standard errors


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project with its default params except the training stages' :data:`SHORT` steps."""
    root = make_project(tmp_path_factory.mktemp("project"), git=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for stage, override in SHORT.items():
        params[stage].update(override)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(root)
    return root


@pytest.fixture(scope="module")
def flow_runs(project, tmp_path_factory):
    """Run the Prefect flow twice against a real Prefect server, started for this module."""
    from pipelines.flow import pipeline

    with prefect_server(tmp_path_factory.mktemp("prefect")):
        first = pipeline(root=str(project))
        second = pipeline(root=str(project))
    return first, second


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(project / ".venv" / "bin" / "dvc"), *args], cwd=project, capture_output=True,
                          text=True, timeout=900)


def test_flow_runs_stages_then_reuses_cache(flow_runs):
    first, second = flow_runs
    assert first == {s: True for s in STAGES}
    assert second == {s: False for s in STAGES}  # the second flow run executes no stage


def test_without_dvc_lock_every_stage_comes_from_the_run_cache(project, flow_runs, tmp_path):
    """After the pipeline ran, `make run` (dvc repro) with dvc.lock deleted runs no stage: DVC's run
    cache (.dvc/cache/runs) holds each one, keyed by its command, deps and params. In a copy, so
    that a stage that does run leaves this module's project as it was. (A stage with an output
    marked ``cache: false`` that is neither a metric nor a plot is never saved to the run cache.)"""
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    (copy / "dvc.lock").unlink()
    env = {k: v for k, v in os.environ.items() if k != "PALM_MLFLOW_PARENT_RUN_ID"}  # a stage that runs
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{copy / 'mlflow.db'}"  # logs into the copy's store
    out = subprocess.run([str(copy / ".venv" / "bin" / "dvc"), "repro"], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = [s for s in STAGES if f"Running stage '{s}'" in out.stdout]
    restored = [s for s in STAGES if f"Stage '{s}' is cached - skipping run" in out.stdout]
    assert ran == [] and restored == STAGES, f"ran {ran}, restored {restored}\n{out.stdout[-3000:]}"
    assert yaml.safe_load((copy / "dvc.lock").read_text()) == yaml.safe_load((project / "dvc.lock").read_text())


def test_default_corpus_and_shards(project, flow_runs):
    import pyarrow.parquet as pq
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from palm.core.tokenizer import load_tokenizer, special_ids
    from palm.data.corpus import read_corpus
    from palm.data.tokenize import TokenizeConfig, choose_valid

    corpus = project / "data" / "corpus"
    table = pq.read_table(sorted(corpus.glob("part-*.parquet")))
    assert table.num_rows >= 250
    assert set(table.column_names) == {"url", "title", "text", "sha1", "fetched_at", "source"}
    assert len(set(table.column("sha1").to_pylist())) == table.num_rows
    urls = table.column("url").to_pylist()
    assert not any("/test." in u or "antigravity" in u or "idlelib" in u for u in urls)

    tok = load_tokenizer(project / "artifacts" / "tokenizer" / "tokenizer.json")
    eod = special_ids(tok)["eod_id"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    cfg = TokenizeConfig(**params["tokenize"])
    sha1s, texts = [], []
    for b in read_corpus(corpus, ["sha1", "text"]):
        sha1s += b.column("sha1").to_pylist()
        texts += b.column("text").to_pylist()
    valid = choose_valid(sha1s, cfg)
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    total = 0
    for name in ("train", "valid"):
        ds = IndexedDataset(str(project / "data" / "tokens" / name))
        expect = [e.ids + [eod] for s, e in zip(sha1s, encoded) if (s in valid) == (name == "valid")]
        assert len(ds) == len(expect)
        for i, ids in enumerate(expect):
            assert np.array_equal(ds[i], ids)
        total += sum(map(len, expect))
    assert total >= 1_000_000


def test_mlflow_runs_carry_params_metrics_commit_and_dvc_hashes(project, flow_runs):
    import mlflow

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("palm-rlhf")
    runs = client.search_runs([exp.experiment_id])
    pipelines = [r for r in runs if r.data.tags.get("palm.ops.stage") == "pipeline"]
    assert len(pipelines) == 2
    for stage in STAGES:
        stage_runs = [r for r in runs if r.data.tags.get("palm.ops.stage") == stage]
        assert len(stage_runs) == 1, stage  # ran once; the second flow run executed nothing
        run = stage_runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in pipelines}
        assert len(run.data.tags["git_commit"]) >= 40
        assert run.data.params and run.data.metrics
        for kind in ("deps", "outs"):
            for entry in lock[stage][kind]:
                if entry["path"].startswith(("data", "artifacts", "models")):
                    tag = f"dvc.{kind[:-1]}.{entry['path']}.md5"
                    assert run.data.tags.get(tag) == entry["md5"], (stage, tag)
    assert client.search_runs([exp.experiment_id], "tags.`palm.ops.stage` = 'tokenize'")[0].data.metrics["tokens"] >= 1e6


def test_short_pretrain_beats_unigram(project, flow_runs):
    import json

    m = json.loads((project / "reports" / "pretrain" / "metrics.json").read_text())
    print(f"short pretrain ({m['steps']} steps): val_loss {m['val_loss']:.3f} vs unigram {m['unigram_loss']:.3f}, "
          f"{m['tokens_per_s']:.0f} tokens/s in {m['dtype']}, stage {m['stage_seconds']:.0f} s")
    assert m["steps"] == SHORT["pretrain"]["train_steps"]
    assert m["val_loss"] < m["unigram_loss"] - PRETRAIN_MARGIN
    # dtype: auto chose by probing: bf16 exactly where the CPU has native bf16 matmul
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert m["dtype"] == ("bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"), m["dtype"]
    assert (project / "models" / "pretrain" / "model.safetensors").is_file()
    curve = (project / "reports" / "pretrain" / "curve.csv").read_text().splitlines()
    assert curve[0].split(",")[:2] == ["step", "loss"] and len(curve) > 2


def test_default_chat_data(project, flow_runs):
    import json

    from palm.core.tokenizer import sha256_file
    from palm.data.chat import load_prefs, load_sft

    sha = sha256_file(project / "artifacts" / "tokenizer" / "tokenizer.json")
    seq_len = yaml.safe_load((project / "params.yaml").read_text())["model"]["seq_len"]
    longest = {"sft_data": lambda r: len(r["input_ids"]),
               "prefs": lambda r: len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))}
    for stage, folder, load in (("sft_data", "sft", load_sft), ("prefs", "prefs", load_prefs)):
        m = json.loads((project / "reports" / stage / "metrics.json").read_text())
        print(f"default {stage}: read {m['read']}, kept {m['kept']} ({m['train']} train, {m['valid']} valid)")
        assert m["kept"] >= 500 and m["valid"] > 0 and m["dropped_too_long"] == 0
        for split in ("train", "valid"):
            rows = load(project / "data" / folder, split, sha).to_pylist()
            assert len(rows) == m[split]
            assert max(map(longest[stage], rows)) <= seq_len


def test_short_sft_beats_its_parent_and_the_reward_model_ranks_held_out_pairs(project, flow_runs):
    import json

    sft = json.loads((project / "reports" / "sft" / "metrics.json").read_text())
    reward = json.loads((project / "reports" / "reward" / "metrics.json").read_text())
    print(f"short sft: val_loss {sft['val_loss']:.3f} vs pretrained {sft['base_val_loss']:.3f} "
          f"({sft['stage_seconds']:.0f} s); reward: val_accuracy {reward['val_accuracy']:.3f}, "
          f"(fresh head {reward['base_val_accuracy']:.3f}), val_loss {reward['val_loss']:.3f} (fresh head "
          f"{reward['base_val_loss']:.3f}), val_margin {reward['val_margin']:.3f} ({reward['stage_seconds']:.0f} s)")
    assert sft["val_loss"] < sft["base_val_loss"]
    assert reward["val_loss"] < reward["base_val_loss"]
    assert reward["val_accuracy"] > 0.5 + REWARD_SIGMAS * (0.25 / reward["valid_pairs"]) ** 0.5
    config = json.loads((project / "models" / "reward" / "config.json").read_text())
    assert config["kind"] == "reward" and config["reward"]["std"] > 0
    for name in ("sft", "reward"):
        assert (project / "models" / name / "tokenizer.json").is_file()


def test_a_dvc_remote_carries_the_pipeline_to_another_clone(project, flow_runs, tmp_path):
    """A local folder as the DVC remote (an S3 bucket works the same: docs/multi-node.md): push from this
    project, then a fresh git clone pulls and `dvc repro` has nothing to run."""
    remote = tmp_path / "dvc-remote"
    added = dvc(project, "remote", "add", "-d", "shared", str(remote))
    assert added.returncode == 0, added.stderr
    commit(project)  # dvc.lock, the remote's config and the metrics files, as a user commits them
    pushed = dvc(project, "push")
    assert pushed.returncode == 0, pushed.stderr
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    if not (clone / ".venv").exists():
        (clone / ".venv").symlink_to((project / ".venv").resolve())
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr
    out = dvc(clone, "repro")
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout, out.stdout
    for rel in ("models/ppo/model.safetensors", "data/tokens/train.bin"):
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel


def test_repro_noop_then_param_change_reruns_downstream_only(project, flow_runs):
    t0 = time.perf_counter()
    out = dvc(project, "repro")
    noop_s = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout
    print(f"no-op dvc repro: {noop_s:.2f} s")

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 4096
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro", "tokenize")  # up to tokenize: pretrain's rerun is the slow part
    assert out.returncode == 0, out.stderr
    ran = [s for s in STAGES if f"Running stage '{s}'" in out.stdout]
    assert ran == ["tokenizer", "tokenize"], out.stdout
    status = dvc(project, "status", "pretrain")
    assert "changed deps" in status.stdout and "data/tokens" in status.stdout, status.stdout  # next in line


def test_short_ppo_exports_a_policy_and_logs_every_iteration(project, flow_runs):
    m = json.loads((project / "reports" / "ppo" / "metrics.json").read_text())
    curve = (project / "reports" / "ppo" / "curve.csv").read_text().splitlines()
    assert len(curve) == 1 + SHORT["ppo"]["train_steps"] and "reward" in curve[0].split(",")
    config = json.loads((project / "models" / "ppo" / "config.json").read_text())
    assert config["kind"] == "ppo" and (project / "models" / "ppo" / "tokenizer.json").is_file()
    print(f"short ppo: {m['stage_seconds']:.0f} s")


def test_evaluate_reports_ppo_against_sft(project, flow_runs):
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    print(f"evaluate: win_rate {metrics['win_rate']:.3f}, reward sft {metrics['reward_sft']:.3f} -> ppo "
          f"{metrics['reward_ppo']:.3f}, kl {metrics['kl']:.3f} ({metrics['stage_seconds']:.0f} s)")
    assert {"win_rate", "reward_sft", "reward_ppo", "kl"} <= set(metrics)
    page = (project / "reports" / "evaluate" / "report.html").read_text()
    # rewards + pretrain, sft, reward, gold_reward, ppo, dpo curves + the over-optimisation plot
    assert page.count("data:image/png;base64,") == 8
    assert {"win_rate_dpo", "gold_win_rate_dpo", "dpo_pref_accuracy", "kl_dpo"} <= set(metrics)  # DPO beside PPO
    assert {"gold_rm_gain", "gold_rm_win_rate", "gold_rm_accuracy"} <= set(metrics)


def test_evaluate_registers_the_models_and_lineage_reaches_the_scrape_run(project, flow_runs):
    """The four models are registered with the runs that made them (their md5s those of dvc.lock),
    and ``palm lineage`` walks from the champion to the scrape run and its corpus md5."""
    import mlflow

    from palm.ops import registry

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    out_md5 = lambda stage, path: next(o["md5"] for o in lock[stage]["outs"] if o["path"] == path)  # noqa: E731
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for stage, name in registry.NAMES.items():
        version = client.get_model_version_by_alias(name, "champion")  # the first versions
        assert client.get_run(version.run_id).data.tags["palm.ops.stage"] == stage
        assert version.tags["dvc.md5"] == out_md5(stage, f"models/{stage}")
    info = registry.lineage("models:/palm-chat@champion", root=project)
    stages = {r["stage"]: run_id for run_id, r in info["runs"].items()}
    assert set(stages) == {"ppo", "sft", "reward", "pretrain", "tokenize", "tokenizer", "scrape", "sft_data", "prefs"}
    assert info["corpus"] == {"path": "data/corpus", "md5": out_md5("scrape", "data/corpus"),
                              "run_id": stages["scrape"]}
