"""A tracking or orchestration server that dies while a stage runs (SIGKILL, as a crash or an
OOM kill would end it), with real servers started here.

MLflow: the stage goes on, keeps its outputs and says so in one warning line (palm/ops/tracking.py).
Prefect: the flow stops within a bounded time with one line naming the server and how to resume;
the stage that was running is ended as Ctrl-C would end it (nothing half-written, no process
left), and ``dvc repro`` then finishes only what was not finished (pipelines/flow.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from helpers import (PRETRAIN_ARGS, command, kill_group, make_project, on_free_ports, pretrain_project, run_stage_cli,
                     server)

pytestmark = pytest.mark.e2e


@pytest.mark.dist
def test_mlflow_server_killed_while_a_training_stage_runs(tmp_path):
    """The pretrain stage logs to a real ``mlflow server``; once the server holds the run and its
    first curve row (logged live by Tracker.follow while the workers train), the server is
    SIGKILLed. The stage exits 0 with its outputs complete and loadable, one warning line naming
    the URI, and no wait on the dead server: MLflow's requests are retried once, at once
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``, no backoff), where MLflow's default backoff retries
    for minutes.

    The weights are not compared with a run that had no MLflow trouble: the training workers never
    import MLflow (their results cannot depend on it) and a second run would double the test's
    cost; what is checked is that every output is there, whole and consistent with the curve."""
    import mlflow
    from safetensors.torch import load_file

    from palm.model.export import read_export

    # enough tiny steps that training outlasts the first row's way to the server (Tracker.follow
    # polls every 2 s; 16 steps were over by then on a loaded CI machine)
    steps = 400
    root = pretrain_project(tmp_path / "p", pretrain={"train_steps": steps, "log_interval": 2, "eval_interval": 200,
                                                      "checkpoint_interval": 200})

    def start(port: int) -> tuple[str, subprocess.Popen]:
        uri = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
                "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1"]
        return uri, stack.enter_context(server(argv, uri, tmp_path / "mlflow.log"))

    done: list[subprocess.CompletedProcess] = []
    with contextlib.ExitStack() as stack:
        uri, proc = on_free_ports(start)
        stage = threading.Thread(target=lambda: done.append(
            run_stage_cli("pretrain", PRETRAIN_ARGS, cwd=root, env={"MLFLOW_TRACKING_URI": uri}, timeout=400)))
        stage.start()
        client = mlflow.MlflowClient(uri)
        deadline = time.monotonic() + 300
        while True:  # until the run has its first curve row
            assert stage.is_alive() and time.monotonic() < deadline, done and done[0].stderr[-3000:]
            experiment = client.get_experiment_by_name("palm-rlhf")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and "loss" in runs[0].data.metrics:
                break
            time.sleep(0.3)
        logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        kill_group(proc)
    assert max(logged) < steps  # killed while the workers were training
    curve = root / "reports" / "pretrain" / "curve.csv"
    trained = None
    while stage.is_alive():  # when the workers write their last row: the stage must end soon after
        if trained is None and curve.is_file() and curve.read_text().count("\n") == 1 + steps // 2:
            trained = time.monotonic()
        time.sleep(0.2)
    stage.join()
    ended = time.monotonic()
    (res,) = done
    assert res.returncode == 0, res.stderr[-3000:]
    assert trained is not None and ended - trained < 60, f"{ended - trained:.0f} s after training ended"
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: MLflow")]
    assert len(warnings) == 1, res.stderr[-3000:]
    assert uri in warnings[0] and "keeps its outputs" in warnings[0] and "not tracked" in warnings[0]

    export = read_export(root / "models" / "pretrain")  # config, tokenizer and its sha256 whole
    weights = load_file(str(export.path / "model.safetensors"))
    assert weights and all(w.isfinite().all() for w in weights.values())
    metrics = json.loads((root / "reports" / "pretrain" / "metrics.json").read_text())
    rows = curve.read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(2, steps + 1, 2)]
    assert metrics["steps"] == steps and float(rows[-1].split(",")[2]) == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_prefect_server_killed_while_a_stage_runs(tmp_path):
    """``python -m pipelines.flow --until scrape`` against a real ``prefect server``, SIGKILLed
    while the scrape stage (a slow crawl of the pydoc site: 16 pages, one a second) runs under DVC.
    The flow stops the stage (no process left, nothing written, DVC sees the stage as not run),
    exits 2 within a bounded time, its last line naming the server and how to resume; the
    ``dvc repro`` it suggests then completes the stage. Without the server check the flow would
    crawl on unrecorded, then retry the dead server for over a minute and end in a traceback."""
    import psutil
    import yaml

    from pipelines.serve import ServeConfig, prefect_env, server_command

    root = make_project(tmp_path / "p")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["scrape"].update(max_pages=16, delay_s=1.0, concurrency=1, tasks=1, workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def start(port: int) -> tuple[dict, subprocess.Popen]:
        cfg = ServeConfig(port=port)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's mlflow.db
        env.update(prefect_env(root, cfg), PYTHONPATH=str(root))
        return env, stack.enter_context(server(server_command(cfg), env["PREFECT_API_URL"], tmp_path / "prefect.log",
                                               env=env))

    with contextlib.ExitStack() as stack:
        env, proc = on_free_ports(start)
        url = env["PREFECT_API_URL"]
        flow = subprocess.Popen([sys.executable, "-m", "pipelines.flow", "--until", "scrape"], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=(tmp_path / "flow.err").open("w"), text=True)
        stack.callback(flow.kill)
        flowing = psutil.Process(flow.pid)
        deadline = time.monotonic() + 300
        while not any("stages.scrape" in command(p) for p in flowing.children(recursive=True)):
            assert flow.poll() is None and time.monotonic() < deadline, (tmp_path / "flow.err").read_text()[-3000:]
            time.sleep(0.2)
        while not list((root / "data").glob(".raw.tmp-*")):  # the stage is writing its output
            assert flow.poll() is None and time.monotonic() < deadline, (tmp_path / "flow.err").read_text()[-3000:]
            time.sleep(0.2)
        started = flowing.children(recursive=True)  # DVC, the stage, the pydoc server, the link parsers
        kill_group(proc)
        killed = time.monotonic()
        out, _ = flow.communicate(timeout=240)
        took = time.monotonic() - killed
    print(f"the flow ended {took:.1f} s after its Prefect server was killed")
    err = (tmp_path / "flow.err").read_text()
    assert flow.returncode == 2, err[-3000:]
    assert took < 120, f"the flow took {took:.0f} s to end after its server was killed"
    last = err.strip().splitlines()[-1]
    assert [line for line in err.splitlines() if line.startswith("error: pipeline:")] == [last]
    assert last.startswith(f"error: pipeline: the Prefect server at {url} went away") and \
        "stage scrape was stopped" in last and "resume with dvc repro" in last, err[-3000:]
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (root / "data" / "raw").exists() and not (root / "data" / "corpus").exists()  # nothing half-written
    dvc = str(root / ".venv" / "bin" / "dvc")
    status = subprocess.run([dvc, "status", "scrape"], cwd=root, env=env, capture_output=True, text=True)
    assert "deleted:            data/corpus" in status.stdout, status.stdout

    params["scrape"]["delay_s"] = 0.0  # the resume need not be slow (a changed param: DVC runs it anyway)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    resumed = subprocess.run([dvc, "repro", "scrape"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "Running stage 'scrape'" in resumed.stdout, resumed.stderr[-3000:]
    assert list((root / "data" / "corpus").glob("part-*.parquet"))
    assert sorted(p.name for p in (root / "data").iterdir()) == [".gitignore", "corpus", "feedback", "raw"]
