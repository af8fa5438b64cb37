"""Helpers for the local servers the pipelines start and watch (the Prefect server of ``make
serve``, which the flow polls while it runs): is a port free, does ``/health`` answer."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from palm.core.errors import UserError


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url``/health answers 200 within ``timeout_s``."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except OSError:
        return False


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Return once ``url``/health answers; UserError if the server exits first or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"the Prefect server exited (code {server.returncode}) before its API answered: "
                            f"{tail} (whole log: {log})")
        if healthy(url):
            return
        time.sleep(0.5)
    raise UserError(f"the Prefect server's API did not answer at {url} within {timeout_s:g} s "
                    f"(serve.startup_timeout_s); its log: {log}")
