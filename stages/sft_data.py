"""DVC stage `sft_data`: chat conversations for supervised fine-tuning, tokenized in the project's
chat template with a loss mask on the assistant replies (``palm/data/chat.py``)."""

from __future__ import annotations

import sys

from palm.data.chat import ChatDataConfig, build_chat_data, read_chat_meta
from palm.data.rankings import run_tags
from palm.io import atomic_dir
from palm.model import ModelConfig
from palm.stage import StageContext, run_stage


def add_args(p):
    p.add_argument("--corpus", required=True, help="corpus folder (the default data is derived from it)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    p.add_argument("--out", required=True, help="output folder for {train,valid}.parquet + meta.json")


def build(kind: str, cfg: ChatDataConfig, ctx: StageContext) -> dict:
    """The body of both chat-data stages (``sft_data`` and ``prefs``)."""
    with atomic_dir(ctx.path("out")) as out:
        metrics = build_chat_data(kind, cfg, corpus=ctx.path("corpus"), tokenizer=ctx.path("tokenizer"),
                                  seq_len=ctx.sections["model"].seq_len, out=out, root=ctx.root,
                                  progress=sys.stderr.isatty())
        tags = run_tags(read_chat_meta(out, kind))  # human rankings among the sources: who, which batches
    if tags:
        ctx.tracker.set_tags(tags)
    return metrics


def body(cfg: ChatDataConfig, ctx: StageContext) -> dict:
    return build("sft", cfg, ctx)


def main(argv: list[str] | None = None) -> int:
    return run_stage("sft_data", ChatDataConfig, body, add_args, argv, sections={"model": ModelConfig})


if __name__ == "__main__":
    sys.exit(main())
