"""Serve the pipeline as a scheduled Prefect deployment, on a local Prefect server (``make serve``).

    python -m pipelines.serve           # server + UI on 127.0.0.1, deployment, runner; Ctrl-C stops all
    python -m pipelines.serve --stop    # from another terminal (make stop): the same shutdown

One process does it all, from the ``serve`` section of ``params.yaml`` (:class:`ServeConfig`):
it starts ``prefect server start`` on ``serve.host``:``serve.port`` with its SQLite database and
settings in ``.prefect/`` under the project (``PREFECT_HOME``; analytics off), waits until the
server's API answers, registers the deployment ``palm-rlhf/<serve.deployment>`` with the cron
schedule ``serve.cron`` in ``serve.timezone``, and serves it: runs the schedule creates, and runs
triggered from the UI or with ``prefect deployment run 'palm-rlhf/<name>'``, execute here, each in
a process of its own. On Ctrl-C, SIGTERM or ``--stop`` the runner stops (the schedule is paused
while nothing serves it) and every process this one started ends, the server's and the runs'
included: this process is their subreaper, so even a run's orphaned grandchildren are found.
``.prefect/serve.json`` records the processes for ``--stop``.

The server answers only whoever holds this serve's password: each ``make serve`` draws a new one
(:func:`new_auth`), writes it to ``.prefect/api-auth`` (readable by the user only) and gives it to
the runner and the runs it starts (``PREFECT_API_AUTH_STRING``); the UI asks for it once (paste the
file's one line). Without it the API answers 401, ``/health`` excepted. Web pages of other
origins get no CORS grant (only the server's own address is allowed) and every state-changing
request needs a CSRF token (:func:`prefect_env`), so a page open in the user's browser can
neither read the API nor act on it. The flow runs only this project's pipeline (its ``root``
parameter is pinned, :func:`pipelines.flow.plan`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

from palm.core.config import check, load_section
from palm.core.errors import ConfigError, UserError
from palm.core.io import write_json
from pipelines import ROOT
from pipelines.servers import port_free, wait_healthy

HOME = ".prefect"  # PREFECT_HOME under the project: the server's SQLite database, logs, the pid file
PID_FILE = "serve.json"
AUTH_FILE = "api-auth"  # under HOME: this serve's API password, "palm:<secret>" (mode 0600, removed at stop)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOP_GRACE_S = 60.0  # how long an orderly shutdown may take before the rest is killed


@dataclass(frozen=True)
class ServeConfig:
    """params.yaml ``serve``: the scheduled deployment ``make serve`` registers. Not a DVC stage
    (no stage lists it in ``dvc.yaml``), so changing it reruns nothing."""

    deployment: str = "nightly"  # deployment name: runs as 'palm-rlhf/<deployment>'
    cron: str = "0 3 * * *"  # when the schedule starts a run (five-field cron)
    timezone: str = "UTC"  # IANA zone the cron is read in, e.g. Europe/Paris
    until: str | None = None  # scheduled runs stop after this stage (and run what it needs); null: every stage
    host: str = "127.0.0.1"  # the Prefect server and UI bind here (loopback unless told otherwise)
    port: int = 4200  # the Prefect server's and UI's port
    startup_timeout_s: float = 120.0  # the server's API must answer within this

    def __post_init__(self) -> None:
        from prefect.schedules import Cron

        check(bool(self.deployment.strip()) and "/" not in self.deployment, "deployment",
              f"expected a name without '/', got {self.deployment!r}")
        try:
            Cron(self.cron)  # Prefect's own check of the schedule it will be given
        except ValueError:
            raise ConfigError("cron", f"{self.cron!r} is not a cron schedule; expected five fields "
                              f"(minute hour day month weekday), e.g. '0 3 * * *'") from None
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError("timezone", f"unknown time zone {self.timezone!r}; expected an IANA name "
                              f"such as UTC or Europe/Paris") from None
        check(self.until is None or bool(self.until.strip()), "until", "expected a stage name or null")
        check(bool(self.host.strip()), "host", "expected a host name or address, e.g. 127.0.0.1")
        check(1 <= self.port <= 65535, "port", f"expected 1..65535, got {self.port}")
        check(self.startup_timeout_s > 0, "startup_timeout_s", f"expected > 0, got {self.startup_timeout_s}")


def api_url(cfg: ServeConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}/api"


def server_command(cfg: ServeConfig) -> list[str]:
    """``prefect server start`` on ``cfg.host``:``cfg.port``, with this interpreter."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host, "--port", str(cfg.port)]


def origins(cfg: ServeConfig) -> list[str]:
    """The server's own origins, the only ones granted CORS: its address, and on loopback the
    other loopback names a browser may use for it (the UI at localhost calling 127.0.0.1's API)."""
    hosts = [cfg.host, *([h for h in LOOPBACK if h != cfg.host] if cfg.host in LOOPBACK else [])]
    return [f"http://{f'[{h}]' if ':' in h else h}:{cfg.port}" for h in hosts]


def prefect_env(root: Path, cfg: ServeConfig, auth: str | None = None) -> dict[str, str]:
    """The settings of the server and of every Prefect client here: its home (and SQLite
    database) under the project, its address, no analytics (Prefect's, nor DVC's in the runs);
    CORS for the server's own origins only (Prefect's default: any), CSRF protection on (default
    off; Prefect's clients fetch their token themselves). ``auth``: the API password (see
    :func:`new_auth`), for the server (``PREFECT_SERVER_API_AUTH_STRING``: without it, 401) and
    its clients (``PREFECT_API_AUTH_STRING``); None: a server open to any local process."""
    env = {"PREFECT_HOME": str(root / HOME), "PREFECT_API_URL": api_url(cfg),
           "PREFECT_SERVER_API_HOST": cfg.host, "PREFECT_SERVER_API_PORT": str(cfg.port),
           "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ",".join(origins(cfg)),
           "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true", "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}
    if auth is not None:
        env.update(PREFECT_SERVER_API_AUTH_STRING=auth, PREFECT_API_AUTH_STRING=auth)
    return env


def new_auth(home: Path) -> str:
    """A new API password for one serve, written to ``home``/:data:`AUTH_FILE` with mode 0600
    (created so: never readable by others, not even for a moment) and returned."""
    auth = f"palm:{secrets.token_urlsafe(32)}"
    home.mkdir(parents=True, exist_ok=True)
    path, tmp = home / AUTH_FILE, home / f".{AUTH_FILE}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth + "\n")
    os.replace(tmp, path)
    return auth


# --- processes ---------------------------------------------------------------------------------

def _record(proc) -> dict:
    return {"pid": proc.pid, "create_time": proc.create_time()}


def _recorded(entry: dict):
    """The process an entry of the pid file names, if it still runs (the same process: a pid
    reused since by another program has another start time)."""
    import psutil

    try:
        proc = psutil.Process(entry["pid"])
        same = abs(proc.create_time() - entry["create_time"]) < 0.01
    except (psutil.Error, KeyError, TypeError):
        return None
    return proc if same and not ended(proc) else None


def ended(proc) -> bool:
    """True once ``proc`` has exited (a zombie its parent has not reaped yet counts as ended)."""
    import psutil

    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_ended(procs, timeout_s: float) -> list:
    """Wait until every one of ``procs`` has ended or ``timeout_s`` passed; those still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if not ended(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def end_processes(procs, grace_s: float = 10.0) -> None:
    """SIGTERM ``procs`` (psutil processes), then SIGKILL those still alive after ``grace_s``."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    for p in wait_ended(procs, grace_s):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait_ended(procs, grace_s)
    psutil.wait_procs(procs, timeout=0)  # reap those that were our children


def _become_subreaper() -> None:
    """Linux: orphaned descendants (a run's DVC and stage processes whose run process died)
    become this process's children instead of init's, so the shutdown still finds them."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


# --- serve and stop ------------------------------------------------------------------------------

def serve(root: Path, cfg: ServeConfig) -> None:
    """Start the server, register and serve the deployment until interrupted, then end every
    process started here."""
    import psutil

    home = root / HOME
    pid_file = home / PID_FILE
    if _recorded(_read_pids(pid_file).get("serve", {})):
        raise UserError(f"already serving this project ({pid_file}); stop it first: make stop")
    if not port_free(cfg.host, cfg.port):
        raise UserError(f"serve.port: {cfg.host}:{cfg.port} is already in use by another program; "
                        f"stop it or choose another serve.port")
    from pipelines.flow import pipeline, plan, stages_in_order

    if cfg.until is not None and cfg.until not in (order := stages_in_order(root)):
        raise ConfigError("serve.until", f"unknown stage {cfg.until!r}; the DAG has {', '.join(order)}")
    folder, names = plan(str(root), until=cfg.until)
    auth = new_auth(home)
    os.environ.update(prefect_env(root, cfg, auth))  # the runner and the runs it starts inherit it
    import prefect.context

    prefect.context.refresh_global_settings_context()  # Prefect read its settings when imported
    from prefect import serve as prefect_serve
    from prefect.schedules import Cron

    home.mkdir(parents=True, exist_ok=True)
    _become_subreaper()
    me = psutil.Process()
    record = {"serve": _record(me), "ui": f"http://{cfg.host}:{cfg.port}"}
    write_json(pid_file, record)
    previous_term = signal.signal(signal.SIGTERM, _interrupt)  # until the runner installs its own
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (nohup, &)
    log = home / "server.log"
    try:
        with log.open("wb") as out:
            # A session of its own: a Ctrl-C in the terminal reaches this process only, which
            # stops the runner first (it pauses the schedule through the server), then the server.
            server = subprocess.Popen(server_command(cfg), cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        record["server"] = _record(psutil.Process(server.pid))
        write_json(pid_file, record)
        wait_healthy(api_url(cfg), server, log, cfg.startup_timeout_s)
        parameters = {"root": str(folder), **({"until": cfg.until} if cfg.until else {})}
        deployment = pipeline.to_deployment(name=cfg.deployment, schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
                                            parameters=parameters)
        deployment.apply()  # registered before it is announced (the runner applies it again, unchanged)
        password = home / AUTH_FILE
        print(f"Prefect UI: http://{cfg.host}:{cfg.port} (log in with the line in {password}, new for each serve; "
              f"server log {log})\n"
              f"serving deployment 'palm-rlhf/{cfg.deployment}': cron '{cfg.cron}' ({cfg.timezone}), "
              f"stages {', '.join(names)}\n"
              f"run it now: PREFECT_API_URL={api_url(cfg)} PREFECT_API_AUTH_STRING=\"$(cat {password})\" "
              f".venv/bin/prefect deployment run 'palm-rlhf/{cfg.deployment}'\n"
              f"stop: Ctrl-C here, or make stop", flush=True)
        prefect_serve(deployment, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        end_processes(me.children(recursive=True))
        pid_file.unlink(missing_ok=True)
        (home / AUTH_FILE).unlink(missing_ok=True)
        print("stopped: the Prefect server and every run process", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _read_pids(path: Path) -> dict:
    """The pid file's record; {} when there is none (or a half-written one)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def stop(root: Path) -> str:
    """End a ``serve`` of this project: interrupt it as Ctrl-C would (an orderly shutdown), then
    end whatever it started that is still alive after :data:`STOP_GRACE_S`, the server included
    if ``serve`` itself was killed. Returns what it did, in words."""
    import psutil

    pid_file = root / HOME / PID_FILE
    if not pid_file.is_file():
        return "nothing to stop: no make serve is running for this project"
    record = _read_pids(pid_file)
    serve_proc, server = _recorded(record.get("serve", {})), _recorded(record.get("server", {}))
    procs = []
    for proc in (serve_proc, server):
        if proc is not None:
            try:
                procs += [proc, *proc.children(recursive=True)]  # taken now: orphans later are still known
            except psutil.NoSuchProcess:
                pass
    if serve_proc is not None:
        serve_proc.send_signal(signal.SIGINT)
        wait_ended([serve_proc], STOP_GRACE_S)
    end_processes(procs)
    pid_file.unlink(missing_ok=True)
    alive = [p for p in procs if not ended(p)]
    if alive:
        raise UserError(f"could not end processes {[p.pid for p in alive]}; end them by hand (kill -9)")
    return f"stopped make serve (ui {record.get('ui', '?')}): {len(set(p.pid for p in procs))} processes ended"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (section serve)")
    parser.add_argument("--stop", action="store_true", help="stop the make serve running for this project")
    args = parser.parse_args(argv)
    try:
        if args.stop:
            print(stop(ROOT))
        else:
            serve(ROOT, load_section(ServeConfig, args.params, "serve"))
    except UserError as err:
        print(f"error: serve: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
