"""``palm ui``: the MLflow UI over the project's tracking store (``make ui``).

    palm ui                 # http://127.0.0.1:5000: prints the link to the project's runs, then serves
    palm ui --port 5050     # another port (make ui MLFLOW_PORT=5050)

Run in the project folder. The store is the one the stages log to: ``MLFLOW_TRACKING_URI``, default
the project's ``mlflow.db`` (palm.ops.tracking.tracking_uri). The printed link
(palm.ops.tracking.ui_url) opens the experiment on its runs, not on MLflow 3's GenAI overview. Then
this process becomes ``mlflow server`` (bound to 127.0.0.1 unless ``--host`` says otherwise) with
one worker (one person's browser needs no more, and each worker is a whole MLflow process) and
without MLflow's job runner (:data:`SERVER_ENV`). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# MLflow's job runner (a process and seven huey consumers) runs GenAI jobs such as trace scoring,
# which this project has none of, and makes every answer of the server cost far more CPU
# (numbers: benchmarks/records/code-notes-2026-12-06.md#ui-server-env).
# Off unless the environment turns it on.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port of the UI (default: 5000)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")


def command(host: str, port: int, workers: int) -> list[str]:
    """The ``mlflow server`` command line; the store comes in its environment (:func:`server_env`)."""
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers)]


def server_env(uri: str) -> dict[str, str]:
    """The environment that has ``mlflow server`` serve the store ``uri``: in the environment, not
    on the command line, where every local user's ``ps`` would show a password in it."""
    return {**SERVER_ENV, **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}


def run(args: argparse.Namespace) -> int:
    from palm.core.errors import UserError
    from palm.ops.tracking import redact, tracking_uri, ui_url

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port: expected 1..65535, got {args.port}")
    if args.workers < 1:
        raise UserError(f"--workers: expected >= 1, got {args.workers}")
    root = Path.cwd()
    uri = tracking_uri(root)
    # the store's URI is printed without its user and password (palm.ops.tracking.redact), also
    # where the store cannot be opened (MLflow's error names the URL it requested)
    try:
        link = ui_url(root, f"http://{args.host}:{args.port}")
    except Exception as err:  # noqa: BLE001 - any failure to open the store: one line, no credentials
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(redact(f"cannot open the MLflow store {uri} ({type(err).__name__}: {msg})")) from None
    print(f"MLflow UI: {link}  (store {redact(uri)})", flush=True)
    argv = command(args.host, args.port, args.workers)
    # the server process itself: Ctrl-C and signals reach it as they would
    os.execve(argv[0], argv, server_env(uri))
    return 0  # not reached
