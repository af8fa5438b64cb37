"""Run a training stage's command on a node other than node 0 of a multi-node job.

    PALM_NODE_RANK=1 PALM_RDZV_ENDPOINT=node0:29400 python -m pipelines.node pretrain

Node 0 runs ``dvc repro <stage>`` (DVC's lock, cache and outputs are its alone); every other
node runs the same stage command, read from ``dvc.yaml`` (so paths are declared once), with
``PALM_NODE_RANK`` set: its launcher joins torchrun's c10d rendezvous, trains its share of the
processes and exits 0 writing nothing (palm/train/launch.py). ``docs/slurm/pretrain.sbatch``
uses it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from palm.core.errors import UserError
from palm.core.process import NODE_RANK_ENV, is_other_node
from pipelines import ROOT


def dvc_stages(root: Path = ROOT) -> dict:
    """``dvc.yaml``'s stages by name, as DVC parses them (variables resolved): each has ``cmd``,
    ``deps`` and ``outs`` (metrics included), whose ``def_path`` is the path as declared."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.name: stage for stage in repo.index.stages}


def stage_command(stage: str, root: Path = ROOT) -> list[str]:
    """The stage's ``cmd`` from ``dvc.yaml``, its variables resolved."""
    try:
        found = dvc_stages(root)
    except Exception as err:  # noqa: BLE001 - DVC's own message, on one line
        raise UserError(f"cannot read {root / 'dvc.yaml'} ({err})") from None
    if stage not in found:
        raise UserError(f"no stage {stage!r} in {root / 'dvc.yaml'} (stages: {', '.join(found)})")
    return shlex.split(found[stage].cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", help="a training stage of dvc.yaml (pretrain, sft, reward, ppo)")
    args = p.parse_args(argv)
    if not is_other_node():
        print(f"error: node: {NODE_RANK_ENV} is unset or 0; node 0 runs `dvc repro {args.stage}` instead",
              file=sys.stderr)
        return 2
    try:
        cmd = stage_command(args.stage)
    except UserError as err:
        print(f"error: node: {err}", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    os.execv(cmd[0] if os.path.isabs(cmd[0]) else str(ROOT / cmd[0]), cmd)


if __name__ == "__main__":
    sys.exit(main())
