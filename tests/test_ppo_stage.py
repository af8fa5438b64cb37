"""The `ppo` DVC stage on a tiny project (the pydoc-like test corpus's chat data, a tiny tokenizer,
tiny random exports in models/sft and models/reward): `dvc repro` of the stage writes the exported
policy, the metrics, the curve and the samples, and an MLflow run with the samples as an artifact;
bad input, as a new user would try it, is one line with exit code 2 and writes nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, make_reward, policy_project, run_stage_cli, set_params  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.dist, pytest.mark.timeout(900)]

PPO = {"train_steps": 2, "micro_batch_size": 4, "prompts_per_rollout": 4, "max_new_tokens": 8, "dtype": "fp32",
       "checkpoint_interval": 2, "sample_interval": 1, "samples_logged": 2}
ARGS = ["--data", "data/sft", "--policy", "models/sft", "--reward", "models/reward", "--checkpoints", "checkpoints/ppo",
        "--out", "models/ppo"]


def project(tmp: Path) -> Path:
    root = policy_project(tmp)
    make_reward(root / "models" / "reward", root / "artifacts" / "tokenizer", mean=0.5, std=2.0)
    set_params(root, model={"seq_len": MODEL.seq_len}, ppo=PPO)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return project(tmp_path_factory.mktemp("ppo_stage"))


def test_dvc_repro_ppo_exports_the_policy_with_metrics_curve_samples_and_mlflow(root, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", "-s", "ppo"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": uri},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((root / "reports" / "ppo" / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["train_prompts"] > 0 and metrics["actor_steps"] >= 1
    for key in ("reward", "initial_reward", "kl", "response_length", "entropy", "clip_fraction",
                "explained_variance", "stage_seconds"):
        assert isinstance(metrics[key], float), key
    config = json.loads((root / "models" / "ppo" / "config.json").read_text())
    assert config["kind"] == "ppo" and config["parent"] == "models/sft" and config["advantage"] == "gae"
    assert config["model"] == json.loads((root / "models" / "sft" / "config.json").read_text())["model"]
    assert (root / "models" / "ppo" / "tokenizer.json").read_bytes() == \
        (root / "models" / "sft" / "tokenizer.json").read_bytes()
    header = (root / "reports" / "ppo" / "curve.csv").read_text().splitlines()[0]
    assert header.startswith("step,reward,score,kl,kl_coef,response_length,ended,entropy,clip_fraction,")
    samples = [json.loads(line) for line in (root / "reports" / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert all(isinstance(s["response"], str) and s["prompt"].startswith("<|user|>") for s in samples)

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("palm-rlhf").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["palm.ops.stage"] == "ppo"
    assert {"reward", "kl", "entropy", "clip_fraction", "response_length"} <= set(run.data.metrics)
    # one point per iteration (and the stage's final metrics, unstepped)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kl")][:2] == [1, 2]
    assert {"samples.jsonl", "curve.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ppo"]
    assert {d["path"] for d in lock["deps"]} >= {"data/sft", "models/sft", "models/reward", "palm/train/rlhf/__init__.py"}


def error_line(root: Path, argv: list[str]) -> str:
    """stages.ppo's main in this process (fast): exit code 2 and one ``error: ppo:`` line."""
    from stages.ppo import main

    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with redirect_stderr(err):
            code = main(argv + ["--no-mlflow"])
    finally:
        os.chdir(cwd)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error: ppo: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()[-2000:]
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    root = project(tmp_path / "p")
    sys.path.insert(0, str(root))
    try:
        # as a user runs it: a real process, exit code 2, one line
        set_params(root, ppo={"kl_bound": 0.0})
        res = run_stage_cli("ppo", ARGS + ["--no-mlflow"], cwd=root)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert [line for line in res.stderr.splitlines() if line.startswith("error: ")] == \
            ["error: ppo: ppo.kl_bound: must be > 0 (the approx KL at which an update stops), got 0.0"]
        set_params(root, ppo={"kl_bound": -1.0})
        assert "ppo.kl_bound: must be > 0" in error_line(root, ARGS)
        set_params(root, ppo={"kl_bound": 0.05, "max_new_tokens": MODEL.seq_len})
        assert "ppo.max_new_tokens: 128 new tokens leave no room for a prompt in the model's context " \
            "(model.seq_len=128)" in error_line(root, ARGS)
        # every prompt is longer than what the context leaves beside the responses: no prompt set
        set_params(root, ppo={"max_new_tokens": MODEL.seq_len - 4})
        assert "no training prompt to start rollouts from" in error_line(root, ARGS)
        set_params(root, ppo={"max_new_tokens": 8})
        config = root / "models" / "reward" / "config.json"
        good = config.read_text()
        config.write_text(json.dumps({**json.loads(good), "tokenizer_sha256": "0" * 64}))
        line = error_line(root, ARGS)
        assert "the reward model" in line and "000000000000" in line and "same tokenizer" in line
        stats = {k: v for k, v in json.loads(good).items() if k != "reward"}
        config.write_text(json.dumps(stats))
        assert "no reward mean/std: not a reward model export" in error_line(root, ARGS)
        config.write_text(good)
        set_params(root, ppo={"pipeline_parallel": 2})
        assert "ppo.pipeline_parallel: ppo supports tensor_parallel and data_parallel only" in error_line(root, ARGS)
        set_params(root, ppo={"pipeline_parallel": 1})
        line = error_line(root, ARGS[:5] + ["models/none"] + ARGS[6:])
        assert "models/none: parent model not found" in line and "dvc repro reward" in line
    finally:
        sys.path.remove(str(root))
    assert not (root / "models" / "ppo").exists() and not (root / "checkpoints" / "ppo").exists()


def test_the_probe_curve_and_select_best_gold_export_the_best_policy(tmp_path):
    """gold_* columns in the curve at every gold_interval, the start in the metrics, and with
    select: best_gold the export is the probe's best iteration (here iteration 0 if gold never rose)."""
    from safetensors.torch import load_file

    root = project(tmp_path / "p")
    set_params(root, ppo={**PPO, "train_steps": 3, "gold_interval": 1, "gold_probe": 4, "select": "best_gold",
                          "optim": {"lr": 0.01, "min_lr": 0.01, "warmup_steps": 0, "weight_decay": 0.0}})
    res = run_stage_cli("ppo", ARGS + ["--no-mlflow"], cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in csv_rows(root / "reports" / "ppo" / "curve.csv")]
    assert [r["step"] for r in rows] == ["1", "2", "3"] and all(r["gold_score"] != "" for r in rows)
    assert all(r["probe_kl"] != "" and r["proxy_reward"] != "" for r in rows)
    metrics = json.loads((root / "reports" / "ppo" / "metrics.json").read_text())
    assert {"gold_initial", "proxy_initial", "probe_kl_initial", "gold_best", "gold_best_iteration"} <= set(metrics)
    golds = [metrics["gold_initial"]] + [float(r["gold_score"]) for r in rows]
    best = max(range(4), key=lambda i: golds[i])
    assert metrics["gold_best_iteration"] == best and metrics["gold_best"] == pytest.approx(golds[best], abs=1e-5)
    config = json.loads((root / "models" / "ppo" / "config.json").read_text())
    assert config["select"] == "best_gold" and config["iteration"] == best
    exported = load_file(root / "models" / "ppo" / "model.safetensors")
    start = load_file(root / "models" / "sft" / "model.safetensors")
    same = all(torch.equal(exported[k].float(), start[k].float()) for k in start)
    assert same == (best == 0)  # iteration 0 is the SFT policy itself; any later one has moved


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
