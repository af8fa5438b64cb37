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

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        order = []
        import networkx as nx

        for node in reversed(list(nx.topological_sort(graph))):
            order.append(node.addressing)
    declared = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    return [s for s in order if s in declared]


@task
def reproduce(stage: str, root: str) -> bool:
    """Reproduce one DVC stage; True when it ran, False when DVC found it up to date."""
    from dvc.repo import Repo

    logger = get_run_logger()
    with Repo(root) as repo:
        ran = repo.reproduce(targets=[stage], single_item=True)
    logger.info("stage %s: %s", stage, "ran" if ran else "up to date (DVC cache)")
    return bool(ran)


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
