"""A tracking or orchestration server that dies while a stage runs (SIGKILL, as a crash or an
OOM kill would end it), with real servers started here.

MLflow: the stage goes on, keeps its outputs and says so in one warning line (palm/tracking.py).
Prefect: the flow stops within a bounded time with one line naming the server and how to resume;
the stage that was running is ended as Ctrl-C would end it (nothing half-written, no process
left), and ``dvc repro`` then finishes only what was not finished (pipelines/flow.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))

from conftest import free_port, run_stage_cli  # noqa: E402
from test_pretrain_stage import ARGS, project  # noqa: E402

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def server(argv: list[str], url: str, log: Path, timeout_s: float = 300):
    """A server process (a session of its own, so that killing its group ends its workers too),
    up once ``url``/health answers; SIGKILLed with its group at the end if still alive."""
    from pipelines.serve import wait_healthy

    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_healthy(url, proc, log, timeout_s)
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.dist
def test_mlflow_server_killed_while_a_training_stage_runs(tmp_path):
    """The pretrain stage logs to a real ``mlflow server``; once the server holds the run and its
    first curve row (logged live by Tracker.follow while the workers train), the server is
    SIGKILLed. The stage exits 0 with its outputs complete and loadable, one warning line naming
    the URI, and no wait on the dead server: MLflow's requests are not retried
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, where MLflow's default backoff retries for minutes).

    The weights are not compared with a run that had no MLflow trouble: the training workers never
    import MLflow (their results cannot depend on it) and a second run would double the test's
    cost; what is checked is that every output is there, whole and consistent with the curve."""
    import mlflow
    from safetensors.torch import load_file

    from palm.models import read_export

    steps = 16
    root = project(tmp_path / "p", pretrain={"train_steps": steps, "log_interval": 2, "eval_interval": 8,
                                             "checkpoint_interval": 8})
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    done: list[subprocess.CompletedProcess] = []
    with server(argv, uri, tmp_path / "mlflow.log") as proc:
        stage = threading.Thread(target=lambda: done.append(
            run_stage_cli("pretrain", ARGS, cwd=root, env={"MLFLOW_TRACKING_URI": uri}, timeout=400)))
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
