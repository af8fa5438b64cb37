"""Direct preference optimisation and its kin: the library behind the ``dpo`` stage.

The policy learns from the ``prefs`` stage's pairs directly, with no reward model and no sampling:
offline, one forward and backward over each pair's two replies, like the reward model's training.

The losses (pure functions over per-sequence log-probs ``[P]``, ``P`` pairs; :func:`preference_loss`)
are written as the papers give them and as TRL's ``DPOTrainer.dpo_loss`` / ``CPOTrainer`` compute
them, with ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

==========  ==============================================  ============================================
``loss``    per pair                                        reference
==========  ==============================================  ============================================
sigmoid     ``-log sigmoid(beta h)``                        DPO, Rafailov et al. 2023, eq. 7
cdpo        ``-(1-e) log sigmoid(beta h) - e log            conservative DPO (Mitchell 2023, "A note on
            sigmoid(-beta h)``, ``e = label_smoothing``     DPO with noisy preferences"): ``e`` of the
                                                            labels assumed flipped
ipo         ``(h - 1/(2 beta))^2`` on log-probs averaged    IPO, Azar et al. 2023, eq. 17 (the average
            over each reply's tokens                        per token, as TRL computes it)
simpo       ``-log sigmoid(beta (a(y_w) - a(y_l)) -         SimPO, Meng et al. 2024, eq. 6: ``a`` the
            gamma)``                                        mean log-prob per token; reference-free
==========  ==============================================  ============================================

The metrics are the ones TRL users watch: the implicit rewards ``beta (log pi - log pi_ref)`` of the
chosen and rejected replies (``rewards_chosen``, ``rewards_rejected``; SimPO: ``beta a(y)``), their
mean difference ``margin`` and ``accuracy``, the share of pairs whose chosen reply has the higher
implicit reward. On the held-out pairs ``val_accuracy`` is DPO's preference accuracy.

The reference is the parent (the SFT export), frozen: its log-probs of each step's micro-batches
come from a forward pass of a frozen copy, or, with ``lora``, of the policy itself with its adapters
off (one copy of the weights). SimPO needs none. A micro-batch holds ``P`` pairs as ``2P`` rows,
the chosen replies first, then the rejected (as the reward model's batches), so a pair's loss is
complete in one forward; ``micro_batch_size`` counts sequences.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from palm.core.config import check, from_dict, to_dict
from palm.model.network import ModelConfig
from palm.train import finetune, reward
from palm.train.engine import Batch, Engine, OptimConfig, metric
from palm.train.finetune import micro_length, pad, padded_length
from palm.train.loop import RunPaths, code_version
from palm.train.reward import PairConfig

ENTRY = "palm.train.dpo:worker"
CODE = ("train/finetune.py", "train/reward.py", "train/dpo.py")  # with model, parallel and engine: the computation
LOSSES = ("sigmoid", "cdpo", "ipo", "simpo")


@dataclasses.dataclass(frozen=True)
class DPOConfig(PairConfig):
    """The ``dpo`` section of params.yaml (the training fields are :class:`TrainConfig`'s; pairs as
    the reward model takes them, :class:`~palm.train.reward.PairConfig`).

    Validation uses the held-out pairs in their stored order, at most ``eval_batches`` micro-batches
    per DP rank.
    """

    train_steps: int = 150
    eval_interval: int = 50
    eval_batches: int = 34
    checkpoint_interval: int = 50
    # sigmoid (DPO), cdpo (with label_smoothing), ipo, or simpo (reference-free, length-normalised)
    loss: Literal["sigmoid", "cdpo", "ipo", "simpo"] = "sigmoid"
    beta: float = 0.5  # the KL strength (DPO, cDPO, IPO) or SimPO's reward scale
    label_smoothing: float = 0.0  # cdpo: the share of preference labels taken to be flipped, in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma
    optim: OptimConfig = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.loss == "cdpo" or self.label_smoothing == 0, "label_smoothing",
              f"applies to loss: cdpo only (loss is {self.loss}); set loss: cdpo or label_smoothing: 0")
        check(self.simpo_gamma >= 0, "simpo_gamma", f"must be >= 0, got {self.simpo_gamma}")

    @property
    def reference_free(self) -> bool:
        return self.loss == "simpo"

    def objective(self) -> dict[str, Any]:
        """The loss and its constants: what the export records and the run identity holds."""
        return {"loss": self.loss, "beta": self.beta, "label_smoothing": self.label_smoothing,
                "simpo_gamma": self.simpo_gamma}

    def run_identity(self, model: ModelConfig, dtype: str, tokenizer_sha256: str, data_sha256: str,
                     parent_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        return {"model": to_dict(model), **self.identity(dtype), "eval_batches": self.eval_batches,
                **self.objective(), "tokenizer_sha256": tokenizer_sha256, "data_sha256": data_sha256,
                "parent_sha256": parent_sha256, "code": code_version(*CODE)}


def validate(model: ModelConfig, cfg: DPOConfig) -> None:
    """Refuse layouts the model cannot be split into (errors name the fields)."""
    model.check_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.virtual_stages, section="dpo")


# --- the losses ----------------------------------------------------------------------------------

def preference_loss(kind: str, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, *, beta: float, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.0, chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss ``[P]`` and the implicit rewards of the chosen and rejected replies ``[P]``.

    ``chosen``, ``rejected``: the policy's summed log-probs of each reply's tokens; ``ref_*`` the
    reference's (unused, may be None, for simpo); ``*_tokens``: each reply's token count (ipo and
    simpo work on the mean log-prob per token)."""
    if kind in ("ipo", "simpo"):
        chosen, rejected = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        if kind == "ipo":
            ref_chosen = ref_chosen / chosen_tokens.clamp(min=1)
            ref_rejected = ref_rejected / rejected_tokens.clamp(min=1)
    if kind == "simpo":
        reward_c, reward_r = beta * chosen, beta * rejected
        return -F.logsigmoid(reward_c - reward_r - simpo_gamma), reward_c, reward_r
    log_ratio_c, log_ratio_r = chosen - ref_chosen, rejected - ref_rejected
    h = log_ratio_c - log_ratio_r
    reward_c, reward_r = beta * log_ratio_c, beta * log_ratio_r
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)).square(), reward_c, reward_r
    if kind in ("sigmoid", "cdpo"):
        eps = label_smoothing if kind == "cdpo" else 0.0
        return -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h), reward_c, reward_r
    raise ValueError(f"unknown preference loss {kind!r} ({', '.join(LOSSES)})")


def sequence_logp(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each row's reply tokens: ``nll [b, s]``, ``mask [b, s]`` -> ``[b]``."""
    return -(nll.float() * mask).sum(dim=1)


def dpo_forward_step(cfg: DPOConfig, vocab: int):
    """The preference loss of a micro-batch ``{"tokens", "labels", "loss_mask" [2P, s],
    "pair_mask" [P], "ref_logp" [2P]}`` (chosen rows first), summed over its real pairs. Log-probs
    are over the ``vocab`` real tokens (the embedding's padding rows excluded), the distribution
    the policy samples from."""

    def step(batch: Batch, model: torch.nn.Module):
        output = model(batch["tokens"], labels=batch["labels"], vocab=vocab)  # (nll, logz) on the last stage

        def loss_func(out: tuple[torch.Tensor, torch.Tensor]):
            nll, _ = out
            mask = batch["loss_mask"]
            logp, count = sequence_logp(nll, mask), mask.sum(dim=1)
            p = logp.shape[0] // 2
            ref = batch.get("ref_logp")
            loss, reward_c, reward_r = preference_loss(
                cfg.loss, logp[:p], logp[p:], None if ref is None else ref[:p], None if ref is None else ref[p:],
                beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                chosen_tokens=count[:p], rejected_tokens=count[p:])
            w = batch["pair_mask"].float()
            pairs = w.sum()
            gap = reward_c - reward_r
            metrics = {"rewards_chosen": metric((reward_c * w).sum(), pairs),
                       "rewards_rejected": metric((reward_r * w).sum(), pairs),
                       "margin": metric((gap * w).sum(), pairs),
                       "accuracy": metric(((gap > 0).float() * w).sum(), pairs),
                       "logps_chosen": metric((logp[:p] * w).sum(), pairs),
                       "logps_rejected": metric((logp[p:] * w).sum(), pairs)}
            return (loss * w).sum(), pairs, metrics

        return output, loss_func

    return step


def reference_step(vocab: int):
    """The reference's summed log-prob of each row's reply ``[2P]`` (over the ``vocab`` real tokens)."""

    def step(batch: Batch, model: torch.nn.Module):
        output = model(batch["tokens"], labels=batch["labels"], vocab=vocab)
        return output, lambda out: {"logp": sequence_logp(out[0], batch["loss_mask"])}

    return step


# --- data ----------------------------------------------------------------------------------------

def pair_batch(rows: list[dict | None], length: int) -> Batch:
    """One micro-batch of pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``; ``None`` = a
    padding pair): the chosen sequences, then the rejected, each ``prompt + reply`` right-padded to
    ``length + 1`` tokens and shifted: position ``t`` reads token ``t`` and predicts ``t + 1``, which
    counts when it is a reply token."""
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for r in rows:
            if r is None:
                seqs.append([])
                masks.append([])
                continue
            seqs.append(list(r["prompt_ids"]) + list(r[side]))
            masks.append([0] * len(r["prompt_ids"]) + [1] * len(r[side]))
    return {"tokens": pad([s[:-1] for s in seqs], length), "labels": pad([s[1:] for s in seqs], length),
            "loss_mask": pad([m[1:] for m in masks], length, value=0).float(),
            "pair_mask": torch.tensor([float(r is not None) for r in rows])}


def _inputs(rows: list[dict]) -> "Any":
    return (len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) - 1 for r in rows)


def batch(rows: list[dict | None], run_length: int, cfg: DPOConfig) -> Batch:
    return pair_batch(rows, micro_length(_inputs([r for r in rows if r is not None]), run_length,
                                         cfg.pipeline_parallel > 1))


def validation(rows: list[dict], cfg: DPOConfig, seq_len: int, dp_rank: int, dp_size: int) -> list[Batch]:
    return reward.validation(rows, cfg, seq_len, dp_rank, dp_size, make=batch)


class Reference:
    """The reference's log-probs of micro-batches, added to them as ``ref_logp``: a frozen copy of
    the parent, or (LoRA) the policy engine with its adapters off; nothing for SimPO."""

    def __init__(self, forward: Callable[[list[Batch], Any], list[dict[str, torch.Tensor]]] | None, vocab: int = 0):
        self.forward, self.step = forward, reference_step(vocab)

    def attach(self, batches: list[Batch]) -> list[Batch]:
        if self.forward is not None:
            for b, out in zip(batches, self.forward(batches, self.step)):
                b["ref_logp"] = out["logp"].float().cpu()
        return batches


# --- the stage side ------------------------------------------------------------------------------

def launch(model: ModelConfig, cfg: DPOConfig, **run: Any) -> dict[str, Any]:
    """Train the export ``run["parent"]`` on the preference pairs in ``run["data"]`` (``run``: the
    keywords of :func:`palm.train.finetune.launch`); returns rank 0's result."""
    validate(model, cfg)
    return finetune.launch(ENTRY, "dpo", model, cfg, **run)


# --- the worker side: one training process -------------------------------------------------------

def reference_for(cfg: DPOConfig, model: ModelConfig, parent: Path, engine: Engine, dtype: torch.dtype) -> Reference:
    """The reference of this run: none (simpo), the policy with adapters off (lora), or a frozen
    copy of the parent."""
    if cfg.reference_free:
        return Reference(None)
    if getattr(cfg, "lora", None) is not None:
        from palm.model.lora import AdaptersOff

        return Reference(AdaptersOff(engine).forward, model.vocab_size)
    frozen = Engine(model, None, micro_batch_size=cfg.micro_batch_size, dtype=dtype, seed=cfg.seed)
    finetune.load_parent(frozen, parent)
    return Reference(frozen.forward, model.vocab_size)


def worker(spec: dict[str, Any]) -> None:
    from megatron.core import parallel_state as ps

    from palm.train import loop
    from palm.train.metrics import DTYPES

    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(DPOConfig, spec["dpo"], "dpo")
    validate(model, cfg)
    dtype = DTYPES[spec["dtype"]]
    with loop.worker_groups(cfg):
        data, parent, sha = Path(spec["data"]), Path(spec["parent"]), spec["tokenizer_sha256"]
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        train_rows, valid = finetune.train_and_valid(reward.read_rows, data, sha, what="pairs", who="DPO",
                                                     data_stage="prefs")
        length = padded_length(_inputs(train_rows + valid), model.seq_len)
        pairs = reward.Pairs(train_rows, cfg, length, dp_rank, dp_size, make=batch)
        valid_batches = validation(valid, cfg, length, dp_rank, dp_size)
        reference = Reference(None)

        def init_weights(engine: Engine) -> dict[str, Any]:
            nonlocal reference
            finetune.load_parent(engine, parent)
            reference = reference_for(cfg, model, parent, engine, dtype)
            reference.attach(valid_batches)  # the reference is frozen: its held-out log-probs once
            base = engine.evaluate(valid_batches)  # the parent as the policy: every implicit reward 0
            return {"base_val_loss": base["loss"]}

        used = min(len(valid), cfg.eval_batches * cfg.pairs_per_micro_batch * dp_size)
        job = loop.Job(
            stage="dpo", model=model, cfg=cfg, dtype=dtype, forward_step=dpo_forward_step(cfg, model.vocab_size),
            train_batches=lambda step: reference.attach(pairs.step(step)), valid_batches=valid_batches,
            # tokens/s and MFU count the pairs' tokens, not the padding
            tokens_per_step=round(cfg.pairs_per_micro_batch * cfg.num_microbatches * cfg.data_parallel * sum(
                2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows)
                / len(train_rows)),
            seq_len=length,
            identity=cfg.run_identity(model, spec["dtype"], sha, spec["data_sha256"], spec["parent_sha256"]),
            init_weights=init_weights, perplexity=False,
            curve_metrics=("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected"),
            extra={"train_pairs": len(train_rows), "valid_pairs": used, "padded_length": length,
                   "loss_type": cfg.loss})
        loop.train(job, RunPaths.of(spec))

