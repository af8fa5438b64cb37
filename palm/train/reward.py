"""The reward model: PaLM with a scalar head, trained on preference pairs (the ``reward`` stage).

The network is :class:`palm.model.reward.RewardModel`; the reward of a sequence is its scalar at
the last real token (:func:`~palm.model.reward.read_rewards`), never at a padding position.

Objective (Bradley-Terry, as in InstructGPT / Ouyang et al. 2022): for a prompt with a chosen and
a rejected reply, ``-log sigmoid(r_chosen - r_rejected - margin)``, averaged over the pairs of the
global batch. Both sides of a pair sit in the same micro-batch (the first half of its rows are the
chosen sides, the second half the rejected ones, pair ``i`` at rows ``i`` and ``P + i``), so the
loss of a pair is complete in one forward. ``micro_batch_size`` counts sequences: two per pair.

After training the stage scores every training sequence with the exported model
(:func:`reward_stats`, ``Engine.forward``) and saves the mean and standard deviation in the
export's ``config.json``, for PPO to normalise rewards with.

Two stages train this objective (:func:`train_and_export`): ``reward``, the proxy PPO maximises,
on the ``train`` split of ``prefs``; ``gold_reward``, the gold judge of ``evaluate`` (Gao et al.
2022's proxy/gold set-up), on the ``gold`` split, which neither the proxy nor PPO ever sees. Both
validate on ``valid``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from palm.core.config import check, from_dict, to_dict
from palm.core.errors import UserError
from palm.model import parallel
from palm.model.network import ModelConfig
from palm.model.reward import HEAD, RewardModel, read_rewards
from palm.train import finetune
from palm.train.engine import Batch, OptimConfig, metric
from palm.train.finetune import EpochOrder, micro_length, pad, padded_length, valid_rows
from palm.train.loop import RunPaths, TrainConfig, code_version

ENTRY = "palm.train.reward:worker"
CODE = ("model/reward.py", "train/finetune.py", "train/reward.py")  # with model, parallel and engine: the computation


@dataclasses.dataclass(frozen=True)
class PairConfig(TrainConfig):
    """A section that trains on preference pairs (``reward``, ``dpo``): ``micro_batch_size`` counts
    sequences, two per pair (so it must be even), the chosen and the rejected side by side."""

    micro_batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.micro_batch_size % 2 == 0, "micro_batch_size",
              f"counts sequences, two per pair: must be even, got {self.micro_batch_size}")

    @property
    def pairs_per_micro_batch(self) -> int:
        return self.micro_batch_size // 2


@dataclasses.dataclass(frozen=True)
class RewardConfig(PairConfig):
    """The ``reward`` section of params.yaml (the training fields are :class:`TrainConfig`'s).

    Validation uses the held-out pairs in their stored order, at most ``eval_batches`` micro-batches
    per DP rank.
    """

    train_steps: int = 250
    eval_interval: int = 50
    eval_batches: int = 34
    checkpoint_interval: int = 50
    margin: float = 0.0  # required reward gap: loss -log sigmoid(r_chosen - r_rejected - margin)
    stats_batch_size: int = 32  # sequences per forward when scoring the training set afterwards
    stats_pairs: int = 1024  # training pairs scored for the reward mean/std (a seeded sample); 0 = all
    optim: OptimConfig = OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=10)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        check(self.stats_batch_size >= 1, "stats_batch_size", f"must be >= 1, got {self.stats_batch_size}")
        check(self.stats_pairs >= 0, "stats_pairs", f"must be >= 0 (0: all), got {self.stats_pairs}")

    def run_identity(self, model: ModelConfig, dtype: str, tokenizer_sha256: str, data_sha256: str,
                     parent_sha256: str, split: str = "train") -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        return {"model": to_dict(model), **self.identity(dtype), "eval_batches": self.eval_batches,
                "margin": self.margin, "tokenizer_sha256": tokenizer_sha256, "data_sha256": data_sha256,
                "parent_sha256": parent_sha256, "split": split, "code": code_version(*CODE)}


def validate(model: ModelConfig, cfg: RewardConfig, section: str = "reward") -> None:
    """Refuse layouts the model cannot be split into (errors name the fields)."""
    model.check_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_stages, section=section)


# --- the objective -------------------------------------------------------------------------------

def pairwise(rewards: torch.Tensor, pair_mask: torch.Tensor, margin: float = 0.0):
    """Bradley-Terry loss summed over the pairs of a micro-batch whose rows are ``[chosen_0 ..
    chosen_{P-1}, rejected_0 .. rejected_{P-1}]``; returns ``(loss_sum, pairs, correct, gap_sum)``
    with ``correct`` counting pairs where the chosen reply scores strictly higher."""
    p = rewards.shape[0] // 2
    gap = rewards[:p] - rewards[p:]
    w = pair_mask.float()
    loss = (-F.logsigmoid(gap - margin) * w).sum()
    return loss, w.sum(), ((gap > 0).float() * w).sum(), (gap * w).sum()


def reward_forward_step(margin: float = 0.0):
    """Pairwise loss of a micro-batch ``{"tokens" [2P, s], "last" [2P], "pair_mask" [P]}``;
    reports ``accuracy`` (share of pairs ranked right) and ``margin`` (mean r_chosen - r_rejected)."""

    def step(batch: Batch, model: torch.nn.Module):
        output = model(batch["tokens"])  # [2P, s] scalars on the last stage

        def loss_func(values: torch.Tensor):
            loss, pairs, correct, gap = pairwise(read_rewards(values, batch["last"]), batch["pair_mask"], margin)
            return loss, pairs, {"accuracy": metric(correct, pairs), "margin": metric(gap, pairs)}

        return output, loss_func

    return step


def pair_batch(rows: list[dict | None], seq_len: int, side: str = "right") -> Batch:
    """One micro-batch of pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``; ``None`` = a
    padding pair): chosen sides first, then rejected, each ``prompt + reply`` padded on ``side``
    to ``seq_len``, with the index of its last real token."""
    seqs = ([r["prompt_ids"] + r["chosen_ids"] if r is not None else [] for r in rows]
            + [r["prompt_ids"] + r["rejected_ids"] if r is not None else [] for r in rows])
    lengths = torch.tensor([len(s) for s in seqs])
    last = (lengths - 1).clamp(min=0) if side == "right" else torch.full_like(lengths, seq_len - 1)
    return {"tokens": pad(seqs, seq_len, side), "last": last,
            "pair_mask": torch.tensor([float(r is not None) for r in rows])}


class Pairs:
    """This DP rank's training micro-batches of each step, from the training pairs; ``make`` builds
    a micro-batch of pairs (the reward model's :func:`batch`, or DPO's)."""

    def __init__(self, rows: list[dict], cfg: PairConfig, seq_len: int, dp_rank: int, dp_size: int,
                 make: Callable[[list[dict | None], int, Any], Batch] | None = None):
        self.rows, self.cfg, self.seq_len, self.make = rows, cfg, seq_len, make or batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = EpochOrder(len(rows), cfg.seed)

    def step(self, step: int) -> list[Batch]:
        picks = self.order.rows(step, micro_batch_size=self.cfg.pairs_per_micro_batch,
                                num_microbatches=self.cfg.num_microbatches, dp_rank=self.dp_rank,
                                dp_size=self.dp_size)
        return [self.make([self.rows[i] for i in micro], self.seq_len, self.cfg) for micro in picks]


def batch(rows: list[dict | None], run_length: int, cfg: RewardConfig) -> Batch:
    lengths = (len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows if r is not None)
    return pair_batch(rows, micro_length(lengths, run_length, cfg.pipeline_parallel > 1))


def validation(rows: list[dict], cfg: PairConfig, seq_len: int, dp_rank: int, dp_size: int,
               make: Callable[[list[dict | None], int, Any], Batch] | None = None) -> list[Batch]:
    picks = valid_rows(len(rows), micro_batch_size=cfg.pairs_per_micro_batch, max_microbatches=cfg.eval_batches,
                       dp_rank=dp_rank, dp_size=dp_size,
                       multiple=cfg.pipeline_parallel if cfg.virtual_stages > 1 else 1)
    return [(make or batch)([rows[i] if i is not None else None for i in micro], seq_len, cfg) for micro in picks]


COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def read_rows(data: Path, split: str, tokenizer_sha256: str, columns: Sequence[str] = COLUMNS) -> list[dict]:
    from palm.data.chat import load_prefs

    return load_prefs(data, split, tokenizer_sha256).select(list(columns)).to_pylist()


def training_pairs(data: Path, split: str, tokenizer_sha256: str) -> tuple[list[dict], list[dict]]:
    """The pairs of ``split`` (``train``: the proxy's, ``gold``: the gold reward model's) and of
    ``valid``; one-line errors when either is empty."""
    if split == "train":
        return finetune.train_and_valid(read_rows, data, tokenizer_sha256, what="pairs", who="the reward model",
                                        data_stage="prefs")
    rows, valid = read_rows(data, split, tokenizer_sha256), read_rows(data, "valid", tokenizer_sha256)
    if not rows:
        raise UserError(f"{data}: no {split} pairs for the gold reward model; set prefs.gold_fraction above 0 "
                        "(then dvc repro prefs)")
    if not valid:
        raise UserError(f"{data}: no validation pairs; more data, or another prefs.valid_fraction")
    return rows, valid


def pair_length(rows: list[dict], seq_len: int) -> int:
    return padded_length((len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows),
                         seq_len)


# --- after training: the reward scale, for PPO ---------------------------------------------------

@torch.no_grad()
def reward_stats(model_dir: Path, rows: list[dict], *, batch_size: int = 32,
                 valid: Sequence[dict] = (), sample: int = 0, seed: int = 0) -> dict[str, Any]:
    """Score every distinct training sequence (prompt + chosen, prompt + rejected) with the export
    in ``model_dir``, here in one process (``Engine.forward``): the rewards' mean and standard
    deviation, and the training pairs' accuracy. ``sample > 0``: only that many training pairs, a
    seeded sample (a mean and std to normalise with need far fewer sequences than a training
    set holds). Pairs of ``valid`` that carry a ``kind`` are scored too:
    ``val_accuracy_<kind>`` per kind (e.g. the default data's three kinds)."""
    import random

    from palm.model.weights import load_safetensors
    from palm.train.engine import Engine

    if 0 < sample < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), sample))]
    config_cfg = _export_model(model_dir)
    sides = ("chosen_ids", "rejected_ids")
    train_seqs = {tuple(r["prompt_ids"] + r[side]) for r in rows for side in sides}
    kinded = [r for r in valid if r.get("kind")]
    # sorted by length: each forward pads only to its longest row
    seqs = sorted(train_seqs | {tuple(r["prompt_ids"] + r[side]) for r in kinded for side in sides}, key=len)
    with parallel.process_groups():
        engine = Engine(config_cfg, None, chunk=RewardModel, micro_batch_size=batch_size)
        for chunk in engine.chunks:
            load_safetensors(chunk, Path(model_dir) / "model.safetensors")
        batches = []
        for i in range(0, len(seqs), batch_size):
            part = seqs[i:i + batch_size]
            batches.append({"tokens": pad(part, len(part[-1])), "last": torch.tensor([len(s) - 1 for s in part])})

        def step(batch: Batch, model: torch.nn.Module):
            return model(batch["tokens"]), lambda values: {"reward": read_rewards(values, batch["last"])}

        rewards = torch.cat([d["reward"] for d in engine.forward(batches, step)]).double()
    score = dict(zip(seqs, rewards.tolist()))

    def right(r: dict) -> bool:
        return score[tuple(r["prompt_ids"] + r["chosen_ids"])] > score[tuple(r["prompt_ids"] + r["rejected_ids"])]

    train = torch.tensor([score[s] for s in train_seqs], dtype=torch.float64)
    out = {"reward_mean": train.mean().item(), "reward_std": train.std(correction=0).item(),
           "reward_sequences": len(train_seqs), "reward_pairs": len(rows),
           "train_accuracy": sum(map(right, rows)) / max(len(rows), 1)}
    for kind in sorted({r["kind"] for r in kinded}):
        of_kind = [r for r in kinded if r["kind"] == kind]
        out[f"val_accuracy_{kind}"] = sum(map(right, of_kind)) / len(of_kind)
        out[f"valid_pairs_{kind}"] = len(of_kind)
    return out


def _export_model(model_dir: Path) -> ModelConfig:
    import json

    return from_dict(ModelConfig, json.loads((Path(model_dir) / "config.json").read_text())["model"], "model")


# --- the stage side ------------------------------------------------------------------------------

def launch(model: ModelConfig, cfg: RewardConfig, *, split: str = "train", stage: str = "reward",
           **run: Any) -> dict[str, Any]:
    """Train a reward model from the export ``run["parent"]`` on the ``split`` pairs in
    ``run["data"]`` (``run``: the keywords of :func:`palm.train.finetune.launch`); ``stage``: the
    params section and stage name errors and logs give. Returns rank 0's result."""
    validate(model, cfg, stage)
    return finetune.launch(ENTRY, "reward", model, cfg, extra={"split": split, "stage": stage}, **run)


def train_and_export(cfg: RewardConfig, ctx: Any, *, split: str = "train",
                     stage: str = "reward") -> dict[str, Any]:
    """A reward stage's body (``ctx``: its :class:`~palm.ops.stage.StageContext`; args ``data``,
    ``parent``, ``checkpoints``, ``out``): train on the ``split`` pairs from the SFT export, export
    into ``--out`` with ``"kind": "reward"``, ``"split"`` and the reward mean and std over the
    ``split`` sequences (what PPO and evaluate normalise with); returns the metrics."""
    import json

    from palm.data.chat import read_chat_meta
    from palm.data.rankings import run_tags
    from palm.train.stage import exported, training_start

    data, parent_dir = ctx.path("data"), ctx.path("parent")
    model, parent = finetune.check_parent(data, parent_dir, "prefs", "sft")
    sha = parent["tokenizer_sha256"]
    tags = run_tags(read_chat_meta(data, "prefs"))  # the human rankings behind the pairs
    if tags:
        ctx.tracker.set_tags(tags)
    validate(model, cfg, stage)
    training_pairs(data, split, sha)  # an empty split: one line now, not after the workers started
    dtype, peak = training_start(stage, cfg, ctx)
    checkpoints = ctx.path("checkpoints")
    with ctx.tracker.follow(ctx.reports / "curve.csv"):
        result = launch(model, cfg, split=split, stage=stage, data=data, parent=parent_dir, tokenizer_sha256=sha,
                        checkpoints=checkpoints, reports=ctx.reports, run_dir=checkpoints / "run", peak_flops=peak,
                        dtype=dtype)
    with exported(ctx, result, parent_dir / "tokenizer.json", {
            "kind": "reward", "split": split, "parent": str(ctx.args.parent), "head": HEAD, "margin": cfg.margin,
            "metrics": {k: result[k] for k in ("val_loss", "val_accuracy", "val_margin")}},
            chunk=RewardModel) as (out, config):
        stats = reward_stats(out, read_rows(data, split, sha), batch_size=cfg.stats_batch_size,
                             valid=read_rows(data, "valid", sha, [*COLUMNS, "kind"]), sample=cfg.stats_pairs,
                             seed=cfg.seed)
        config["reward"] = {"mean": stats["reward_mean"], "std": stats["reward_std"],
                            "sequences": stats["reward_sequences"]}
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {**{k: v for k, v in result.items() if k != "checkpoint"}, **stats}


# --- the worker side: one training process -------------------------------------------------------

def worker(spec: dict[str, Any]) -> None:
    from megatron.core import parallel_state as ps

    from palm.train import loop
    from palm.train.metrics import DTYPES

    split, stage = spec.get("split", "train"), spec.get("stage", "reward")
    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(RewardConfig, spec["reward"], stage)
    validate(model, cfg, stage)
    with loop.worker_groups(cfg):
        data, parent, sha = Path(spec["data"]), Path(spec["parent"]), spec["tokenizer_sha256"]
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        train_rows, valid = training_pairs(data, split, sha)
        length = pair_length(train_rows + valid, model.seq_len)
        batches = Pairs(train_rows, cfg, length, dp_rank, dp_size)
        valid_batches = validation(valid, cfg, length, dp_rank, dp_size)

        def init_weights(engine) -> dict[str, Any]:
            finetune.load_parent(engine, parent, new=[HEAD])  # the head starts from its seeded init
            base = engine.evaluate(valid_batches)
            return {"base_val_accuracy": base["accuracy"], "base_val_loss": base["loss"]}

        used = min(len(valid), cfg.eval_batches * cfg.pairs_per_micro_batch * dp_size)
        job = loop.Job(
            stage=stage, model=model, cfg=cfg, dtype=DTYPES[spec["dtype"]], chunk=RewardModel,
            forward_step=reward_forward_step(cfg.margin), train_batches=batches.step, valid_batches=valid_batches,
            # tokens/s and MFU count the pairs' tokens, not the padding
            tokens_per_step=round(cfg.pairs_per_micro_batch * cfg.num_microbatches * cfg.data_parallel * sum(
                2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows)
                / len(train_rows)),
            seq_len=length,
            identity=cfg.run_identity(model, spec["dtype"], sha, spec["data_sha256"], spec["parent_sha256"], split),
            init_weights=init_weights, curve_metrics=("loss", "accuracy"), perplexity=False,
            lora_trainable=(HEAD,),  # with lora: the new head trains whole beside the adapters
            extra={"train_pairs": len(train_rows), "valid_pairs": used, "padded_length": length})
        loop.train(job, RunPaths.of(spec))
