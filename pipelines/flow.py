"""The palm-rlhf pipeline as a Prefect flow: one task per DVC stage, in DAG order.

Each task reproduces exactly its stage through DVC (``Repo.reproduce(stage, single_item=True)``),
so the cache is shared with ``dvc repro``: a stage whose code, params and inputs are unchanged is
skipped whichever way the pipeline is started. Prefect adds retries (network-bound stages), logs,
the UI and scheduled deployments (``python -m pipelines.serve``). The flow opens an MLflow run
and the stage runs nest under it.

    python -m pipelines.flow            # run once (uses PREFECT_API_URL when a server is up)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from palm.errors import UserError
from palm.tracking import PARENT_ENV, Tracker, git_commit

ROOT = Path(__file__).resolve().parent.parent

# Stages that reach the network get retries (a flaky site, a rate limit); the rest are local.
RETRIES = {"scrape": 2}


def stages_in_order(root: Path = ROOT) -> list[str]:
    """Stage names of ``dvc.yaml`` in DAG order (as ``dvc dag`` would list them)."""
    from dvc.repo import Repo

    import networkx as nx

    with Repo(str(root)) as repo:
        # DVC's graph points from a stage to the stages it depends on.
        order = [node.name for node in reversed(list(nx.topological_sort(repo.index.graph)))]
    declared = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    return [s for s in order if s in declared]


def plan(root: str, stages: list[str] | None = None) -> tuple[Path, list[str]]:
    """The flow's parameters checked against the DAG: ``root`` must be a DVC project folder
    whose pipeline DVC can read, and ``stages`` (None or [] for all) names of its stages; returns
    the folder and the stages to run, in DAG order. Raises UserError otherwise: both go to
    ``dvc repro`` as its working folder and arguments, so nothing unchecked may reach it."""
    folder = Path(root).expanduser().resolve() if isinstance(root, str) and root.strip() else None
    if folder is None or not (folder / "dvc.yaml").is_file():
        raise UserError(f"pipeline root: {root!r} is not a project folder (no dvc.yaml there)")
    try:
        order = stages_in_order(folder)
    except Exception as err:  # noqa: BLE001 - any DVC failure: one line naming the parameter
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"pipeline root: DVC cannot read the pipeline in {folder} ({first})") from None
    if stages is None or (isinstance(stages, (list, tuple)) and not stages):
        return folder, order
    if not isinstance(stages, (list, tuple)) or not all(isinstance(s, str) for s in stages):
        raise UserError(f"pipeline stages: expected a list of stage names, got {stages!r}")
    unknown = [s for s in stages if s not in order]
    if unknown:
        raise UserError(f"pipeline stages: unknown stage {unknown[0]!r}; the DAG has {', '.join(order)}")
    return folder, [s for s in order if s in stages]


@task
def reproduce(stage: str, root: str) -> bool:
    """Reproduce one DVC stage (``dvc repro --single-item``, in its own process, in the project
    root); True when it ran, False when DVC found it up to date. Its output goes to the task log."""
    logger = get_run_logger()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info("%s", line.rstrip())
    if proc.wait() != 0:
        errors = [l for l in lines if l.startswith(("error:", "ERROR"))]
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {errors[-1] if errors else lines[-1:]}")
    ran = any(l.startswith(f"Running stage '{stage}'") for l in lines)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    return ran


@flow(name="palm-rlhf")
def pipeline(root: str = str(ROOT), stages: list[str] | None = None) -> dict[str, bool]:
    """Run the pipeline's stages (all, or the ``stages`` given) in DAG order."""
    folder, names = plan(root, stages)
    root = str(folder)
    tracker = Tracker(folder, "pipeline")
    tracker.start({"stages": ",".join(names)}, {"git_commit": git_commit(folder)})
    previous = os.environ.get(PARENT_ENV)
    if tracker.run_id:
        os.environ[PARENT_ENV] = tracker.run_id  # stage runs (DVC subprocesses) nest under this one
    ran: dict[str, bool] = {}
    try:
        for name in names:
            task_ = reproduce.with_options(name=name, retries=RETRIES.get(name, 0), retry_delay_seconds=10)
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


if __name__ == "__main__":
    try:
        print(pipeline())
    except UserError as err:
        sys.exit(f"error: pipeline: {err}")
