"""The palm-rlhf pipeline as a Prefect flow: one task per DVC stage, in DAG order.

Each task reproduces exactly its stage through DVC (``Repo.reproduce(stage, single_item=True)``),
so the cache is shared with ``dvc repro``: a stage whose code, params and inputs are unchanged is
skipped whichever way the pipeline is started. Prefect adds retries (network-bound stages), logs,
the UI and scheduled deployments (``python -m pipelines.serve``). The flow opens an MLflow run
and the stage runs nest under it. ``until`` runs one stage and everything it depends on.

    python -m pipelines.flow                  # run once (uses PREFECT_API_URL when a server is up)
    python -m pipelines.flow --until reward   # reward and the stages upstream of it
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from palm.errors import UserError
from palm.tracking import PARENT_ENV, Tracker, git_commit
from pipelines import ROOT

# Stages that can reach the network get retries (a flaky site, a rate limit, the Hugging Face
# hub): scrape with source crawl or hf, the chat-data stages with an ``hf:`` path. The rest are
# local: a failure there would fail again.
RETRIES = {"scrape": 2, "sft_data": 2, "prefs": 2}
RETRY_DELAY_S = 10
STOP_GRACE_S = 30.0  # an interrupted stage's processes get this long to end before SIGKILL


def dag(root: Path = ROOT) -> tuple[list[str], dict[str, set[str]]]:
    """The stages of ``dvc.yaml`` in DAG order (as ``dvc dag`` would list them), and for each
    stage the stages upstream of it (those it depends on, directly or not)."""
    from dvc.repo import Repo

    import networkx as nx

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


def plan(root: str, stages: list[str] | None = None, until: str | None = None) -> tuple[Path, list[str]]:
    """The flow's parameters checked against the DAG: ``root`` must be a DVC project folder
    whose pipeline DVC can read, ``stages`` (None or [] for all) names of its stages, ``until``
    (None for all) one stage: it and every stage upstream of it run; not both. Returns the folder
    and the stages to run, in DAG order. Raises UserError otherwise: they go to ``dvc repro`` as
    its working folder and arguments, so nothing unchecked may reach it."""
    folder = Path(root).expanduser().resolve() if isinstance(root, str) and root.strip() else None
    if folder is None or not (folder / "dvc.yaml").is_file():
        raise UserError(f"pipeline root: {root!r} is not a project folder (no dvc.yaml there)")
    try:
        order, upstream = dag(folder)
    except Exception as err:  # noqa: BLE001 - any DVC failure: one line naming the parameter
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"pipeline root: DVC cannot read the pipeline in {folder} ({first})") from None
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
    a training stage keeps its last checkpoint), SIGKILL what is left after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@task
def reproduce(stage: str, root: str) -> bool:
    """Reproduce one DVC stage (``dvc repro --single-item``, in its own process, in the project
    root); True when it ran, False when DVC found it up to date. Its output goes to the task log."""
    logger = get_run_logger()
    # A process group of its own (DVC, the stage, its training workers): if this run is
    # interrupted (Ctrl-C, a cancel from the UI, make stop), the whole group ends with it.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
    if proc.returncode != 0:
        errors = [l for l in lines if l.startswith(("error:", "ERROR"))]
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {errors[-1] if errors else lines[-1:]}")
    ran = any(l.startswith(f"Running stage '{stage}'") for l in lines)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    return ran


@flow(name="palm-rlhf")
def pipeline(root: str = str(ROOT), stages: list[str] | None = None, until: str | None = None) -> dict[str, bool]:
    """Run the pipeline's stages in DAG order: all, the ``stages`` given, or ``until`` one stage
    (it and everything upstream of it)."""
    folder, names = plan(root, stages, until)
    root = str(folder)
    tracker = Tracker(folder, "pipeline")
    tracker.start({"stages": ",".join(names), "until": until or ""}, {"git_commit": git_commit(folder)})
    previous = os.environ.get(PARENT_ENV)
    if tracker.run_id:
        os.environ[PARENT_ENV] = tracker.run_id  # stage runs (DVC subprocesses) nest under this one
    ran: dict[str, bool] = {}
    try:
        for name in names:
            task_ = reproduce.with_options(name=name, retries=RETRIES.get(name, 0),
                                          retry_delay_seconds=RETRY_DELAY_S)
            ran[name] = task_(name, root)
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
    try:
        print(pipeline(until=args.until))
    except UserError as err:
        print(f"error: pipeline: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
