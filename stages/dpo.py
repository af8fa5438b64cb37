"""DVC stage `dpo`: direct preference optimisation of the SFT policy on the preference pairs of
``prefs``' train split (DPO, cDPO, IPO or SimPO: ``dpo.loss``), with the SFT export as the frozen
reference, TP x PP x DP torchrun processes (palm/train/dpo.py). No reward model, no sampling.

Resumes from ``--checkpoints`` (kept across reruns); ends by exporting the policy as ``models/ppo``
is (safetensors + config.json with ``"kind": "dpo"`` and the loss + tokenizer.json) into ``--out``,
atomically.
"""

from __future__ import annotations

import sys

from palm.ops.stage import StageContext, run_stage
from palm.train.dpo import DPOConfig, launch
from palm.train.finetune import train_from_parent
from palm.train.stage import exported


def add_args(p):
    p.add_argument("--data", required=True, help="preference pairs of the prefs stage ({train,valid}.parquet + meta.json)")
    p.add_argument("--parent", required=True, help="the policy to start from and the reference (models/sft)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="the exported policy: model.safetensors + config.json + tokenizer.json")


def body(cfg: DPOConfig, ctx: StageContext) -> dict:
    from palm.data.rankings import run_tags
    from palm.data.chat import read_chat_meta

    tags = run_tags(read_chat_meta(ctx.path("data"), "prefs"))  # the human rankings behind the pairs
    if tags:
        ctx.tracker.set_tags(tags)
    result = train_from_parent("dpo", cfg, ctx, launch, data_stage="prefs", parent_stage="sft")
    with exported(ctx, result, ctx.path("parent") / "tokenizer.json", {
            "kind": "dpo", "parent": str(ctx.args.parent), "dpo": cfg.objective(),
            "metrics": {k: result[k] for k in ("val_loss", "val_accuracy", "val_margin")}}):
        pass
    return {k: v for k, v in result.items() if k != "checkpoint"}


def main(argv: list[str] | None = None) -> int:
    return run_stage("dpo", DPOConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
