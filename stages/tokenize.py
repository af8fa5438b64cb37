"""DVC stage `tokenize`: encode the corpus into Megatron `.bin/.idx` train/valid shards."""

from __future__ import annotations

import sys

from palm.core.io import atomic_dir
from palm.data.tokenize import TokenizeConfig, read_meta, tokenize_corpus
from palm.ops.stage import StageContext, run_stage


def add_args(p):
    p.add_argument("--corpus", required=True, help="corpus folder (Parquet parts)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--out", required=True, help="output folder for {train,valid}.{bin,idx} + meta.json")


def body(cfg: TokenizeConfig, ctx: StageContext) -> dict:
    with atomic_dir(ctx.path("out")) as out:
        metrics = tokenize_corpus(ctx.path("corpus"), ctx.path("tokenizer"), out, cfg, progress=sys.stderr.isatty())
    ctx.tracker.set_tags({"tokenizer.sha256": read_meta(ctx.path("out"))["tokenizer_sha256"]})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", TokenizeConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
