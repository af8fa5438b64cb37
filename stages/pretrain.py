"""DVC stage `pretrain`: train PaLM on the token shards with TP x PP x DP torchrun processes.

Resumes from ``--checkpoints`` (a persistent DVC output) when it holds a checkpoint of the same
run, so a killed run restarted by ``dvc repro`` continues; ends by exporting the final weights as
safetensors + config.json (+ the tokenizer) into ``--out``, atomically.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from palm.errors import UserError
from palm.io import atomic_dir
from palm.model import ModelConfig
from palm.stage import StageContext, run_stage
from palm.tracking import RUN_ENV
from palm.train.data import check_shards
from palm.train.pretrain import PretrainConfig, export, launch, validate


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
    from palm.megatron_compat import device
    from palm.train.metrics import dtype_name, matmul_peak_flops, resolve_dtype

    model = ctx.sections["model"]
    validate(model, cfg)
    sha = tokenizer_sha256(ctx.path("tokenizer"))
    check_shards(ctx.path("tokens"), sha)  # fail here, before starting processes
    dtype = resolve_dtype(cfg.dtype, device())
    peak = matmul_peak_flops(dtype, device=device())
    print(f"pretrain: dtype {dtype_name(dtype)} (pretrain.dtype: {cfg.dtype}); measured {dtype_name(dtype)} "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s", file=sys.stderr)
    ctx.tracker.set_tags({"dtype": dtype_name(dtype)})
    checkpoints = ctx.path("checkpoints")
    env = {RUN_ENV: ctx.tracker.run_id} if ctx.tracker.enabled and ctx.tracker.run_id else {}
    result = launch(model, cfg, tokens=ctx.path("tokens"), tokenizer_sha256=sha,
                    checkpoints=checkpoints, reports=ctx.reports, run_dir=checkpoints / "run",
                    peak_flops=peak, dtype=dtype_name(dtype), env=env)
    with atomic_dir(ctx.path("out")) as out:
        export(Path(result["checkpoint"]), out, {"metrics": {k: result[k] for k in ("val_loss", "unigram_loss")}})
        shutil.copy2(ctx.path("tokenizer") / "tokenizer.json", out / "tokenizer.json")
    ctx.tracker.log_artifact(ctx.reports / "curve.csv")
    return {k: v for k, v in result.items() if k != "checkpoint"}


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", PretrainConfig, body, add_args, argv, sections={"model": ModelConfig})


if __name__ == "__main__":
    sys.exit(main())
