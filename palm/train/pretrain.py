"""Pretraining: the language-model objective on the token shards, the library behind ``pretrain``.

Only what is particular to pretraining lives here: its config section, its data (megatron
``GPTDataset`` samples of ``seq_len + 1`` tokens, :mod:`palm.train.data`) and its objective — the
next-token negative log-likelihood plus PaLM's auxiliary z-loss ``z_loss_weight * log(Z)^2``
(PaLM §5), averaged over every valid token of the global batch. The torchrun launch is
:mod:`palm.train.launch`, the loop (train / eval / checkpoint / resume / curve) is
:mod:`palm.train.loop`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from palm.core.config import check, from_dict, to_dict
from palm.core.errors import UserError
from palm.model.network import ModelConfig
from palm.train.engine import Batch, metric
from palm.train.launch import launch as _launch
from palm.train.loop import KILL_ENV, RunPaths, TrainConfig, code_version, export  # noqa: F401 (re-exported)

ENTRY = "palm.train.pretrain:worker"
CODE = ("train/data.py", "train/pretrain.py")  # with model, parallel and engine: the computation


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    """The ``pretrain`` section of params.yaml (the training fields are :class:`TrainConfig`'s)."""

    z_loss_weight: float = 1e-4  # weight of the auxiliary loss log(Z)^2 (PaLM §5); 0 disables it

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.z_loss_weight >= 0, "z_loss_weight", f"must be >= 0, got {self.z_loss_weight}")
        check(self.lora is None, "lora", "LoRA fine-tunes a parent model and pretraining has none: remove "
              "pretrain.lora (set it in sft, reward, ppo or dpo)")

    def run_identity(self, model: ModelConfig, dtype: str, tokenizer_sha256: str,
                     data_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        return {"model": to_dict(model), **self.identity(dtype), "z_loss_weight": self.z_loss_weight,
                "tokenizer_sha256": tokenizer_sha256, "data_sha256": data_sha256,
                "code": code_version(*CODE)}


def validate(model: ModelConfig, cfg: PretrainConfig) -> None:
    """Refuse layouts the model cannot be split into (errors name the fields)."""
    model.check_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_stages)


# --- the objective -------------------------------------------------------------------------------

def lm_forward_step(z_loss_weight: float):
    """Next-token loss (+ z-loss) summed over the valid tokens of a micro-batch ``{"tokens",
    "labels", "loss_mask"}`` (each ``[b, s]``); reports ``loss`` and ``nll`` per token."""

    def step(batch: Batch, model: torch.nn.Module):
        output = model(batch["tokens"], labels=batch["labels"])  # (nll, logz) on the last stage

        def loss_func(out: tuple[torch.Tensor, torch.Tensor]):
            nll, logz = out  # [b, s] fp32 each
            mask = batch["loss_mask"].float()
            count = mask.sum()
            loss = ((nll + z_loss_weight * logz.square()) * mask).sum()
            return loss, count, {"nll": metric((nll * mask).sum(), count)}

        return output, loss_func

    return step


# --- the stage side ------------------------------------------------------------------------------

def shards_sha256(tokens: Path) -> str:
    """Content hash of the token shards (meta.json and every .bin/.idx): the data part of a run's
    identity, so new shards from the same tokenizer retrain instead of resuming."""
    from palm.core.io import files_sha256
    from palm.train.data import SPLITS

    return files_sha256(tokens, ["meta.json"] + [f"{s}.{e}" for s in SPLITS for e in ("idx", "bin")])


def launch(model: ModelConfig, cfg: PretrainConfig, *, tokens: Path, tokenizer_sha256: str,
           checkpoints: Path, reports: Path, run_dir: Path, peak_flops: float, dtype: str = "fp32",
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train in ``cfg.world_size`` processes with the resolved ``dtype``; returns rank 0's result."""
    validate(model, cfg)
    spec = {"model": to_dict(model), "pretrain": to_dict(cfg), "dtype": dtype, "tokens": str(tokens),
            "tokenizer_sha256": tokenizer_sha256, "data_sha256": shards_sha256(tokens),
            "checkpoints": str(checkpoints), "reports": str(reports), "peak_flops": peak_flops}
    return _launch(ENTRY, spec, cfg, run_dir=run_dir, env=env)


def evaluate_checkpoint(checkpoint: Path, tokens: Path, cfg: PretrainConfig, *, run_dir: Path) -> float:
    """Validation loss of ``checkpoint`` here, in one process at TP=1, PP=1 (any saved layout),
    on the validation batches a one-DP-rank run of ``cfg`` uses."""
    from palm.model import parallel
    from palm.train import checkpoint as ckpt
    from palm.train.engine import Engine

    meta = ckpt.check_checkpoint(checkpoint)["run"]
    model = from_dict(ModelConfig, meta["model"], "model")
    with parallel.process_groups():
        _, valid = load_batches(tokens, model, cfg, meta["tokenizer_sha256"], meta["data_sha256"], run_dir,
                         dp_rank=0, dp_size=1)
        engine = Engine(model, None, forward_step=lm_forward_step(meta["z_loss_weight"]),
                        micro_batch_size=cfg.micro_batch_size, dtype=torch.float32)
        ckpt.load_model(engine.chunks, checkpoint)
        return engine.evaluate(valid)["loss"]


# --- the worker side: one training process -------------------------------------------------------

def load_batches(tokens: Path, model: ModelConfig, cfg: PretrainConfig, tokenizer_sha256: str, data_sha256: str,
                 run_dir: Path, *, dp_rank: int, dp_size: int):
    """This DP rank's training batches (``.step(i)``) and validation micro-batches of ``cfg`` on the
    token shards, after checking them against the tokenizer and the model's vocabulary."""
    from palm.train import data

    meta = data.check_shards(tokens, tokenizer_sha256)
    if meta["vocab_size"] > model.vocab_size:
        raise UserError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                        f"{meta['vocab_size']}; set model.vocab_size to at least {meta['vocab_size']}")
    train_ds, valid_ds = data.build_datasets(
        tokens, meta, seq_len=model.seq_len, train_samples=cfg.train_steps * cfg.global_batch,
        valid_samples=cfg.eval_batches * dp_size * cfg.micro_batch_size, seed=cfg.seed,
        # megatron caches its sample index by path: key the cache by the shards' content
        cache_dir=Path(run_dir) / "dataset_cache" / data_sha256[:16])
    batches = data.Batches(train_ds, micro_batch_size=cfg.micro_batch_size,
                           num_microbatches=cfg.num_microbatches, dp_rank=dp_rank, dp_size=dp_size)
    valid = data.Batches(valid_ds, micro_batch_size=cfg.micro_batch_size,
                         num_microbatches=cfg.eval_batches, dp_rank=dp_rank, dp_size=dp_size).step(0)
    return batches, valid


def worker(spec: dict[str, Any]) -> None:
    from megatron.core import parallel_state as ps

    from palm.train import data, loop
    from palm.train.metrics import DTYPES

    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(PretrainConfig, spec["pretrain"], "pretrain")
    validate(model, cfg)
    with loop.worker_groups(cfg):
        tokens, run_dir = Path(spec["tokens"]), Path(spec["run_dir"])
        batches, valid = load_batches(tokens, model, cfg, spec["tokenizer_sha256"], spec["data_sha256"], run_dir,
                               dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
        job = loop.Job(
            stage="pretrain", model=model, cfg=cfg, dtype=DTYPES[spec["dtype"]],
            forward_step=lm_forward_step(cfg.z_loss_weight), train_batches=batches.step,
            valid_batches=valid, tokens_per_step=cfg.global_batch * model.seq_len,
            identity=cfg.run_identity(model, spec["dtype"], spec["tokenizer_sha256"], spec["data_sha256"]),
            extra={"unigram_loss": data.unigram_loss(tokens, data.check_shards(tokens))})
        loop.train(job, RunPaths.of(spec))
