"""Supervised fine-tuning: the pretrained PaLM learns the chat template's assistant replies, the
library behind the ``sft`` stage.

Only what is particular to SFT lives here: its config section, its data (the ``sft_data`` stage's
conversations, each one row, padded to the longest of them: :mod:`palm.train.finetune`) and its objective — the next-token
negative log-likelihood on the assistant tokens only (their text and ``<|end|>``: the data's
``loss_mask``), averaged over every such token of the global batch. Training starts from the
pretrain export and resumes exactly like pretraining (the shared :mod:`palm.train.loop`); before
training, the same validation replies are scored by the parent model (``base_val_loss``), so the
report says what fine-tuning gained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from palm.core.config import from_dict, to_dict
from palm.model.network import ModelConfig
from palm.train import finetune
from palm.train.engine import Batch, OptimConfig
from palm.train.finetune import EpochOrder, micro_length, pad, padded_length, valid_rows
from palm.train.loop import RunPaths, TrainConfig, code_version

ENTRY = "palm.train.sft:worker"
CODE = ("train/finetune.py", "train/sft.py")  # with model, parallel and engine: the computation


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """The ``sft`` section of params.yaml (the training fields are :class:`TrainConfig`'s).

    Validation uses the held-out conversations in their stored order, at most ``eval_batches``
    micro-batches of them per DP rank. Fine-tuning defaults: fewer steps and a lower peak
    learning rate than pretraining, so the replies are learnt without erasing the pretraining.
    """

    train_steps: int = 150
    eval_interval: int = 50
    eval_batches: int = 11
    checkpoint_interval: int = 50
    optim: OptimConfig = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)

    def run_identity(self, model: ModelConfig, dtype: str, tokenizer_sha256: str, data_sha256: str,
                     parent_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        return {"model": to_dict(model), **self.identity(dtype), "eval_batches": self.eval_batches,
                "tokenizer_sha256": tokenizer_sha256, "data_sha256": data_sha256,
                "parent_sha256": parent_sha256, "code": code_version(*CODE)}


def validate(model: ModelConfig, cfg: SFTConfig) -> None:
    """Refuse layouts the model cannot be split into (errors name the fields)."""
    model.check_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_stages, section="sft")


# --- the objective -------------------------------------------------------------------------------

def sft_forward_step():
    """Next-token NLL summed over the assistant tokens of a micro-batch ``{"tokens", "labels",
    "loss_mask"}`` (each ``[b, s]``; ``loss_mask`` is 1 where the label is an assistant token)."""

    def step(batch: Batch, model: torch.nn.Module):
        output = model(batch["tokens"], labels=batch["labels"])  # (nll, logz) on the last stage

        def loss_func(out: tuple[torch.Tensor, torch.Tensor]):
            nll, _ = out  # [b, s] fp32
            mask = batch["loss_mask"].float()
            count = mask.sum()
            return (nll * mask).sum(), count, {}

        return output, loss_func

    return step


def conversation_batch(rows: list[dict | None], seq_len: int) -> Batch:
    """One micro-batch of conversations (``input_ids``, ``loss_mask`` lists; ``None`` = a padding
    row): position ``t`` reads token ``t`` and predicts token ``t+1``, so the label at ``t`` counts
    when token ``t+1`` is an assistant token. Padded on the right to ``seq_len``."""
    ids = [r["input_ids"] if r is not None else [] for r in rows]
    masks = [r["loss_mask"] if r is not None else [] for r in rows]
    return {"tokens": pad([i[:-1] for i in ids], seq_len), "labels": pad([i[1:] for i in ids], seq_len),
            "loss_mask": pad([m[1:] for m in masks], seq_len, value=0).float()}


class Conversations:
    """This DP rank's training micro-batches of each step, from the training conversations."""

    def __init__(self, rows: list[dict], cfg: SFTConfig, seq_len: int, dp_rank: int, dp_size: int):
        self.rows, self.cfg, self.seq_len = rows, cfg, seq_len
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = EpochOrder(len(rows), cfg.seed)

    def step(self, step: int) -> list[Batch]:
        picks = self.order.rows(step, micro_batch_size=self.cfg.micro_batch_size,
                                num_microbatches=self.cfg.num_microbatches, dp_rank=self.dp_rank,
                                dp_size=self.dp_size)
        return [batch([self.rows[i] for i in micro], self.seq_len, self.cfg) for micro in picks]


def batch(rows: list[dict | None], run_length: int, cfg: SFTConfig) -> Batch:
    lengths = (len(r["input_ids"]) - 1 for r in rows if r is not None)
    return conversation_batch(rows, micro_length(lengths, run_length, cfg.pipeline_parallel > 1))


def validation(rows: list[dict], cfg: SFTConfig, seq_len: int, dp_rank: int, dp_size: int) -> list[Batch]:
    picks = valid_rows(len(rows), micro_batch_size=cfg.micro_batch_size, max_microbatches=cfg.eval_batches,
                       dp_rank=dp_rank, dp_size=dp_size,
                       multiple=cfg.pipeline_parallel if cfg.virtual_stages > 1 else 1)
    return [batch([rows[i] if i is not None else None for i in micro], seq_len, cfg) for micro in picks]


def read_rows(data: Path, split: str, tokenizer_sha256: str) -> list[dict]:
    from palm.data.chat import load_sft

    return load_sft(data, split, tokenizer_sha256).select(["input_ids", "loss_mask"]).to_pylist()


# --- the stage side ------------------------------------------------------------------------------

def launch(model: ModelConfig, cfg: SFTConfig, **run: Any) -> dict[str, Any]:
    """Fine-tune the export ``run["parent"]`` on the conversations in ``run["data"]`` (``run``:
    the keywords of :func:`palm.train.finetune.launch`); returns rank 0's result."""
    validate(model, cfg)
    return finetune.launch(ENTRY, "sft", model, cfg, **run)


# --- the worker side: one training process -------------------------------------------------------

def worker(spec: dict[str, Any]) -> None:
    from megatron.core import parallel_state as ps

    from palm.train import loop
    from palm.train.metrics import DTYPES

    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(SFTConfig, spec["sft"], "sft")
    validate(model, cfg)
    with loop.worker_groups(cfg):
        data, parent, sha = Path(spec["data"]), Path(spec["parent"]), spec["tokenizer_sha256"]
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        train_rows, valid = finetune.train_and_valid(read_rows, data, sha, what="conversations", who="SFT",
                                                     data_stage="sft_data")
        # the run's longest input (a conversation without its last token): with PP every micro-batch's
        # length, without it the most any micro-batch pads to
        length = padded_length((len(r["input_ids"]) - 1 for r in train_rows + valid), model.seq_len)
        batches = Conversations(train_rows, cfg, length, dp_rank, dp_size)
        valid_batches = validation(valid, cfg, length, dp_rank, dp_size)

        def init_weights(engine) -> dict[str, Any]:
            finetune.load_parent(engine, parent)
            return {"base_val_loss": engine.evaluate(valid_batches)["loss"]}

        used = min(len(valid), cfg.eval_batches * cfg.micro_batch_size * dp_size)
        job = loop.Job(
            stage="sft", model=model, cfg=cfg, dtype=DTYPES[spec["dtype"]], forward_step=sft_forward_step(),
            train_batches=batches.step, valid_batches=valid_batches,
            # tokens/s and MFU count the conversations' tokens, not the padding
            tokens_per_step=round(cfg.global_batch * sum(len(r["input_ids"]) - 1 for r in train_rows) / len(train_rows)),
            seq_len=length,
            identity=cfg.run_identity(model, spec["dtype"], sha, spec["data_sha256"], spec["parent_sha256"]),
            init_weights=init_weights,
            extra={"train_conversations": len(train_rows), "valid_conversations": used, "padded_length": length})
        loop.train(job, RunPaths.of(spec))
