"""The palm-rlhf pipeline as a Prefect flow: one task per DVC stage, in DAG order.

Each task reproduces exactly its stage through DVC (``Repo.reproduce(stage, single_item=True)``),
so the cache is shared with ``dvc repro``: a stage whose code, params and inputs are unchanged is
skipped whichever way the pipeline is started. Prefect adds retries (network-bound stages), logs,
the UI and scheduled deployments (``python -m pipelines.serve``). The flow opens an MLflow run
and the stage runs nest under it. ``until`` runs one stage and everything it depends on.

    python -m pipelines.flow                  # run once (uses PREFECT_API_URL when a server is up)
    python -m pipelines.flow --until reward   # reward and the stages upstream of it

A deployment's run (``make serve``) runs only the pipeline of this project, whatever ``root`` its
parameters name, and DVC runs isolated from the project folder's modules (:data:`DVC`).

If the Prefect server goes away while the flow runs (crashed, killed, unreachable), the flow
does not run on unrecorded: it checks the server's ``/health`` every :data:`SERVER_CHECK_S`
seconds, and after :data:`SERVER_MISSES` failed checks in a row it stops the running stage as
Ctrl-C would (the stage writes nothing; a training stage keeps its last checkpoint), starts no
other stage, and ends with one line, ``error: pipeline: the Prefect server at <url> went away
…``, saying how to resume: ``dvc repro``, or the deployment triggered again once the server is
back; DVC's cache holds every stage that finished, so they are not run again. Prefect's client
retries a lost connection twice (2 + 4 s, ``PREFECT_CLIENT_MAX_RETRIES``), not five times (62 s),
so the flow's last calls to the dead server end soon too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Read when Prefect is imported (below, and in ``python -m prefect.engine`` runs from the
# process's environment): a server that went away costs each call 2 + 4 s of retries, not 62 s.
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")

from palm.core.quiet import quiet_known  # noqa: E402

quiet_known()  # before Prefect and MLflow load: the known-benign third-party warnings stay out of the log

from prefect import flow, get_run_logger, task  # noqa: E402

from palm.core.errors import UserError, first_line  # noqa: E402
from palm.ops.tracking import PARENT_ENV, Tracker, git_commit  # noqa: E402
from pipelines import ROOT  # noqa: E402
from pipelines.servers import healthy  # noqa: E402

# Stages that can reach the network get retries (a flaky site, a rate limit, the Hugging Face
# hub): scrape with source crawl or hf, the chat-data stages with an ``hf:`` path. The rest are
# local: a failure there would fail again.
RETRIES = {"scrape": 2, "sft_data": 2, "prefs": 2}
RETRY_DELAY_S = 10
STOP_GRACE_S = 30.0  # an interrupted stage's processes get this long to end before SIGKILL
SERVER_CHECK_S = 3.0  # while the flow runs, its Prefect server's /health is asked this often
SERVER_MISSES = 2  # this many failed checks in a row (each waits up to SERVER_CHECK_S): the server is gone
# ``dvc`` as a stage's process runs it: isolated (-I), so that neither the project folder (its
# working folder, which ``-m`` would put first on sys.path) nor PYTHONPATH can put a module of
# its own in place of DVC's; the stages DVC starts still get the whole environment.
DVC = [sys.executable, "-I", "-m", "dvc"]
RESUME = ("resume with dvc repro (or trigger the deployment again once the server is back): the stages "
          "that finished are in the DVC cache and are not run again")


class ServerGone(UserError):
    """The flow's Prefect server stopped answering while the pipeline ran."""


@dataclass
class ServerWatch:
    """The check on the flow's Prefect server (:func:`watch_server`) and the stage running now,
    which it stops when the server is gone."""

    url: str  # the API's base, e.g. http://127.0.0.1:4200/api
    gone: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stage: str | None = None
    proc: subprocess.Popen | None = None
    finished: list[str] = field(default_factory=list)

    def error(self) -> ServerGone:
        running = (f"stage {self.stage} was stopped as Ctrl-C stops it (it wrote nothing; DVC keeps only "
                   f"complete outputs)" if self.stage else "no stage was running")
        done = f"; finished: {', '.join(self.finished)}" if self.finished else ""
        return ServerGone(f"the Prefect server at {self.url} went away ({SERVER_MISSES} health checks failed); "
                          f"{running}{done}; {RESUME}")


@contextlib.contextmanager
def watch_server(url: str):
    """While the body runs, check the Prefect server at ``url``; once it is gone (see the module
    docstring), stop the running stage and mark the watch gone, so that no other stage starts."""
    watch, stop = ServerWatch(url.rstrip("/")), threading.Event()

    def loop() -> None:
        misses = 0
        while not stop.wait(SERVER_CHECK_S):
            misses = 0 if healthy(watch.url, SERVER_CHECK_S) else misses + 1
            if misses >= SERVER_MISSES:
                watch.gone.set()
                with watch.lock:
                    proc = watch.proc
                if proc is not None:
                    end_group(proc)
                return

    thread = threading.Thread(target=loop, name="prefect-server-watch", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()


def dag(root: Path = ROOT) -> tuple[list[str], dict[str, set[str]]]:
    """The stages of ``dvc.yaml`` in DAG order (as ``dvc dag`` would list them), and for each
    stage the stages upstream of it (those it depends on, directly or not)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # DVC's graph points from a stage to the stages it depends on
        order = [node.name for node in reversed(list(nx.topological_sort(graph)))]
        upstream = {node.name: {n.name for n in nx.descendants(graph, node)} for node in graph}
    declared = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    order = [s for s in order if s in declared]
    return order, {s: upstream[s] & set(order) for s in order}


def stages_in_order(root: Path = ROOT) -> list[str]:
    """Stage names of ``dvc.yaml`` in DAG order."""
    return dag(root)[0]


def plan(root: str, stages: list[str] | None = None, until: str | None = None,
         project: Path | None = ROOT) -> tuple[Path, list[str]]:
    """The flow's parameters checked against the DAG: ``root`` must be ``project`` (default: the
    project this package belongs to; any other folder is refused, whatever it holds, since DVC
    and git would run its code; None: any folder, for Python callers that chose it themselves),
    a DVC project folder whose pipeline DVC can read, ``stages`` (None or [] for all) names of
    its stages, ``until`` (None for all) one stage: it and every stage upstream of it run; not
    both. Returns the folder and the stages to run, in DAG order. Raises UserError otherwise:
    they go to ``dvc repro`` as its working folder and arguments, so nothing unchecked may reach it."""
    folder = Path(root).expanduser().resolve() if isinstance(root, str) and root.strip() else None
    if project is not None and folder != Path(project).resolve():
        raise UserError(f"pipeline root: {root!r} is not this project ({project}); the flow runs only the "
                        f"pipeline of the project it belongs to")
    if folder is None or not (folder / "dvc.yaml").is_file():
        raise UserError(f"pipeline root: {root!r} is not a project folder (no dvc.yaml there)")
    try:
        order, upstream = dag(folder)
    except Exception as err:  # noqa: BLE001 - any DVC failure: one line naming the parameter
        raise UserError(f"pipeline root: DVC cannot read the pipeline in {folder} ({first_line(err)})") from None
    if until is not None:
        if stages:
            raise UserError(f"pipeline until: give either stages or until, not both (stages {stages!r}, until {until!r})")
        if not isinstance(until, str) or until not in order:
            raise UserError(f"pipeline until: unknown stage {until!r}; the DAG has {', '.join(order)}")
        return folder, [s for s in order if s == until or s in upstream[until]]
    if stages is None or (isinstance(stages, (list, tuple)) and not stages):
        return folder, order
    if not isinstance(stages, (list, tuple)) or not all(isinstance(s, str) for s in stages):
        raise UserError(f"pipeline stages: expected a list of stage names, got {stages!r}")
    unknown = [s for s in stages if s not in order]
    if unknown:
        raise UserError(f"pipeline stages: unknown stage {unknown[0]!r}; the DAG has {', '.join(order)}")
    return folder, [s for s in order if s in stages]


def end_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Interrupt ``proc``'s process group as Ctrl-C would (a stage then says it wrote nothing;
    a training stage keeps its last checkpoint), a second time after a third of ``grace_s`` if it
    is still running (Python drops a Ctrl-C that lands in a finalizer, "Exception ignored in …
    __del__", as a second Ctrl-C from the keyboard would), and SIGKILL what is left after ``grace_s``."""
    for wait_s in (grace_s / 3, grace_s * 2 / 3):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def reproduce(stage: str, root: str, watch: ServerWatch) -> bool:
    """Reproduce one DVC stage (``dvc repro --single-item``, in its own process, in the project
    root); True when it ran, False when DVC found it up to date. Its output goes to the task log.
    ``watch``: the check on the flow's server, which may stop the stage (:func:`watch_server`).
    Called in a Prefect task run (:func:`stage_task`)."""
    logger = get_run_logger()
    if watch.gone.is_set():
        raise watch.error()
    # A process group of its own (DVC, the stage, its training workers): if this run is
    # interrupted (Ctrl-C, a cancel from the UI, make stop), the whole group ends with it.
    proc = subprocess.Popen([*DVC, "repro", "--single-item", stage], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with watch.lock:
        watch.stage, watch.proc = stage, proc
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            logger.info("%s", line.rstrip())
        proc.wait()
    except BaseException:
        end_group(proc)
        raise
    finally:
        with watch.lock:
            watch.proc = None
    if proc.returncode != 0:
        if watch.gone.is_set():
            raise watch.error()  # stopped by the watch (a stage that finished meanwhile counts as finished)
        errors = [l for l in lines if l.startswith(("error:", "ERROR"))]
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {errors[-1] if errors else lines[-1:]}")
    ran = any(l.startswith(f"Running stage '{stage}'") for l in lines)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    watch.finished.append(stage)
    watch.stage = None
    return ran


def stage_task(stage: str, watch: ServerWatch):
    """The Prefect task of one stage (named after it): :func:`reproduce` with the stage's retries,
    none once ``watch`` finds the server gone."""
    def run(root: str) -> bool:
        return reproduce(stage, root, watch)

    def retry_unless_server_gone(task_, task_run, state) -> bool:  # Prefect's retry condition
        return not watch.gone.is_set()

    return task(run, name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=RETRY_DELAY_S,
                retry_condition_fn=retry_unless_server_gone)


@flow(name="palm-rlhf")
def pipeline(root: str = str(ROOT), stages: list[str] | None = None, until: str | None = None) -> dict[str, bool]:
    """Run the pipeline's stages in DAG order: all, the ``stages`` given, or ``until`` one stage
    (it and everything upstream of it). A run of a deployment (what the Prefect API can start,
    with parameters of its own) runs only this project's pipeline: another ``root`` is refused
    before anything runs. Called from Python, the flow runs the project ``root`` names."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    deployed = context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None
    folder, names = plan(root, stages, until, project=ROOT if deployed else None)
    root = str(folder)
    tracker = Tracker(folder, "pipeline")
    tracker.start({"stages": ",".join(names), "until": until or ""}, {"git_commit": git_commit(folder)})
    previous = os.environ.get(PARENT_ENV)
    if tracker.run_id:
        os.environ[PARENT_ENV] = tracker.run_id  # stage runs (DVC subprocesses) nest under this one
    ran: dict[str, bool] = {}
    try:
        with watch_server(str(FlowRunContext.get().client.api_url)) as watch:
            for name in names:
                ran[name] = stage_task(name, watch)(root)
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
    tracker.log_metrics({"stages_run": sum(ran.values()), "stages_cached": len(ran) - sum(ran.values())})
    tracker.end("FINISHED")
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description="Run the pipeline once as a Prefect flow.")
    parser.add_argument("--until", help="run this stage and the stages upstream of it (default: every stage)")
    args = parser.parse_args(argv)
    # Even if started with SIGINT ignored (nohup, `&` in a script): the stages' processes would
    # inherit that, and end_group's Ctrl-C would not reach them (make serve does the same).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(pipeline(until=args.until))
    except Exception as err:  # noqa: BLE001 - the known kinds print one line, the rest a traceback
        known = user_error(err)
        if known is None:
            raise
        print(f"error: pipeline: {known}", file=sys.stderr)
        if isinstance(known, ServerGone):
            # Nothing more can reach the lost server: at exit Prefect's event and log workers would
            # try to send it what they hold, each waiting for it again (tens of seconds).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return 0


def user_error(err: BaseException) -> UserError | None:
    """The UserError to report for ``err``: itself, the ServerGone that Prefect's failing calls to
    the lost server were handling (their exception's context), or a ServerGone for a connection
    to the server lost after the last stage (when the flow's final state is sent)."""
    import httpx

    seen, chain = err, set()
    while seen is not None and id(seen) not in chain:
        if isinstance(seen, UserError):
            return seen
        chain.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, httpx.TransportError):
        from prefect.settings import PREFECT_API_URL

        return ServerGone(f"the Prefect server at {PREFECT_API_URL.value()} went away ({type(err).__name__}: "
                          f"{first_line(err)}); {RESUME}")
    return None


if __name__ == "__main__":
    sys.exit(main())
