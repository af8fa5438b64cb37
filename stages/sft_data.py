"""DVC stage `sft_data`: chat conversations for supervised fine-tuning, tokenized in the project's
chat template with a loss mask on the assistant replies (``palm/data/chat.py``)."""

from __future__ import annotations

import sys

from palm.data.chat import ChatDataConfig, write_chat_data
from palm.model.network import ModelConfig
from palm.ops.stage import StageContext, run_stage


def add_args(p):
    p.add_argument("--corpus", required=True, help="corpus folder (the default data is derived from it)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    p.add_argument("--out", required=True, help="output folder for {train,valid}.parquet + meta.json")


def body(cfg: ChatDataConfig, ctx: StageContext) -> dict:
    metrics, tags = write_chat_data("sft", cfg, corpus=ctx.path("corpus"), tokenizer=ctx.path("tokenizer"),
                                    seq_len=ctx.sections["model"].seq_len, out=ctx.path("out"), root=ctx.root,
                                    progress=sys.stderr.isatty())
    if tags:  # human rankings among the sources: who, which batches
        ctx.tracker.set_tags(tags)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage("sft_data", ChatDataConfig, body, add_args, argv, sections={"model": ModelConfig})


if __name__ == "__main__":
    sys.exit(main())
