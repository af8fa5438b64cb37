"""Serve the pipeline as a scheduled Prefect deployment (needs a Prefect server: make prefect-server).

    python -m pipelines.serve --cron "0 3 * * *"
"""

from __future__ import annotations

import argparse

from pipelines.flow import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="palm-rlhf-nightly")
    parser.add_argument("--cron", default="0 3 * * *", help="schedule (cron, UTC)")
    args = parser.parse_args()
    pipeline.serve(name=args.name, cron=args.cron)


if __name__ == "__main__":
    main()
