"""DVC stage `scrape`: collect, clean, filter and deduplicate documents into a Parquet corpus."""

from __future__ import annotations

import sys

from pathlib import Path

from palm.core.io import atomic_dir, remove_if_empty
from palm.data.scrape import ScrapeConfig, scrape, work_key
from palm.ops.stage import StageContext, run_stage


def add_args(p):
    p.add_argument("--raw", required=True, help="output folder for the raw WARC shards")
    p.add_argument("--out", required=True, help="output folder for the corpus (Parquet + stats.json)")


def body(cfg: ScrapeConfig, ctx: StageContext) -> dict:
    # keyed by the params: a rerun after a crash resumes there, a changed param starts afresh
    work = Path(".work") / f"scrape-{work_key(cfg)}"
    try:
        with atomic_dir(ctx.path("out")) as corpus, atomic_dir(ctx.path("raw")) as raw:
            stats = scrape(cfg, raw, corpus, work=work, progress=sys.stderr.isatty())
    finally:
        remove_if_empty(work.parent)
    metrics = {k: stats[k] for k in ("fetched", "documents", "words", "dropped_total")}
    metrics.update({f"dropped_{k}": v for k, v in stats["dropped"].items()})
    metrics.update({f"crawl_{k}": v for k, v in stats["collect"].items() if isinstance(v, (int, float))})
    # The crawler's skip reasons (every one, zeros included), so each appears in metrics.json.
    metrics.update({f"crawl_skipped_{k}": v for k, v in stats["collect"].get("skipped", {}).items()})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("scrape", ScrapeConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
