"""DVC stage `pretrain`: train PaLM on the token shards with TP x PP x DP torchrun processes.

Resumes from ``--checkpoints`` (kept across DVC reruns: not a declared output) when it holds a checkpoint of the same
run, so a killed run restarted by ``dvc repro`` continues; ends by exporting the final weights as
safetensors + config.json (+ the tokenizer) into ``--out``, atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from palm.core.errors import UserError
from palm.model.network import ModelConfig
from palm.ops.stage import StageContext, run_stage
from palm.train.data import check_shards
from palm.train.pretrain import PretrainConfig, launch, validate
from palm.train.stage import exported, training_start


def add_args(p):
    p.add_argument("--tokens", required=True, help="token shards: {train,valid}.{bin,idx} + meta.json")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json + meta.json)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="exported model: model.safetensors + config.json")


def tokenizer_sha256(folder: Path) -> str:
    try:
        return json.loads((folder / "meta.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{folder}/meta.json: tokenizer metadata missing or unreadable; run the tokenizer stage")


def body(cfg: PretrainConfig, ctx: StageContext) -> dict:
    model = ctx.sections["model"]
    validate(model, cfg)
    sha = tokenizer_sha256(ctx.path("tokenizer"))
    check_shards(ctx.path("tokens"), sha)  # fail here, before starting processes
    dtype, peak = training_start("pretrain", cfg, ctx)
    checkpoints = ctx.path("checkpoints")
    with ctx.tracker.follow(ctx.reports / "curve.csv"):
        result = launch(model, cfg, tokens=ctx.path("tokens"), tokenizer_sha256=sha,
                        checkpoints=checkpoints, reports=ctx.reports, run_dir=checkpoints / "run",
                        peak_flops=peak, dtype=dtype)
    with exported(ctx, result, ctx.path("tokenizer") / "tokenizer.json",
                  {"metrics": {k: result[k] for k in ("val_loss", "unigram_loss")}}):
        pass
    return {k: v for k, v in result.items() if k != "checkpoint"}


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", PretrainConfig, body, add_args, argv, sections={"model": ModelConfig})


if __name__ == "__main__":
    sys.exit(main())
