"""DVC stage `sft`: fine-tune the pretrained PaLM on the chat conversations of ``sft_data`` (loss on
the assistant replies only) with TP x PP x DP torchrun processes.

The architecture and tokenizer are the parent export's (``models/pretrain``); data made with
another tokenizer is refused. Resumes from ``--checkpoints`` (persistent) like pretraining; ends
by exporting the weights as safetensors + config.json (+ the tokenizer) into ``--out``, atomically.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from palm.io import atomic_dir
from palm.stage import StageContext, run_stage
from palm.tracking import RUN_ENV
from palm.train.sft import SFTConfig, launch, validate


def add_args(p):
    p.add_argument("--data", required=True, help="chat data of the sft_data stage ({train,valid}.parquet + meta.json)")
    p.add_argument("--parent", required=True, help="the model to start from (export: model.safetensors + config.json)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="exported model: model.safetensors + config.json + tokenizer.json")


def prepare(ctx: StageContext, data_stage: str, parent_stage: str):
    """The parent's architecture and config, after checking the data against it (one-line errors)."""
    from palm.data.chat import read_chat_meta
    from palm.train.finetune import check_fits, check_tokenizer, read_parent

    parent = ctx.path("parent")
    model, config = read_parent(parent, parent_stage)
    meta = read_chat_meta(ctx.path("data"), data_stage)
    check_tokenizer(ctx.path("data"), meta, parent, config, data_stage)
    check_fits(ctx.path("data"), meta, model, data_stage)
    return model, config


def start(stage: str, cfg, ctx: StageContext):
    """dtype, measured peak, MLflow tags and the env of the training processes."""
    from palm.megatron_compat import device
    from palm.train.metrics import dtype_name, matmul_peak_flops, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, device())
    peak = matmul_peak_flops(dtype, device=device())
    print(f"{stage}: dtype {dtype_name(dtype)} ({stage}.dtype: {cfg.dtype}); measured {dtype_name(dtype)} "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s", file=sys.stderr)
    ctx.tracker.set_tags({"dtype": dtype_name(dtype)})
    env = {RUN_ENV: ctx.tracker.run_id} if ctx.tracker.enabled and ctx.tracker.run_id else {}
    return dtype_name(dtype), peak, env


def body(cfg: SFTConfig, ctx: StageContext) -> dict:
    from palm.train.loop import export

    model, parent = prepare(ctx, "sft_data", "pretrain")
    validate(model, cfg)
    dtype, peak, env = start("sft", cfg, ctx)
    checkpoints = ctx.path("checkpoints")
    result = launch(model, cfg, data=ctx.path("data"), parent=ctx.path("parent"),
                    tokenizer_sha256=parent["tokenizer_sha256"], checkpoints=checkpoints, reports=ctx.reports,
                    run_dir=checkpoints / "run", peak_flops=peak, dtype=dtype, env=env)
    with atomic_dir(ctx.path("out")) as out:
        export(Path(result["checkpoint"]), out, {
            "kind": "sft", "parent": str(ctx.args.parent),
            "metrics": {k: result[k] for k in ("val_loss", "base_val_loss")}})
        shutil.copy2(ctx.path("parent") / "tokenizer.json", out / "tokenizer.json")
    ctx.tracker.log_artifact(ctx.reports / "curve.csv")
    return {k: v for k, v in result.items() if k != "checkpoint"}


def main(argv: list[str] | None = None) -> int:
    return run_stage("sft", SFTConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
