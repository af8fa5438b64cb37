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
    names = stages or stages_in_order(Path(root))
    tracker = Tracker(Path(root), "pipeline")
    tracker.start({"stages": ",".join(names)}, {"git_commit": git_commit(Path(root))})
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
    print(pipeline())
