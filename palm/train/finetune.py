"""What the stages that start from another stage's model share (``sft``, ``reward``; later PPO):
the parent export, the tokenizer check between the chat data and that parent, and fixed-shape
padded micro-batches in a seeded order.

Shapes: with pipeline parallelism every micro-batch of a run has one shape (the longest row of
the data, rounded up), because the stages exchange activations through buffers megatron allocates
for one shape; without it each micro-batch is padded only to its own longest row (rounded up to
16, so only a few shapes occur), which on chat data of mostly short rows saves much of the
compute. Padding goes on the right:
attention is causal, so a real token never sees a pad after it, and the model has no padding
mask that would hide pads placed before the real tokens. Positions that are padding carry mask 0,
and whatever reads "the last token" of a row reads it at an explicit per-row index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from palm.core.config import from_dict, to_dict
from palm.core.errors import UserError
from palm.model.network import ModelConfig

PAD_ID = 0  # what pad positions hold; never attended to by a real token, never in a loss


# --- the parent model ----------------------------------------------------------------------------

def read_parent(model_dir: Path, parent_stage: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The architecture and ``config.json`` of an export (``model.safetensors``, ``config.json`` and
    the ``tokenizer.json`` it was trained with, which the child's export carries on)."""
    model_dir = Path(model_dir)
    if not all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        raise UserError(f"{model_dir}: parent model not found (model.safetensors, config.json, tokenizer.json); "
                        f"run the {parent_stage} stage first (dvc repro {parent_stage})")
    try:
        config = json.loads((model_dir / "config.json").read_text())
        cfg = from_dict(ModelConfig, config["model"], "model")
        if not isinstance(config["tokenizer_sha256"], str):
            raise TypeError("tokenizer_sha256 is not a string")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{model_dir}/config.json: not a palm model export ({type(err).__name__}: {err}); "
                        f"rerun the {parent_stage} stage (dvc repro {parent_stage})") from None
    return cfg, config


def check_tokenizer(data_dir: Path, data_meta: dict[str, Any], model_dir: Path, parent: dict[str, Any],
                    data_stage: str) -> None:
    """Refuse chat data tokenized with another tokenizer than the parent model's."""
    data_sha, model_sha = data_meta["tokenizer_sha256"], parent["tokenizer_sha256"]
    if data_sha != model_sha:
        raise UserError(f"{data_dir} was tokenized with tokenizer sha256 {data_sha[:12]}… but the parent model "
                        f"{model_dir} was trained with {model_sha[:12]}…; make both from the same tokenizer "
                        f"(dvc repro {data_stage})")


def check_fits(data_dir: Path, data_meta: dict[str, Any], model: ModelConfig, data_stage: str) -> None:
    """The data stage fitted every sequence to its ``seq_len``; the model must hold that many."""
    if int(data_meta.get("seq_len", 0)) > model.seq_len:
        raise UserError(f"{data_dir} holds sequences up to {data_meta['seq_len']} tokens but the parent model's "
                        f"seq_len is {model.seq_len}; rebuild it with model.seq_len={model.seq_len} "
                        f"(dvc repro {data_stage})")


def check_parent(data: Path, parent: Path, data_stage: str, parent_stage: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The parent export's architecture and config, after checking the chat data in ``data``
    against it: the same tokenizer, sequences that fit its context (one-line errors)."""
    from palm.data.chat import read_chat_meta

    model, config = read_parent(parent, parent_stage)
    meta = read_chat_meta(data, data_stage)
    check_tokenizer(data, meta, parent, config, data_stage)
    check_fits(data, meta, model, data_stage)
    return model, config


def load_parent(engine: Any, model_dir: Path, new: Iterable[str] = ()) -> None:
    """Load the parent's exported weights into every chunk of ``engine`` at its TP/PP layout.
    ``new`` names parameters the parent lacks (they keep their seeded initialisation)."""
    from palm.model.weights import load_safetensors

    for chunk in engine.chunks:
        load_safetensors(chunk, Path(model_dir) / "model.safetensors", new=new)
    if engine.optim is not None:
        # bf16 params train on fp32 main copies the optimizer made when it was built: refresh them
        engine.optimizer.reload_model_params()


# --- the launch and the worker's data -----------------------------------------------------------

def launch(entry: str, section: str, model: ModelConfig, cfg: Any, *, data: Path, parent: Path,
           tokenizer_sha256: str, checkpoints: Path, reports: Path, run_dir: Path, peak_flops: float,
           dtype: str = "fp32", env: dict[str, str] | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``entry`` (a worker, e.g. ``palm.train.sft:worker``) from the export ``parent`` on
    ``data`` in ``cfg.world_size`` processes; ``cfg`` is the params section ``section``. The spec
    carries the sha256 of the data and of the parent's weights: they are part of the run's
    identity, so a checkpoint of other data or another parent is never resumed. ``extra``: more
    keys for the worker's spec (e.g. which split the reward model trains on)."""
    from palm.core.io import files_sha256
    from palm.train.launch import launch as start

    spec = {"model": to_dict(model), section: to_dict(cfg), "dtype": dtype, "data": str(data),
            "parent": str(parent), "tokenizer_sha256": tokenizer_sha256, "data_sha256": files_sha256(data),
            "parent_sha256": files_sha256(parent, ["config.json", "model.safetensors"]),
            "checkpoints": str(checkpoints), "reports": str(reports), "peak_flops": peak_flops, **(extra or {})}
    return start(entry, spec, cfg, run_dir=run_dir, env=env)


def train_from_parent(stage: str, cfg: Any, ctx: Any, start: Callable[..., dict[str, Any]], *, data_stage: str,
                      parent_stage: str) -> dict[str, Any]:
    """A fine-tuning stage's training (``ctx``: its :class:`~palm.ops.stage.StageContext`, with the
    args ``data``, ``parent`` and ``checkpoints``): the data checked against the parent export and
    the layout against the model (one-line errors, before anything starts), the dtype resolved,
    then ``start(model, cfg, **run)`` (a stage's ``launch``) with its curve followed into MLflow;
    returns rank 0's result."""
    from palm.train.stage import training_start

    model, parent = check_parent(ctx.path("data"), ctx.path("parent"), data_stage, parent_stage)
    model.check_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_stages, section=stage)
    dtype, peak = training_start(stage, cfg, ctx)
    checkpoints = ctx.path("checkpoints")
    with ctx.tracker.follow(ctx.reports / "curve.csv"):
        return start(model, cfg, data=ctx.path("data"), parent=ctx.path("parent"),
                     tokenizer_sha256=parent["tokenizer_sha256"], checkpoints=checkpoints, reports=ctx.reports,
                     run_dir=checkpoints / "run", peak_flops=peak, dtype=dtype)


def train_and_valid(read_rows: Callable[[Path, str, str], list[dict]], data: Path, tokenizer_sha256: str, *,
                    what: str, who: str, data_stage: str) -> tuple[list[dict], list[dict]]:
    """The ``train`` and ``valid`` rows of a chat data folder; refuses a split without rows."""
    train, valid = read_rows(data, "train", tokenizer_sha256), read_rows(data, "valid", tokenizer_sha256)
    if not train or not valid:
        raise UserError(f"{data}: {len(train)} training and {len(valid)} validation {what}; {who} needs both "
                        f"(more data, or another {data_stage}.valid_fraction)")
    return train, valid


# --- padded micro-batches ------------------------------------------------------------------------

def pad(rows: Sequence[Sequence[int]], length: int, side: str = "right", value: int = PAD_ID) -> torch.Tensor:
    """``[len(rows), length]`` int64, each row padded with ``value`` on ``side``."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"a row of {len(row)} tokens does not fit {length}")
        if row:
            if side == "right":
                out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
    return out


def padded_length(lengths: Iterable[int], seq_len: int, multiple: int = 16) -> int:
    """The run's fixed micro-batch length: the longest row rounded up to ``multiple`` (at most
    ``seq_len``). Chat rows are mostly far shorter than the context, so this saves most of the
    compute that padding every row to ``seq_len`` would waste."""
    longest = max(lengths, default=1)
    return min(seq_len, -(-longest // multiple) * multiple)


def micro_length(lengths: Iterable[int], run_length: int, fixed: bool) -> int:
    """The padded length of one micro-batch: the run's (pipeline parallel: ``fixed``) or its own."""
    return run_length if fixed else padded_length(lengths, run_length)


class EpochOrder:
    """Row indices of a seeded shuffle, epoch after epoch: position ``p`` of the stream is row
    ``perm_{p // n}[p % n]``, each epoch its own permutation (deterministic in seed and epoch), so
    a step's micro-batches depend on the step alone and a resumed run sees the same data."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def __getitem__(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][p % self.n])

    def rows(self, step: int, *, micro_batch_size: int, num_microbatches: int, dp_rank: int,
             dp_size: int) -> list[list[int]]:
        """This DP rank's rows of optimizer step ``step``: ``num_microbatches`` lists of
        ``micro_batch_size`` indices (all DP ranks together: one contiguous run of the stream)."""
        start = (step * dp_size + dp_rank) * num_microbatches * micro_batch_size
        return [[self[start + j * micro_batch_size + i] for i in range(micro_batch_size)]
                for j in range(num_microbatches)]


def valid_rows(n: int, *, micro_batch_size: int, max_microbatches: int, dp_rank: int, dp_size: int,
               multiple: int = 1) -> list[list[int | None]]:
    """This DP rank's validation micro-batches: rows ``0 .. n-1`` in order (at most
    ``max_microbatches * micro_batch_size * dp_size`` of them), dealt to DP ranks micro-batch by
    micro-batch; ``None`` marks a padding row (loss mask 0). Every rank gets the same number of
    micro-batches, a multiple of ``multiple`` (interleaved 1F1B needs a multiple of PP)."""
    per_rank = -(-min(n, max_microbatches * micro_batch_size * dp_size) // (micro_batch_size * dp_size))
    per_rank = -(-max(per_rank, 1) // multiple) * multiple
    used = min(n, max_microbatches * micro_batch_size * dp_size)
    out = []
    for j in range(per_rank):
        first = (j * dp_size + dp_rank) * micro_batch_size
        out.append([i if i < used else None for i in range(first, first + micro_batch_size)])
    return out

