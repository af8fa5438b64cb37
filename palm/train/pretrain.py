"""Pretraining: the library behind the ``pretrain`` stage.

:func:`launch` starts ``tensor_parallel x pipeline_parallel x data_parallel`` processes with
``torchrun`` (one process is fine); each runs :func:`train` (``python -m palm.train.pretrain
SPEC.json``). A run resumes from the newest checkpoint under its checkpoint folder when that
checkpoint belongs to the same run (same model, data, optimizer, seed, global batch: the TP/PP/DP
layout may differ), so a killed run restarted by ``dvc repro`` continues where it stopped:
optimizer, LR schedule, data position and RNG. :func:`export` then writes the final weights as
plain safetensors + ``config.json`` (loading the distributed checkpoint at TP=1, PP=1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from palm.config import check, from_dict, to_dict
from palm.errors import UserError
from palm.model import ModelConfig
from palm.train.engine import OptimConfig

KILL_ENV = "PALM_TEST_SIGKILL_AFTER_CHECKPOINT"  # fault injection for the resume test


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of params.yaml."""

    tensor_parallel: int = 1  # TP degree: query heads, SwiGLU and vocabulary split this many ways
    pipeline_parallel: int = 1  # PP degree: blocks split into this many stages (1F1B schedule)
    data_parallel: int = 1  # DP degree: replicas, each with its own micro-batches
    virtual_stages: int = 1  # >1: interleaved 1F1B with this many model chunks per PP rank
    train_steps: int = 300  # optimizer steps
    micro_batch_size: int = 8  # sequences per micro-batch
    num_microbatches: int = 1  # micro-batches per optimizer step per DP rank (grad accumulation)
    dtype: str = "bf16"  # parameter dtype: fp32, or bf16 (megatron mixed precision, fp32 main weights)
    log_interval: int = 10  # steps per curve.csv row / MLflow point
    eval_interval: int = 100  # steps between validation losses (and at the end)
    eval_batches: int = 4  # micro-batches per DP rank in one validation
    checkpoint_interval: int = 100  # steps between checkpoints (and at the end)
    seed: int = 1234  # initial weights and data order
    threads: int = 0  # torch threads per process; 0 = cores / processes
    optim: OptimConfig = OptimConfig()

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "data_parallel", "virtual_stages",
                     "train_steps", "micro_batch_size", "num_microbatches", "log_interval",
                     "eval_interval", "eval_batches", "checkpoint_interval"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.dtype in ("fp32", "bf16"), "dtype", f"must be fp32 or bf16, got {self.dtype!r}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(self.virtual_stages == 1 or self.pipeline_parallel > 1, "virtual_stages",
              "virtual stages need pipeline_parallel > 1")
        for name in ("num_microbatches", "eval_batches"):
            check(self.virtual_stages == 1 or getattr(self, name) % self.pipeline_parallel == 0, name,
                  "interleaved 1F1B needs it divisible by pipeline_parallel")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def global_batch(self) -> int:
        return self.data_parallel * self.num_microbatches * self.micro_batch_size

    def run_identity(self, model: ModelConfig, tokenizer_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        return {"model": to_dict(model), "optim": to_dict(self.optim), "seed": self.seed,
                "train_steps": self.train_steps, "global_batch": self.global_batch,
                "micro_batch_size": self.micro_batch_size, "dtype": self.dtype,
                "tokenizer_sha256": tokenizer_sha256, "code": code_version()}


def code_version() -> str:
    """sha256 of the sources that define the computation; a changed model or engine starts fresh
    rather than resuming a checkpoint made by other code."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in ("model.py", "parallel.py", "train/engine.py", "train/data.py"):
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def validate(model: ModelConfig, cfg: PretrainConfig) -> None:
    """Refuse layouts the model cannot be split into (errors name the fields)."""
    model.check_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_stages)


# --- the stage side: launch the workers --------------------------------------------------------

def launch(model: ModelConfig, cfg: PretrainConfig, *, tokens: Path, tokenizer_sha256: str,
           checkpoints: Path, reports: Path, run_dir: Path, peak_flops: float,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run training in ``cfg.world_size`` processes; returns the final metrics of rank 0."""
    validate(model, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"model": to_dict(model), "pretrain": to_dict(cfg), "tokens": str(tokens),
            "tokenizer_sha256": tokenizer_sha256, "checkpoints": str(checkpoints),
            "reports": str(reports), "run_dir": str(run_dir), "peak_flops": peak_flops}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.world_size)
    quiet = ",".join(f"ignore:{m}:UserWarning" for m in (
        "Transformer Engine and Apex", "Apex is not installed", "full scope is deprecated"))
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": quiet, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={cfg.world_size}",
           "-m", "palm.train.pretrain", str(spec_path)]
    for stale in (*run_dir.glob("pgid.*"), *run_dir.glob("error.*")):
        stale.unlink()
    try:
        code = subprocess.run(cmd, env=full_env).returncode
    finally:
        _kill_leftovers(run_dir)
    errors = sorted(run_dir.glob("error.*"))
    if errors:
        raise UserError(errors[0].read_text().strip())
    if code != 0 or not result.is_file():
        raise RuntimeError(f"training processes failed (torchrun exit {code}); see the log above")
    return json.loads(result.read_text())


def _kill_leftovers(run_dir: Path) -> None:
    """SIGKILL what is left of each worker's process group (torchrun starts every worker in its
    own session). A worker that died hard leaves behind the multiprocessing manager that
    ``dist_checkpointing.save`` spawned; it would live on, holding the stage's stderr."""
    for path in run_dir.glob("pgid.*"):
        try:
            os.killpg(int(path.read_text()), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass
        path.unlink(missing_ok=True)


def export(checkpoint: Path, out_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Load ``checkpoint`` at TP=1, PP=1 in this process and write safetensors + config.json."""
    from palm import parallel
    from palm.model import PaLM
    from palm.train import checkpoint as ckpt

    meta = ckpt.check_checkpoint(checkpoint)
    model_cfg = from_dict(ModelConfig, meta["run"]["model"], "model")
    parallel.init_distributed()
    try:
        model = PaLM(model_cfg)
        ckpt.load_model([model], checkpoint)
        config = {"model": to_dict(model_cfg), "tokenizer_sha256": meta["run"]["tokenizer_sha256"],
                  "step": meta["step"], "format": "palm-rlhf/1", **extra}
        ckpt.export_safetensors(model, out_dir, config)
    finally:
        parallel.teardown()
    return config


def evaluate_checkpoint(checkpoint: Path, tokens: Path, cfg: PretrainConfig, *, run_dir: Path) -> float:
    """Validation loss of ``checkpoint`` here, in one process at TP=1, PP=1 (any saved layout),
    on the validation batches a one-DP-rank run of ``cfg`` uses."""
    import torch

    from palm import parallel
    from palm.train import checkpoint as ckpt
    from palm.train import data
    from palm.train.engine import Engine

    meta_ckpt = ckpt.check_checkpoint(checkpoint)
    model_cfg = from_dict(ModelConfig, meta_ckpt["run"]["model"], "model")
    meta = data.check_shards(tokens, meta_ckpt["run"]["tokenizer_sha256"])
    parallel.init_distributed()
    try:
        _, valid_ds = data.build_datasets(
            tokens, meta, seq_len=model_cfg.seq_len, train_samples=cfg.train_steps * cfg.global_batch,
            valid_samples=cfg.eval_batches * cfg.micro_batch_size, seed=cfg.seed,
            cache_dir=run_dir / "dataset_cache")
        valid = data.Batches(valid_ds, micro_batch_size=cfg.micro_batch_size,
                             num_microbatches=cfg.eval_batches, dp_rank=0, dp_size=1).step(0)
        engine = Engine(model_cfg, cfg.optim, train_steps=cfg.train_steps,
                        micro_batch_size=cfg.micro_batch_size, num_microbatches=cfg.eval_batches,
                        dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, seed=cfg.seed)
        ckpt.load_model(engine.chunks, checkpoint)
        return engine.eval_loss(valid)
    finally:
        parallel.teardown()


# --- the worker side: one training process ------------------------------------------------------

def train(spec: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from palm import parallel
    from palm.train import checkpoint as ckpt
    from palm.train import data
    from palm.train.engine import Engine
    from palm.train.metrics import Curve

    model_cfg = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(PretrainConfig, spec["pretrain"], "pretrain")
    validate(model_cfg, cfg)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    parallel.init_distributed(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.data_parallel,
                              cfg.virtual_stages)
    rank0 = torch.distributed.get_rank() == 0
    tokens_dir, run_dir = Path(spec["tokens"]), Path(spec["run_dir"])
    (run_dir / f"pgid.{torch.distributed.get_rank()}").write_text(str(os.getpgid(0)))
    meta = data.check_shards(tokens_dir, spec["tokenizer_sha256"])
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                        f"{meta['vocab_size']}; set model.vocab_size to at least {meta['vocab_size']}")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    eval_samples = cfg.eval_batches * dp * cfg.micro_batch_size
    train_ds, valid_ds = data.build_datasets(
        tokens_dir, meta, seq_len=model_cfg.seq_len, train_samples=cfg.train_steps * cfg.global_batch,
        valid_samples=eval_samples, seed=cfg.seed, cache_dir=run_dir / "dataset_cache")
    batches = data.Batches(train_ds, micro_batch_size=cfg.micro_batch_size,
                           num_microbatches=cfg.num_microbatches, dp_rank=dp_rank, dp_size=dp)
    valid = data.Batches(valid_ds, micro_batch_size=cfg.micro_batch_size,
                         num_microbatches=cfg.eval_batches, dp_rank=dp_rank, dp_size=dp).step(0)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    engine = Engine(model_cfg, cfg.optim, train_steps=cfg.train_steps,
                    micro_batch_size=cfg.micro_batch_size, num_microbatches=cfg.num_microbatches,
                    dtype=dtype, seed=cfg.seed)

    identity = cfg.run_identity(model_cfg, meta["tokenizer_sha256"])
    root = Path(spec["checkpoints"])
    resumed = _resume(engine, root, identity, rank0)
    curve = Curve(Path(spec["reports"]) / "curve.csv", engine.step) if rank0 else None
    tracker = _tracker(spec) if rank0 else None
    flops_per_token = model_cfg.flops_per_token()
    tokens_per_step = cfg.global_batch * model_cfg.seq_len
    bar = tqdm(total=cfg.train_steps, initial=engine.step, desc="pretrain", unit="step",
               disable=not rank0 or None, dynamic_ncols=True)
    window: list[dict[str, float]] = []
    t_window, t_total, steps_timed = 0.0, 0.0, 0  # time inside train_step only
    val_loss, last_loss = None, float("nan")
    while engine.step < cfg.train_steps:
        t0 = time.perf_counter()
        stats = engine.train_step(batches.step(engine.step))
        t_window += time.perf_counter() - t0
        t_total += time.perf_counter() - t0
        steps_timed += 1
        window.append(stats)
        if not math.isfinite(stats["loss"]):
            raise UserError(f"loss became {stats['loss']} at step {engine.step}; lower pretrain.optim.lr")
        step = engine.step
        evaluated = step % cfg.eval_interval == 0 or step == cfg.train_steps
        if evaluated:
            val_loss = engine.eval_loss(valid)
        if step % cfg.log_interval == 0 or step == cfg.train_steps:
            tps = len(window) * tokens_per_step / max(t_window, 1e-9)
            row = {"step": step, "loss": sum(w["loss"] for w in window) / len(window),
                   "val_loss": val_loss if evaluated else None, "lr": window[-1]["lr"],
                   "grad_norm": window[-1]["grad_norm"], "tokens_per_s": tps,
                   "mfu": tps * flops_per_token / spec["peak_flops"]}
            if rank0:
                curve.append(row)
                tracker.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:.0f}")
            last_loss = row["loss"]
            window, t_window = [], 0.0
        bar.update(1)
        if step % cfg.checkpoint_interval == 0 or step == cfg.train_steps:
            ckpt.save(engine, root, step=step, meta={"run": identity})
            if os.environ.get(KILL_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if val_loss is None:  # resumed at the very end: evaluate once more
        val_loss = engine.eval_loss(valid)
    if rank0:
        tps = steps_timed * tokens_per_step / t_total if steps_timed else float("nan")
        result = {"final_train_loss": last_loss, "val_loss": val_loss,
                  "val_perplexity": math.exp(min(val_loss, 50.0)),
                  "unigram_loss": data.unigram_loss(tokens_dir, meta),
                  "tokens_per_s": tps, "mfu": tps * flops_per_token / spec["peak_flops"],
                  "peak_flops": spec["peak_flops"], "flops_per_token": flops_per_token,
                  "params": model_cfg.num_params(), "steps": engine.step,
                  "resumed_from_step": resumed, "tokens_seen": engine.step * tokens_per_step,
                  "checkpoint": str(ckpt.latest(root))}
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    parallel.teardown()


def _resume(engine: Any, root: Path, identity: dict[str, Any], rank0: bool) -> int:
    """Load the newest checkpoint of this run; a checkpoint of another run is moved aside."""
    import torch

    from palm.train import checkpoint as ckpt

    path = ckpt.latest(root)
    if path is None:
        return 0
    meta = ckpt.check_checkpoint(path)
    if meta.get("run") != identity:
        torch.distributed.barrier()
        if rank0:
            print(f"pretrain: {path} belongs to a different run (config changed); starting fresh",
                  file=sys.stderr)
            for old in (*root.glob("step_*"), *root.glob(".step_*")):
                shutil.rmtree(old, ignore_errors=True)
            (root / "latest").unlink(missing_ok=True)
        torch.distributed.barrier()
        return 0
    ckpt.load(engine, path)
    if rank0:
        print(f"pretrain: resumed from {path} (step {engine.step})", file=sys.stderr)
    return engine.step


def _tracker(spec: dict[str, Any]) -> Any:
    """Rank 0's handle on the stage's MLflow run (``PALM_MLFLOW_RUN_ID``), or a no-op."""
    from palm.tracking import RUN_ENV, Tracker

    tracker = Tracker(Path(spec.get("root", ".")), "pretrain", enabled=bool(os.environ.get(RUN_ENV)))
    tracker.start({}, {})
    return tracker


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        train(spec)
    except UserError as err:  # the stage re-raises it as its one-line error
        (Path(spec["run_dir"]) / f"error.{os.environ.get('RANK', '0')}").write_text(str(err))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
