"""DVC stage `sft`: fine-tune the pretrained PaLM on the chat conversations of ``sft_data`` (loss on
the assistant replies only) with TP x PP x DP torchrun processes.

The architecture and tokenizer are the parent export's (``models/pretrain``); data made with
another tokenizer is refused. Resumes from ``--checkpoints`` (kept across reruns) like pretraining; ends
by exporting the weights as safetensors + config.json (+ the tokenizer) into ``--out``, atomically.
"""

from __future__ import annotations

import sys

from palm.ops.stage import StageContext, run_stage
from palm.train.finetune import train_from_parent
from palm.train.sft import SFTConfig, launch
from palm.train.stage import exported


def add_args(p):
    p.add_argument("--data", required=True, help="chat data of the sft_data stage ({train,valid}.parquet + meta.json)")
    p.add_argument("--parent", required=True, help="the model to start from (export: model.safetensors + config.json)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="exported model: model.safetensors + config.json + tokenizer.json")


def body(cfg: SFTConfig, ctx: StageContext) -> dict:
    result = train_from_parent("sft", cfg, ctx, launch, data_stage="sft_data", parent_stage="pretrain")
    with exported(ctx, result, ctx.path("parent") / "tokenizer.json", {
            "kind": "sft", "parent": str(ctx.args.parent),
            "metrics": {k: result[k] for k in ("val_loss", "base_val_loss")}}):
        pass
    return {k: v for k, v in result.items() if k != "checkpoint"}


def main(argv: list[str] | None = None) -> int:
    return run_stage("sft", SFTConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
