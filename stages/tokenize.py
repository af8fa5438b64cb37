"""DVC stage `tokenize`: encode the corpus into Megatron `.bin/.idx` train/valid shards."""

from __future__ import annotations

import sys

from pathlib import Path

from palm.core.io import atomic_dir, remove_if_empty
from palm.data.tokenize import TokenizeConfig, read_meta, tokenize_corpus, tokenize_work_key
from palm.ops.stage import StageContext, run_stage


def add_args(p):
    p.add_argument("--corpus", required=True, help="corpus folder (Parquet parts)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--out", required=True, help="output folder for {train,valid}.{bin,idx} + meta.json")


def body(cfg: TokenizeConfig, ctx: StageContext) -> dict:
    # keyed by the params and inputs: a rerun after a crash resumes there, a change starts afresh
    work = Path(".work") / f"tokenize-{tokenize_work_key(cfg, ctx.path('corpus'), ctx.path('tokenizer'))}"
    try:
        with atomic_dir(ctx.path("out")) as out:
            metrics = tokenize_corpus(ctx.path("corpus"), ctx.path("tokenizer"), out, cfg, work=work,
                                      progress=sys.stderr.isatty())
    finally:
        remove_if_empty(work.parent)
    ctx.tracker.set_tags({"tokenizer.sha256": read_meta(ctx.path("out"))["tokenizer_sha256"]})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", TokenizeConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
