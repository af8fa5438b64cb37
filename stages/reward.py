"""DVC stage `reward`: train the reward model (PaLM + a scalar head) on the preference pairs of
``prefs``, starting from the SFT export, with TP x PP x DP torchrun processes.

Ends by exporting the model (head included) into ``--out``, atomically, with the mean and
standard deviation of its rewards over the training sequences in ``config.json`` (PPO normalises
rewards with them) and ``"kind": "reward"``.
"""

from __future__ import annotations

import json
import sys

from palm.data.chat import read_chat_meta
from palm.data.rankings import run_tags
from palm.model.reward import HEAD, RewardModel
from palm.ops.stage import StageContext, run_stage
from palm.train.finetune import check_parent
from palm.train.reward import COLUMNS, RewardConfig, launch, read_rows, reward_stats, validate
from palm.train.stage import exported, training_start


def add_args(p):
    p.add_argument("--data", required=True, help="preference pairs of the prefs stage ({train,valid}.parquet + meta.json)")
    p.add_argument("--parent", required=True, help="the model to start from (models/sft: model.safetensors + config.json)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="the reward model: model.safetensors + config.json + tokenizer.json")


def body(cfg: RewardConfig, ctx: StageContext) -> dict:
    model, parent = check_parent(ctx.path("data"), ctx.path("parent"), "prefs", "sft")
    tags = run_tags(read_chat_meta(ctx.path("data"), "prefs"))  # the human rankings behind the pairs
    if tags:
        ctx.tracker.set_tags(tags)
    validate(model, cfg)
    dtype, peak = training_start("reward", cfg, ctx)
    checkpoints = ctx.path("checkpoints")
    with ctx.tracker.follow(ctx.reports / "curve.csv"):
        result = launch(model, cfg, data=ctx.path("data"), parent=ctx.path("parent"),
                        tokenizer_sha256=parent["tokenizer_sha256"], checkpoints=checkpoints, reports=ctx.reports,
                        run_dir=checkpoints / "run", peak_flops=peak, dtype=dtype)
    with exported(ctx, result, ctx.path("parent") / "tokenizer.json", {
            "kind": "reward", "parent": str(ctx.args.parent), "head": HEAD, "margin": cfg.margin,
            "metrics": {k: result[k] for k in ("val_loss", "val_accuracy", "val_margin")}},
            chunk=RewardModel) as (out, config):
        sha = parent["tokenizer_sha256"]
        stats = reward_stats(out, read_rows(ctx.path("data"), "train", sha), batch_size=cfg.stats_batch_size,
                             valid=read_rows(ctx.path("data"), "valid", sha, [*COLUMNS, "kind"]),
                             sample=cfg.stats_pairs, seed=cfg.seed)
        config["reward"] = {"mean": stats["reward_mean"], "std": stats["reward_std"],
                            "sequences": stats["reward_sequences"]}
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {**{k: v for k, v in result.items() if k != "checkpoint"}, **stats}


def main(argv: list[str] | None = None) -> int:
    return run_stage("reward", RewardConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
