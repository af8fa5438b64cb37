"""MLflow tracking for stage executions: one run per execution, never at the cost of outputs.

Policy (tested): MLflow trouble never loses a stage's work. If the tracking server cannot be
reached or a call fails, the tracker prints one warning line, turns itself off, and the stage
goes on and writes its outputs. The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default:
``sqlite:///mlflow.db`` at the project root). When a Prefect flow drives the pipeline it passes
``PALM_MLFLOW_PARENT_RUN_ID`` so stage runs nest under the pipeline run.

Training workers never import MLflow (seconds of every launch; numbers:
benchmarks/records/code-notes-2026-12-06.md#tracking): while they run, :meth:`Tracker.follow` in
the stage process logs each new row of their ``curve.csv`` at its step, and re-logs artifacts such
as PPO's ``samples.jsonl`` when they change, so the MLflow UI follows a training run live.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from palm.core.errors import first_line

EXPERIMENT = "palm-rlhf"
PARENT_ENV = "PALM_MLFLOW_PARENT_RUN_ID"
# MLflow 3's UI opens an experiment on its GenAI traces overview (empty for this project) unless
# it is a "Machine learning" one. The experiment's kind is this tag; the UI of MLflow 3.17 takes it
# from its own "workflow type" (a switch in its sidebar, GenAI by default), which the URL's
# ``workflowType=machine_learning`` sets: :func:`ui_url` gives that link (``make ui`` prints it).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # An unreachable server should fail in seconds, not after minutes of retries: one retry, at
    # once (urllib3 waits only before a second one). Not none: a live server may close an idle
    # keep-alive connection just as a request is sent on it (uvicorn, MLflow's server, closes them
    # after 5 s idle), and that request, reset before it reached the server, then needs a new
    # connection; without the retry a stage took a live server for a dead one and stopped tracking.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per download of a registered model
}.items():
    os.environ.setdefault(_key, _value)


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


# ``scheme://user:password@`` of a URI (user info ends at the netloc's last "@", as urllib reads it)
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#'\"<>]*@")


def redact(text: str) -> str:
    """``text`` with the user and password of every URI in it replaced by ``***``:
    ``postgresql://user:secret@db/mlflow`` → ``postgresql://***@db/mlflow``. Whatever prints or
    logs a tracking URI, or a message that may hold one (MLflow's errors name the URL they
    requested), passes it through this."""
    return _USERINFO.sub(r"\1***@", str(text))


def git_commit(root: Path) -> str:
    """``<sha>`` of HEAD, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def producer(mlflow_client: Any, experiment_id: str, path: str, md5: str) -> str | None:
    """The id of the latest finished run whose output ``path`` has DVC md5 ``md5``."""
    runs = mlflow_client.search_runs([experiment_id], f"tags.`dvc.out.{path}.md5` = '{md5}' and "
                                                     "attributes.status = 'FINISHED'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def ui_url(root: Path, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's link to this project's runs (the experiment is created if it is not yet)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        experiment_id = client.create_experiment(EXPERIMENT, tags=EXPERIMENT_KIND)
    else:
        experiment_id = experiment.experiment_id
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class Tracker:
    """A guarded MLflow run. Every method is a no-op once the tracker is off."""

    def __init__(self, root: Path, stage: str, enabled: bool = True):
        self.root = Path(root)
        self.stage = stage
        self.enabled = enabled
        self.run_id: str | None = None
        self._mlflow: Any = None

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None and one warning line (the tracker then off) if it raises."""
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - any MLflow failure must not stop the stage
            self.enabled = False
            print(f"warning: MLflow {what} failed at {redact(tracking_uri(self.root))} ({type(err).__name__}: "
                  f"{redact(first_line(err))}); "
                  f"the stage goes on and keeps its outputs, but this run is not tracked", file=sys.stderr)
            return None

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        def go() -> None:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri(self.root))
            experiment = mlflow.set_experiment(EXPERIMENT)
            if not EXPERIMENT_KIND.items() <= experiment.tags.items():
                mlflow.set_experiment_tags(EXPERIMENT_KIND)
            run_tags = {"palm.ops.stage": self.stage, **tags}
            parent = os.environ.get(PARENT_ENV)
            if parent:
                run_tags["mlflow.parentRunId"] = parent
            mlflow.start_run(run_name=self.stage, tags=run_tags)
            flat = {k: str(v) for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
            self.run_id = mlflow.active_run().info.run_id

        self.guard("start_run", go)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.guard("log_metrics", lambda: self._mlflow.log_metrics(numeric, step=step))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.guard("set_tags", lambda: self._mlflow.set_tags(tags))

    def log_input(self, path: Path, name: str, digest: str, context: str) -> None:
        """Record a data input (a file or folder) with its DVC md5 as the dataset digest."""

        def go() -> None:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            source = resolve_dataset_source(str(Path(path).resolve()))
            dataset = MetaDataset(source=source, name=name, digest=digest[:36])
            self._mlflow.log_input(dataset, context=context, tags={"dvc.md5": digest})

        self.guard("log_input", go)

    def link_inputs(self, md5s: dict[str, str]) -> dict[str, str]:
        """For each dependency ``path -> DVC md5``, find the finished run whose output it is (its
        tag ``dvc.out.<path>.md5`` equal) and tag this run ``palm.input.<path>.run_id`` with it:
        the links :func:`palm.ops.registry.lineage` follows. Returns ``{path: run_id}`` of those found."""

        def go() -> dict[str, str]:
            client = self._mlflow.MlflowClient()
            experiment = self._mlflow.active_run().info.experiment_id
            found = {p: r for p, m in md5s.items()
                     if (r := producer(client, experiment, p, m)) and r != self.run_id}
            if found:
                self._mlflow.set_tags({f"palm.input.{p}.run_id": r for p, r in found.items()})
            return found

        return self.guard("search_runs", go) or {}

    def log_artifact(self, path: Path) -> None:
        self.guard("log_artifact", lambda: self._mlflow.log_artifact(str(path)))

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """Log the files of ``folder`` under the run's ``artifact_path``."""
        self.guard("log_artifacts", lambda: self._mlflow.log_artifacts(str(folder), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None and self.enabled:
            self.guard("end_run", lambda: self._mlflow.end_run(status=status))

    @contextlib.contextmanager
    def follow(self, curve: Path, artifacts: Sequence[Path] = (), every_s: float = 2.0) -> Iterator[None]:
        """While the body runs (a training launch), log every new complete row of ``curve`` (a
        ``curve.csv`` that the workers append to) as metrics at its ``step``, and log each of
        ``artifacts`` again whenever it changes; a last pass when the body ends. A ``curve`` left
        by an earlier execution is removed first: the workers write it anew (a resumed run
        starts it with the rows its checkpoint kept, which belong to this run's record too).

        A thread does it, through an ``MlflowClient`` on this run's id (MLflow's fluent API keeps
        the active run per thread)."""
        curve = Path(curve)
        if not self.enabled or self.run_id is None:
            yield
            return
        curve.unlink(missing_ok=True)
        client = self._mlflow.MlflowClient()
        done, seen = threading.Event(), {"rows": 0, "artifacts": {}}

        def poll() -> None:
            from mlflow.entities import Metric

            if curve.is_file():
                text = curve.read_text()
                complete = text[:text.rfind("\n") + 1]
                rows = list(csv.DictReader(complete.splitlines()))
                now = int(time.time() * 1000)
                metrics = [Metric(k, float(v), now, int(row["step"])) for row in rows[seen["rows"]:]
                           for k, v in row.items() if k != "step" and v not in ("", None)]
                for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
                    client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
                seen["rows"] = len(rows)
            for path in map(Path, artifacts):
                stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
                if stamp is not None and seen["artifacts"].get(path) != stamp:
                    client.log_artifact(self.run_id, str(path))
                    seen["artifacts"][path] = stamp

        def loop() -> None:
            while not done.wait(every_s) and self.enabled:
                self.guard("log_metrics", poll)

        thread = threading.Thread(target=loop, name="mlflow-follow", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.guard("log_metrics", poll)
