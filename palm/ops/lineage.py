"""``palm lineage MODEL``: where a registered model came from, run by run, back to the scrape run.

    palm lineage models:/palm-chat@champion          # a tree of runs, their inputs' md5s
    palm lineage models:/palm-chat@champion --json   # the same, machine-readable

MODEL is a registry URI (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``); the registry is
``MLFLOW_TRACKING_URI``, default the project's ``mlflow.db``. The walk (palm/ops/registry.py) starts at
the version's source run (the stage run that produced the model) and follows each run's inputs
(tags ``dvc.dep.<path>.md5`` and ``palm.input.<path>.run_id``) to the runs that produced them,
down to the scrape run and the md5 of the corpus it wrote.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a registry URI, e.g. models:/palm-chat@champion")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")


def run(args: argparse.Namespace) -> int:
    from palm.ops import registry

    info = registry.lineage(args.model)
    if args.json:
        print(registry.lineage_json(info))
    else:
        for line in registry.format_lineage(info):
            print(line)
    if info["corpus"] is None:
        print("warning: lineage: the chain does not reach a scrape run (runs made without MLflow tracking?)",
              file=sys.stderr)
    return 0
