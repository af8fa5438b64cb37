"""The `pretrain` DVC stage end to end on tiny shards: a run SIGKILLed after a checkpoint and
restarted by `dvc repro` ends exactly like an uninterrupted one (acceptance 2), and bad input is
one line on stderr with exit code 2 (acceptance 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import PRETRAIN_ARGS, free_port, make_shards, pretrain_project  # noqa: E402

from palm.train.pretrain import KILL_ENV  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.dist, pytest.mark.timeout(600)]

def repro(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    return subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", "-s", "pretrain"], cwd=root,
                          env=full, capture_output=True, text=True, timeout=500)


def weights(root: Path):
    from safetensors.torch import load_file

    return load_file(str(root / "models" / "pretrain" / "model.safetensors"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """An uninterrupted run of the stage (TINY_PRETRAIN, `dvc repro`), made once for the tests that
    compare with one or rerun one: its project, MLflow environment, and its reports, weights and
    config as the run left them (a test that reruns it in place changes the files, not these)."""
    tmp = tmp_path_factory.mktemp("finished")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    root = pretrain_project(tmp / "a")
    assert repro(root, env).returncode == 0
    reports = root / "reports" / "pretrain"
    return {"root": root, "env": env, "curve": (reports / "curve.csv").read_text(),
            "metrics": json.loads((reports / "metrics.json").read_text()), "weights": weights(root),
            "config": json.loads((root / "models" / "pretrain" / "config.json").read_text())}


def test_killed_run_restarted_by_dvc_repro_ends_like_an_uninterrupted_one(tmp_path, finished):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    killed = pretrain_project(tmp_path / "b")
    first = repro(killed, {**env, KILL_ENV: "8"})  # every rank SIGKILLs itself after checkpoint 8
    assert first.returncode != 0
    assert not (killed / "models" / "pretrain").exists()
    second = repro(killed, env)
    assert second.returncode == 0, second.stderr[-2000:]
    a = finished["metrics"]
    b = json.loads((killed / "reports" / "pretrain" / "metrics.json").read_text())
    assert b["resumed_from_step"] == 8 and a["resumed_from_step"] == 0
    assert abs(a["final_train_loss"] - b["final_train_loss"]) <= 1e-6
    assert abs(a["val_loss"] - b["val_loss"]) <= 1e-6
    wa, wb = finished["weights"], weights(killed)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    for key in ("val_loss", "unigram_loss", "tokens_per_s", "mfu"):
        assert isinstance(a[key], float)
    curve = finished["curve"].splitlines()
    assert curve[0].startswith("step,loss,") and len(curve) == 4
    config = finished["config"]
    assert config["model"]["d_model"] == 32 and len(config["tokenizer_sha256"]) == 64


def test_bad_input_is_one_line_and_exit_2(tmp_path, stage_error):
    root = pretrain_project(tmp_path / "p", pretrain={"tensor_parallel": 3})
    assert "pretrain.tensor_parallel: model.n_heads=2 is not divisible by tensor_parallel=3" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"]["tensor_parallel"] = 1
    params["pretrain"]["pipeline_parallel"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert "model.n_layers=2 is not divisible by pipeline_parallel=4" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)

    params["pretrain"]["pipeline_parallel"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    meta = root / "artifacts" / "tokenizer" / "meta.json"
    good = meta.read_text()
    meta.write_text(json.dumps({**json.loads(good), "sha256": "0" * 64}))
    assert "were made by tokenizer sha256" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)
    meta.write_text(good)

    (root / "data" / "tokens" / "train.bin").unlink()
    assert "train.bin: token shard missing or empty" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)
    make_shards(root / "data" / "tokens", sha=json.loads(good)["sha256"])

    ckpt = root / "checkpoints" / "pretrain"
    (ckpt / "step_0000004").mkdir(parents=True)
    (ckpt / "step_0000004" / "palm.json").write_text("{}")
    (ckpt / "latest").write_text("step_0000004\n")
    assert "corrupt checkpoint" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)


def test_forced_rerun_of_a_finished_run_leaves_the_same_reports(finished):
    """DVC deletes curve.csv and metrics.json before `dvc repro -f`; the rerun resumes the finished
    checkpoint and rebuilds both from it. Only what describes the execution itself may differ:
    stage_seconds (its wall time) and resumed_from_step (it did resume)."""
    root, env = finished["root"], finished["env"]
    reports = root / "reports" / "pretrain"
    curve, metrics = finished["curve"], dict(finished["metrics"])
    assert (reports / "curve.csv").read_text() == curve  # the finished run's, as it left them
    assert json.loads((reports / "metrics.json").read_text()) == metrics
    forced = subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", "-f", "-s", "pretrain"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), **env}, capture_output=True,
                            text=True, timeout=500)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "resumed from" in forced.stderr
    assert (reports / "curve.csv").read_text() == curve
    again = json.loads((reports / "metrics.json").read_text())
    assert again.pop("resumed_from_step") == 12 and metrics.pop("resumed_from_step") == 0
    again.pop("stage_seconds"), metrics.pop("stage_seconds")
    assert again == metrics


def test_sigkill_of_the_stage_process_leaves_no_training_process(tmp_path):
    from palm.train.launch import marked_pids

    # two DP workers: torchrun and its workers all go with the stage process
    root = pretrain_project(tmp_path / "p", pretrain={"train_steps": 100000, "checkpoint_interval": 1000, "data_parallel": 2})
    env = {**os.environ, "PYTHONPATH": str(root)}
    stage = subprocess.Popen([sys.executable, "-m", "stages.pretrain", *PRETRAIN_ARGS, "--no-mlflow"], cwd=root,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = str((root / "checkpoints" / "pretrain" / "run").resolve())
    curve = root / "reports" / "pretrain" / "curve.csv"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (curve.is_file() and len(curve.read_text().splitlines()) > 1):
            time.sleep(0.5)  # until the workers are training (a curve row is written)
        workers = marked_pids(marker)
        assert len(workers) >= 3, "torchrun and its two workers should be running"
    finally:
        stage.kill()
        stage.wait()
    deadline = time.time() + 20
    while marked_pids(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert marked_pids(marker) == []


def test_two_nodes_rendezvousing_over_c10d_train_what_one_node_does(tmp_path):
    """Two launchers on 127.0.0.1 (node 0 under `dvc repro`, node 1 the stage's command through
    `python -m pipelines.node` with PALM_NODE_RANK=1, as the Slurm script runs it; one DP worker
    each) form one world through torchrun's c10d rendezvous and
    end exactly like the one-node DP=2 run; node 1 writes nothing and says so."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    one = pretrain_project(tmp_path / "one", pretrain={"data_parallel": 2})
    assert repro(one, env).returncode == 0
    two = pretrain_project(tmp_path / "two", pretrain={"data_parallel": 2, "nodes": 2,
                                                       "rdzv_endpoint": f"127.0.0.1:{free_port()}"})
    node1 = subprocess.Popen([sys.executable, "-m", "pipelines.node", "pretrain"], cwd=two,
                             env={**os.environ, "PYTHONPATH": str(two), "PALM_NODE_RANK": "1", **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        node0 = repro(two, env)
        _, node1_err = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node0.returncode == 0, node0.stderr[-2000:]
    assert node1.returncode == 0, node1_err[-2000:]
    assert "pretrain: node 1 of 2: its training processes finished" in node1_err
    a = json.loads((one / "reports" / "pretrain" / "metrics.json").read_text())
    b = json.loads((two / "reports" / "pretrain" / "metrics.json").read_text())
    for key in ("final_train_loss", "val_loss"):
        assert abs(a[key] - b[key]) <= 1e-6, key
    wa, wb = weights(one), weights(two)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert (one / "reports" / "pretrain" / "curve.csv").read_text().splitlines()[0] == \
        (two / "reports" / "pretrain" / "curve.csv").read_text().splitlines()[0]


def test_a_multi_node_layout_is_checked_before_anything_starts(tmp_path, monkeypatch, stage_error):
    root = pretrain_project(tmp_path / "p", pretrain={"data_parallel": 2, "nodes": 3})
    assert "pretrain.nodes: the 2 processes (tensor x pipeline x data parallel) cannot be split evenly " \
           "over 3 nodes" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"]["nodes"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert "rdzv_endpoint '': a multi-node launch needs HOST:PORT" in \
        stage_error("pretrain", PRETRAIN_ARGS, root)
    monkeypatch.setenv("PALM_NODE_RANK", "2")
    assert "PALM_NODE_RANK='2': must be a node rank 0..1" in stage_error("pretrain", PRETRAIN_ARGS, root)
