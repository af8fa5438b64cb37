"""RLHF with PPO (or GRPO) on the shared training engine: the library behind the ``ppo`` stage.

Four roles, each an :class:`~palm.train.engine.Engine` at the run's TP x DP layout:

==========  ============================  =====================================================
role        from                          how it is used
==========  ============================  =====================================================
actor       ``models/sft`` (PaLM)         samples the rollouts (KV-cached :func:`generate`); an
                                          objective on the engine (clipped policy loss,
                                          entropy bonus; GRPO: + the KL term)
critic      ``models/reward``             value head per position (:class:`RewardModel`); an
            (RewardModel)                 objective on the engine (clipped value loss). None
                                          with ``advantage: grpo``
reference   ``models/sft`` (frozen)       per-token log-probs for the KL to the SFT policy
reward      ``models/reward`` (frozen)    the score at each response's last token (its
                                          ``<|end|>`` when it ended), normalised with the
                                          reward stage's mean/std; any :data:`Scorer` fits
==========  ============================  =====================================================

Frozen roles are ``Engine(optim=None)``: eval mode, no gradients, no optimizer state. Pipeline
parallelism is refused: decoding needs the whole model in every process (:mod:`palm.decode.generate`).

One iteration (:func:`iteration`): each DP rank takes its share of ``prompts_per_rollout``
prompts (a seeded order over the train split, :class:`~palm.train.finetune.EpochOrder`), repeats
each ``samples_per_prompt`` times and samples one response per row; the behaviour policy's
log-probs come with the tokens. The reference, the critic and the reward model score the same
sequences (prompt + response, right-padded, as in fine-tuning). The score is clipped to
``±reward_clip``; a response that never produced ``<|end|>`` gets ``no_end_penalty`` added.
``gae``: per-token reward ``-β·KL`` plus the score on the last token, GAE(γ, λ), advantages
whitened over the whole rollout (all DP ranks). ``grpo``: the score relative to the other samples
of its prompt (no critic), with the KL to the reference (k3) in the loss instead of the reward.
Then ``ppo_epochs`` passes over the rollout in shuffled mini-batches of ``micro_batch_size x
num_microbatches`` sequences per DP rank, one optimizer step of each trained role per mini-batch,
stopping the update as soon as a mini-batch's approximate KL(old || new) exceeds ``kl_bound``.

All PPO maths live in :mod:`palm.train.ppo` in response space ``[b, n]`` (row ``i``'s response
tokens first, then padding); the models see label space ``[b, L]``: the log-prob of response
token ``j`` of row ``i`` is at label position ``len(prompt_i) - 1 + j`` (``index``).

Randomness is a function of the iteration: each DP rank's rollout generator is seeded from
``(seed, iteration, dp rank)`` (TP ranks of one replica share it, so they sample the same tokens)
and the mini-batch order from ``(seed, iteration, epoch, dp rank)``; the checkpoint holds the
iteration, both trained roles with their optimizers and the KL coefficient, so a resumed run
repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from megatron.core import parallel_state as ps

from palm.core.config import check, from_dict, to_dict
from palm.core.errors import ConfigError, UserError
from palm.decode.generate import SamplingConfig, generate
from palm.model.network import ModelConfig, PaLM
from palm.train import ppo
from palm.train.engine import Batch, Engine, OptimConfig, metric
from palm.train.finetune import PAD_ID, EpochOrder, pad, padded_length
from palm.train.launch import launch as _launch
from palm.train.loop import TrainConfig, code_version, worker_groups
from palm.model.reward import RewardModel, read_rewards

ENTRY = "palm.train.rlhf:worker"
CODE = ("decode/generate.py", "decode/decoder.py", "decode/layouts.py", "decode/cache.py", "decode/native/decode.c",
        "model/reward.py", "train/finetune.py", "train/reward.py", "train/ppo.py", "train/rlhf.py")

# (prompts, responses) -> one score per row [b] (the reward model's, normalised; or a toy's)
Scorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """The KL penalty to the reference (SFT) policy."""

    coef: float = 0.2  # initial beta: reward -beta * KL per token (gae) or + beta * KL in the loss (grpo)
    estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimator in the reward (Schulman 2020)
    target: float | None = None  # adaptive beta steering the per-sequence KL towards this; null: fixed
    horizon: int = 10000  # the adaptive controller's time scale, in sequences (Ziegler et al. 2019)

    def __post_init__(self) -> None:
        check(self.coef >= 0, "coef", f"must be >= 0, got {self.coef}")
        check(self.target is None or self.target > 0, "target", f"must be > 0 or null, got {self.target}")
        check(self.horizon >= 1, "horizon", f"must be >= 1, got {self.horizon}")


@dataclasses.dataclass(frozen=True)
class PPOConfig(TrainConfig):
    """The ``ppo`` section of params.yaml. Layout, dtype, seed and intervals are
    :class:`TrainConfig`'s, read as: ``train_steps`` PPO iterations (one rollout and its update
    each); a mini-batch (one optimizer step) is ``micro_batch_size x num_microbatches`` sequences
    per DP rank; ``optim`` is the actor's optimizer, ``critic_optim`` the critic's;
    ``optim.clip_grad`` / ``critic_optim.clip_grad`` clip each role's gradient norm. There is no
    validation during PPO (``eval_*`` are unused; held-out prompts are ``evaluate``'s) and
    ``pipeline_parallel`` must be 1."""

    train_steps: int = 30
    micro_batch_size: int = 8
    num_microbatches: int = 1
    log_interval: int = 1
    checkpoint_interval: int = 10
    prompts_per_rollout: int = 16  # prompts per iteration, all DP ranks together
    samples_per_prompt: int = 1  # responses per prompt (grpo: the group size, >= 2)
    max_new_tokens: int = 64  # response length cap; prompts + this must fit model.seq_len
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)  # the behaviour policy (1.0: the model itself)
    ppo_epochs: int = 2  # passes over each rollout
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.5  # weight of the value loss (the critic's objective)
    entropy_coef: float = 0.0  # entropy bonus weight in the policy loss
    kl: KLConfig = KLConfig()
    kl_bound: float = 0.05  # stop the update once a mini-batch's approx KL(old || new) exceeds this
    reward_clip: float = 5.0  # normalised scores are clipped to [-reward_clip, reward_clip]
    no_end_penalty: float = -1.0  # added to the score of a response that never produced <|end|>
    advantage: Literal["gae", "grpo"] = "gae"  # gae: critic + GAE; grpo: group-relative scores, no critic
    whiten: bool = True  # whiten the advantages over the rollout (all DP ranks)
    optim: OptimConfig = OptimConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=0.0)
    critic_optim: OptimConfig = OptimConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=0.0)
    sample_interval: int = 5  # iterations between logged sample responses (samples.jsonl, MLflow)
    samples_logged: int = 4  # responses logged each time (rank 0's first rows)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.pipeline_parallel == 1, "pipeline_parallel",
              "ppo supports tensor_parallel and data_parallel only (generation needs the whole model "
              f"per process); got pipeline_parallel={self.pipeline_parallel}")
        for name in ("prompts_per_rollout", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                     "sample_interval"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.samples_logged >= 0, "samples_logged", f"must be >= 0, got {self.samples_logged}")
        check(self.kl_bound > 0, "kl_bound", f"must be > 0 (the approx KL at which an update stops), got {self.kl_bound}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        for name in ("clip", "value_clip", "vf_coef", "reward_clip"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        check(self.advantage == "gae" or self.samples_per_prompt >= 2, "samples_per_prompt",
              f"advantage: grpo compares the samples of a prompt: needs >= 2, got {self.samples_per_prompt}")
        check(self.prompts_per_rollout % self.data_parallel == 0, "prompts_per_rollout",
              f"must be divisible by data_parallel={self.data_parallel}, got {self.prompts_per_rollout}")
        check(self.rollout_per_rank % self.mini_batch == 0, "micro_batch_size",
              f"a rollout of {self.rollout_per_rank} sequences per DP rank (prompts_per_rollout / data_parallel "
              f"x samples_per_prompt) must split into mini-batches of micro_batch_size x num_microbatches = "
              f"{self.mini_batch}")

    @property
    def rollout_per_rank(self) -> int:
        return self.prompts_per_rollout // self.data_parallel * self.samples_per_prompt

    @property
    def mini_batch(self) -> int:
        return self.micro_batch_size * self.num_microbatches

    def run_identity(self, model: ModelConfig, critic: ModelConfig | None, dtype: str, tokenizer_sha256: str,
                     data_sha256: str, policy_sha256: str, reward_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        skip = {"tensor_parallel", "pipeline_parallel", "data_parallel", "virtual_stages", "threads", "log_interval",
                "checkpoint_interval", "eval_interval", "eval_batches", "sample_interval", "samples_logged"}
        return {"model": to_dict(model), "critic": to_dict(critic) if critic else None, "dtype": dtype,
                "ppo": {k: v for k, v in to_dict(self).items() if k not in skip},
                "tokenizer_sha256": tokenizer_sha256, "data_sha256": data_sha256, "policy_sha256": policy_sha256,
                "reward_sha256": reward_sha256, "code": code_version(*CODE)}


def check_context(cfg: PPOConfig, model: ModelConfig) -> None:
    if cfg.max_new_tokens >= model.seq_len:
        raise ConfigError("ppo.max_new_tokens", f"{cfg.max_new_tokens} new tokens leave no room for a prompt in "
                          f"the model's context (model.seq_len={model.seq_len}); use at most {model.seq_len - 1}, "
                          "better far less")


# --- prompts -------------------------------------------------------------------------------------

def prompts_of(rows: list[dict]) -> list[list[int]]:
    """Distinct generation prompts, in order: a preference row's ``prompt_ids``, or a conversation
    up to (and with) the ``<|assistant|>`` of its last reply (where its last run of loss-mask 1s
    starts)."""
    seen, out = set(), []
    for r in rows:
        if "prompt_ids" in r:
            p = list(r["prompt_ids"])
        else:
            mask = r["loss_mask"]
            starts = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
            if not starts:
                continue
            p = list(r["input_ids"][:starts[-1]])
        if p and tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out


def load_prompts(data: Path, tokenizer_sha256: str, cfg: PPOConfig, model: ModelConfig) -> list[list[int]]:
    """The train split's prompts that fit the context with ``max_new_tokens`` (one-line errors)."""
    from palm.data.chat import load_prefs, load_sft, read_chat_meta

    check_context(cfg, model)
    kind = read_chat_meta(data, "sft_data").get("kind")
    table = (load_prefs(data, "train", tokenizer_sha256).select(["prompt_ids"]) if kind == "prefs"
             else load_sft(data, "train", tokenizer_sha256).select(["input_ids", "loss_mask"]))
    prompts = prompts_of(table.to_pylist())
    room = model.seq_len - cfg.max_new_tokens
    fit = [p for p in prompts if len(p) <= room]
    if not fit:
        raise UserError(f"{data}: no training prompt to start rollouts from ({len(prompts)} prompts in the train "
                        f"split, none of at most {room} tokens = model.seq_len {model.seq_len} - ppo.max_new_tokens "
                        f"{cfg.max_new_tokens}); more data, or a smaller ppo.max_new_tokens")
    return fit


# --- per-token outputs of the models --------------------------------------------------------------

def token_logp(module: PaLM, tokens: torch.Tensor, labels: torch.Tensor, entropy: bool = False,
               index: torch.Tensor | None = None, entropy_grad: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p(label)`` at every position ``[b, L]`` over the real vocabulary (the padded rows of
    the embedding excluded, as in :func:`generate`), and optionally the entropy of each position's
    distribution (``entropy_grad=False``: without its gradient, a metric); works on this rank's
    vocabulary shard (TP) with gradients. ``index [b, n]``:
    only at those positions (response space ``[b, n]``), so the output layer runs on the
    responses alone."""
    x = module.trunk(tokens)  # [b, L, d]
    if index is not None:
        x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [b, n, d]
        labels = labels.gather(1, index)
    nll, _, *ent = module.token_nll(x, labels, vocab=module.cfg.vocab_size, entropy=entropy,
                                    entropy_grad=entropy_grad)
    return -nll, (ent[0] if entropy else None)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model  # megatron DDP around the chunk


def _picked(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Label space ``[b, L]`` -> response space ``[b, n]``."""
    return x.gather(1, batch["index"])


def reference_step(batch: Batch, model: torch.nn.Module):
    logp, _ = token_logp(_unwrap(model), batch["tokens"], batch["labels"], index=batch["index"])
    return logp, lambda out: {"logp": out}


def value_step(mean: float = 0.0, std: float = 1.0):
    """The critic's values at the response tokens, on the normalised reward scale."""
    def step(batch: Batch, model: torch.nn.Module):
        return model(batch["tokens"]), lambda values: {"value": (_picked(values, batch) - mean) / std}
    return step


def actor_forward_step(cfg: PPOConfig):
    """Clipped policy loss (+ entropy bonus; GRPO: + beta * k3 KL to the reference) over the
    response tokens of a micro-batch; metrics: clip fraction, entropy, approx KL(old || new)."""

    def step(batch: Batch, model: torch.nn.Module):
        output = token_logp(_unwrap(model), batch["tokens"], batch["labels"], entropy=True, index=batch["index"],
                            entropy_grad=cfg.entropy_coef > 0)  # 0: entropy is a metric only

        def loss_func(out):
            logp, ent = out  # [b, n] each: response space
            mask = batch["mask"]
            loss, n, clipped = ppo.policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
            metrics = {"policy_loss": metric(loss, n), "clip_fraction": metric(clipped, n),
                       "entropy": metric((ent * mask).sum(), n),
                       "approx_kl": metric((ppo.kl_estimate(batch["old_logp"], logp, "k3") * mask).sum(), n)}
            total = loss - cfg.entropy_coef * (ent * mask).sum()
            if cfg.advantage == "grpo":
                total = total + batch["kl_coef"][0] * (ppo.kl_estimate(logp, batch["ref_logp"], "k3") * mask).sum()
            return total, n, metrics

        return output, loss_func

    return step


def critic_forward_step(cfg: PPOConfig, mean: float = 0.0, std: float = 1.0):
    """Clipped value loss over the response tokens of a micro-batch. The critic starts as the
    reward model, so its head is read on the scale the scores are normalised to: ``(v - mean) /
    std`` with the reward stage's mean and std (at the start, the value of a finished response is
    its normalised score)."""

    def step(batch: Batch, model: torch.nn.Module):
        def loss_func(values: torch.Tensor):
            v = (_picked(values, batch) - mean) / std
            loss, n = ppo.value_loss(v, batch["old_values"], batch["returns"], batch["mask"], cfg.value_clip)
            return cfg.vf_coef * loss, n, {"value_loss": metric(loss, n)}

        return model(batch["tokens"]), loss_func

    return step


def reward_model_scorer(engine: Engine, mean: float, std: float, micro_batch_size: int) -> Scorer:
    """The reward model's score of each ``prompt + response`` at its last token, normalised with
    the reward stage's mean and std over its training sequences."""

    def score(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        length = padded_length((len(s) for s in seqs), engine.cfg.seq_len)
        batches = [{"tokens": pad(seqs[i:i + micro_batch_size], length),
                    "last": torch.tensor([len(s) - 1 for s in seqs[i:i + micro_batch_size]])}
                   for i in range(0, len(seqs), micro_batch_size)]

        def step(batch: Batch, model: torch.nn.Module):
            return model(batch["tokens"]), lambda values: {"reward": read_rewards(values, batch["last"])}

        raw = torch.cat([d["reward"] for d in engine.forward(batches, step)]).float().cpu()
        return (raw - mean) / max(std, 1e-6)

    return score


# --- roles ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Roles:
    actor: Engine
    critic: Engine | None  # None with advantage: grpo
    reference: Engine
    scorer: Scorer
    value_norm: tuple[float, float] = (0.0, 1.0)  # the critic's head is read as (v - mean) / std


def build_roles(cfg: PPOConfig, model: ModelConfig, *, policy: Path, critic_from: Path | None, scorer: Scorer,
                critic_model: ModelConfig | None = None, value_norm: tuple[float, float] = (0.0, 1.0),
                dtype: torch.dtype = torch.float32) -> Roles:
    """Actor and reference from the ``policy`` export, the critic (value head per position) from
    ``critic_from`` (a reward export, whose mean and std are ``value_norm``; an export without the
    head, e.g. the policy's, starts the head fresh). Process groups must exist."""
    from palm.train.finetune import load_parent
    from palm.model.reward import HEAD

    steps = cfg.train_steps * cfg.ppo_epochs * (cfg.rollout_per_rank // cfg.mini_batch)
    common = dict(micro_batch_size=cfg.micro_batch_size, num_microbatches=cfg.num_microbatches,
                  train_steps=steps, dtype=dtype, seed=cfg.seed)
    actor = Engine(model, cfg.optim, forward_step=actor_forward_step(cfg), **common)
    load_parent(actor, policy)
    reference = Engine(model, None, **common)
    load_parent(reference, policy)
    critic = None
    if cfg.advantage == "gae":
        critic = Engine(critic_model or model, cfg.critic_optim, forward_step=critic_forward_step(cfg, *value_norm),
                        chunk=RewardModel, **common)
        load_parent(critic, critic_from or policy, new=[HEAD])
    return Roles(actor=actor, critic=critic, reference=reference, scorer=scorer, value_norm=value_norm)


# --- one iteration ---------------------------------------------------------------------------------

def dp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel ranks (a float64 copy)."""
    x = x.double().clone()
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(x, group=ps.get_data_parallel_group())
    return x


def dp_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`ppo.masked_whiten` with the mean and variance of all DP ranks' valid tokens."""
    s = dp_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = s[0] / s[2].clamp(min=1)
    var = (s[1] / s[2].clamp(min=1) - mean * mean).clamp(min=0)
    return ((x - mean) * torch.rsqrt(var + 1e-8) * mask).to(x.dtype)


def dp_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """:func:`ppo.explained_variance` over all DP ranks."""
    e = returns - values
    s = dp_sum(torch.stack([(e * mask).sum(), (e * e * mask).sum(), (returns * mask).sum(),
                            (returns * returns * mask).sum(), mask.sum()]))
    n = s[4].clamp(min=1)
    var_e, var_r = s[1] / n - (s[0] / n) ** 2, s[3] / n - (s[2] / n) ** 2
    return float(1.0 - var_e / var_r.clamp(min=1e-12))


def sequences_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], n: int,
                    seq_len: int) -> Batch:
    """Label-space inputs of ``prompt + response`` rows, right-padded: ``tokens``/``labels``
    ``[b, L]`` and ``index [b, n]``, the label position of each response token."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    length = padded_length((len(s) - 1 for s in seqs), seq_len)
    j = torch.arange(n)
    index = torch.stack([(len(p) - 1 + j).clamp(max=length - 1) for p in prompts])
    return {"tokens": pad([s[:-1] for s in seqs], length), "labels": pad([s[1:] for s in seqs], length),
            "index": index}


SHARED = ("kl_coef",)  # batch entries that are not per row


def _micro(batch: Batch, rows: Sequence[int], size: int) -> list[Batch]:
    """Micro-batches of ``size`` of the rollout's ``rows``, in that order."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return [{k: v if k in SHARED else v[idx[i:i + size]] for k, v in batch.items()}
            for i in range(0, len(idx), size)]


class Rollouts:
    """This DP rank's prompts of each iteration, in a seeded order over the prompt set."""

    def __init__(self, prompts: list[list[int]], cfg: PPOConfig):
        self.prompts, self.cfg = prompts, cfg
        self.order = EpochOrder(len(prompts), cfg.seed)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def prompts_at(self, it: int) -> list[list[int]]:
        (rows,) = self.order.rows(it, micro_batch_size=self.cfg.prompts_per_rollout // self.dp_size,
                                  num_microbatches=1, dp_rank=self.dp_rank, dp_size=self.dp_size)
        return [self.prompts[i] for i in rows for _ in range(self.cfg.samples_per_prompt)]

    def generator(self, it: int, salt: int = 0) -> torch.Generator:
        from palm.model.megatron_compat import device

        seed = int(np.random.SeedSequence([self.cfg.seed, it, self.dp_rank, salt]).generate_state(1)[0])
        return torch.Generator(device=device()).manual_seed(seed)


def iteration(roles: Roles, cfg: PPOConfig, prompts: list[list[int]], *, kl_coef: float, end_id: int,
              generator: torch.Generator, shuffle_seed: Callable[[int], int]) -> tuple[dict[str, float], dict]:
    """One rollout of ``prompts`` (this DP rank's rows) and the PPO update on it; returns the
    iteration's metrics (the same on every rank) and rank-local samples."""
    t0 = time.perf_counter()
    actor = roles.actor.chunks[0]
    gen = generate(actor, prompts, cfg.max_new_tokens, temperature=cfg.sampling.temperature,
                   top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, stop_ids=[end_id], pad_id=PAD_ID,
                   generator=generator)
    mask = gen.response_mask.float().cpu()  # [b, n], a prefix of each row
    lengths = mask.sum(1).long()
    responses = [gen.response[i, :lengths[i]].tolist() for i in range(len(prompts))]
    old_logp = gen.raw_logprobs.float().cpu() * mask
    stopped = gen.stopped.cpu()
    t_gen = time.perf_counter() - t0
    n = mask.shape[1]
    batch = sequences_batch(prompts, responses, n, actor.cfg.seq_len)
    size = cfg.micro_batch_size
    micros = _micro(batch, range(len(prompts)), size)
    ref_logp = torch.cat([d["logp"] for d in roles.reference.forward(micros, reference_step)]).cpu() * mask
    raw = roles.scorer(prompts, responses).float().cpu()
    score = raw.clamp(-cfg.reward_clip, cfg.reward_clip) + cfg.no_end_penalty * (~stopped).float()
    kl = ppo.kl_estimate(old_logp, ref_logp, cfg.kl.estimator) * mask
    values = torch.zeros_like(mask)
    if cfg.advantage == "gae":
        values = torch.cat([d["value"] for d in roles.critic.forward(micros, value_step(*roles.value_norm))])
        values = values.float().cpu() * mask
        rewards = ppo.token_rewards(score, kl, kl_coef, mask)
        advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        ev = dp_explained_variance(values, returns, mask)
    else:
        advantages = ppo.group_advantages(score, cfg.samples_per_prompt)[:, None] * mask
        returns, ev = values, float("nan")
    if cfg.whiten:
        advantages = dp_whiten(advantages, mask)
    batch.update(mask=mask, old_logp=old_logp, advantages=advantages, old_values=values, returns=returns,
                 ref_logp=ref_logp, kl_coef=torch.full((1,), float(kl_coef)))
    t_score = time.perf_counter() - t0 - t_gen

    # the update: epochs over shuffled mini-batches, stopped early past kl_bound
    window: list[dict[str, float]] = []
    stopped_early = False
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng(shuffle_seed(epoch)).permutation(len(prompts))
        for start in range(0, len(order), cfg.mini_batch):
            rows = order[start:start + cfg.mini_batch]
            stats = roles.actor.train_step(_micro(batch, rows, size))
            if roles.critic is not None:
                critic = roles.critic.train_step(_micro(batch, rows, size))
                stats.update(value_loss=critic["value_loss"], critic_grad_norm=critic["grad_norm"])
            window.append(stats)
            if stats["approx_kl"] > cfg.kl_bound:
                stopped_early = True
                break
        if stopped_early:
            break
    t_update = time.perf_counter() - t0 - t_gen - t_score

    # the iteration's metrics, over all DP ranks
    seq = dp_sum(torch.stack([raw.sum(), score.sum(), kl.sum(), lengths.sum().double(), stopped.sum().double(),
                              torch.tensor(float(len(prompts)))]))
    b = seq[5]
    mean = lambda key: sum(w[key] for w in window) / len(window)  # noqa: E731
    out = {"reward": float(seq[0] / b), "score": float(seq[1] / b), "kl": float(seq[2] / b),
           "kl_coef": float(kl_coef), "response_length": float(seq[3] / b), "ended": float(seq[4] / b),
           "entropy": mean("entropy"), "clip_fraction": mean("clip_fraction"), "approx_kl": mean("approx_kl"),
           "policy_loss": mean("policy_loss"), "value_loss": mean("value_loss") if roles.critic else math.nan,
           "explained_variance": ev, "updates": float(len(window)), "stopped_early": float(stopped_early),
           "grad_norm": mean("grad_norm"), "lr": window[-1]["lr"],
           "generate_tokens_per_s": float(dp_sum(lengths.sum().double()) / max(t_gen, 1e-9)),
           "rollout_s": t_gen + t_score, "update_s": t_update}
    samples = {"responses": responses, "prompts": prompts, "score": score.tolist(), "reward": raw.tolist(),
               "ended": stopped.tolist()}
    return out, samples


# --- the loop --------------------------------------------------------------------------------------

CURVE = ("step", "reward", "score", "kl", "kl_coef", "response_length", "ended", "entropy", "clip_fraction",
         "approx_kl", "policy_loss", "value_loss", "explained_variance", "updates", "grad_norm", "lr",
         "generate_tokens_per_s", "rollout_s", "update_s")


@dataclasses.dataclass(frozen=True)
class Paths:
    reports: Path  # reports/ppo/: curve.csv, samples.jsonl
    checkpoints: Path | None  # kept across reruns; None: no checkpoints (in-process runs, tests)
    run_dir: Path | None = None  # rank 0 writes result.json here


def train(cfg: PPOConfig, roles: Roles, prompts: list[list[int]], paths: Paths, *, end_id: int,
          identity: dict[str, Any] | None = None, decode: Callable[[list[int]], str] | None = None,
          stage: str = "ppo") -> dict[str, Any]:
    """Run ``cfg.train_steps`` PPO iterations (resuming from ``paths.checkpoints`` when it holds
    this run's checkpoint); returns the result (the last iteration's metrics, the first's reward)."""
    from palm.train import checkpoint as ckpt
    from palm.train.loop import KILL_ENV, resume
    from palm.train.metrics import Curve, read_curve

    rank0 = torch.distributed.get_rank() == 0
    others = {"critic": roles.critic} if roles.critic is not None else {}
    it, state, rows = 0, {"kl_coef": cfg.kl.coef, "actor_steps": 0, "seconds": 0.0}, []
    samples_text = ""
    if paths.checkpoints is not None:
        it, loaded, rows = resume(roles.actor, paths.checkpoints, identity or {}, stage, rank0, others)
        if it:
            state = {k: loaded.get(k, v) for k, v in state.items()}
            roles.actor.step = state["actor_steps"]
            kept = ckpt.latest(paths.checkpoints) / "samples.jsonl"
            samples_text = kept.read_text() if kept.is_file() else ""
    kl_ctl = ppo.AdaptiveKL(state["kl_coef"], cfg.kl.target, cfg.kl.horizon)
    source = Rollouts(prompts, cfg)
    curve = Curve(paths.reports / "curve.csv", CURVE, rows) if rank0 else None
    samples_path = paths.reports / "samples.jsonl"
    if rank0:
        samples_path.write_text(samples_text)
    first = float(rows[0]["reward"]) if rows else None
    last: dict[str, float] = {}
    while it < cfg.train_steps:
        t0 = time.perf_counter()
        stats, samples = iteration(
            roles, cfg, source.prompts_at(it), kl_coef=kl_ctl.coef, end_id=end_id, generator=source.generator(it),
            shuffle_seed=lambda epoch, it=it: int(np.random.SeedSequence(
                [cfg.seed, it, epoch, source.dp_rank, 1]).generate_state(1)[0]))
        kl_ctl.update(stats["kl"], cfg.prompts_per_rollout * cfg.samples_per_prompt)
        it += 1
        state.update(kl_coef=kl_ctl.coef, actor_steps=roles.actor.step,
                     seconds=state["seconds"] + time.perf_counter() - t0)
        last = {"step": it, **stats}
        first = stats["reward"] if first is None else first
        if rank0 and (it % cfg.log_interval == 0 or it == cfg.train_steps):
            curve.append(last)  # the stage process logs it and samples.jsonl to MLflow (Tracker.follow)
            print(f"{stage}: iteration {it}/{cfg.train_steps} reward {stats['reward']:+.3f} kl {stats['kl']:.4f} "
                  f"length {stats['response_length']:.1f} updates {stats['updates']:.0f} "
                  f"({stats['rollout_s']:.1f} s rollout, {stats['update_s']:.1f} s update)", flush=True)
        if rank0 and cfg.samples_logged and (it % cfg.sample_interval == 0 or it == cfg.train_steps):
            with samples_path.open("a") as f:
                for i in range(min(cfg.samples_logged, len(samples["responses"]))):
                    f.write(json.dumps({"step": it, "prompt": _text(decode, samples["prompts"][i]),
                                        "response": _text(decode, samples["responses"][i]),
                                        "reward": samples["reward"][i], "score": samples["score"][i],
                                        "ended": samples["ended"][i]}) + "\n")
        if paths.checkpoints is not None and (it % cfg.checkpoint_interval == 0 or it == cfg.train_steps):
            files = {"curve.csv": curve.text(), "samples.jsonl": samples_path.read_text()} if rank0 else None
            ckpt.save(roles.actor, paths.checkpoints, step=it, others=others,
                      meta={"run": identity or {}, "loop": state}, files=files)
            if os.environ.get(KILL_ENV) == str(it):
                os.kill(os.getpid(), signal.SIGKILL)
    if not last and rank0:  # resumed a finished run: the last row of the kept curve
        last = {k: float(v) if v not in ("", None) else math.nan for k, v in read_curve(curve.text())[-1].items()}
    result = {**{k: v for k, v in last.items() if k != "step"}, "initial_reward": first,
              "iterations": it, "resumed": bool(rows), "ppo_seconds": state["seconds"],
              "actor_steps": roles.actor.step, "kl_coef_final": kl_ctl.coef, "train_prompts": len(prompts)}
    result = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    if paths.checkpoints is not None:
        result["checkpoint"] = str(ckpt.latest(paths.checkpoints))
    if rank0 and paths.run_dir is not None:
        (Path(paths.run_dir) / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _text(decode: Callable[[list[int]], str] | None, ids: list[int]) -> str | list[int]:
    return decode(ids) if decode is not None else ids


# --- the stage side ------------------------------------------------------------------------------

def launch(model: ModelConfig, cfg: PPOConfig, *, data: Path, policy: Path, reward: Path, tokenizer_sha256: str,
           checkpoints: Path, reports: Path, run_dir: Path, dtype: str = "fp32",
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """PPO of the ``policy`` export against the ``reward`` export on the prompts of ``data``, in
    ``cfg.world_size`` processes; returns rank 0's result."""
    from palm.core.io import files_sha256

    model.check_parallel(cfg.tensor_parallel, 1, section="ppo")
    spec = {"model": to_dict(model), "ppo": to_dict(cfg), "dtype": dtype, "data": str(data), "policy": str(policy),
            "reward": str(reward), "tokenizer_sha256": tokenizer_sha256, "data_sha256": files_sha256(data),
            "policy_sha256": files_sha256(policy, ["config.json", "model.safetensors"]),
            "reward_sha256": files_sha256(reward, ["config.json", "model.safetensors"]),
            "checkpoints": str(checkpoints), "reports": str(reports)}
    return _launch(ENTRY, spec, cfg, run_dir=run_dir, env=env)


def worker(spec: dict[str, Any]) -> None:
    """One PPO process: its roles at the run's layout, then :func:`train`."""
    from palm.core.tokenizer import load_tokenizer, special_ids
    from palm.train.finetune import load_parent
    from palm.train.metrics import DTYPES

    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(PPOConfig, spec["ppo"], "ppo")
    reward_dir, policy = Path(spec["reward"]), Path(spec["policy"])
    reward_config = json.loads((reward_dir / "config.json").read_text())
    critic_model = from_dict(ModelConfig, reward_config["model"], "model")
    with worker_groups(cfg):
        sha = spec["tokenizer_sha256"]
        prompts = load_prompts(Path(spec["data"]), sha, cfg, model)
        tok = load_tokenizer(policy / "tokenizer.json", sha)
        dtype = DTYPES[spec["dtype"]]

        reward = Engine(critic_model, None, chunk=RewardModel, micro_batch_size=cfg.micro_batch_size, dtype=dtype)
        load_parent(reward, reward_dir)
        stats = reward_config["reward"]
        scorer = reward_model_scorer(reward, stats["mean"], stats["std"], cfg.micro_batch_size)
        roles = build_roles(cfg, model, policy=policy, critic_from=reward_dir, critic_model=critic_model,
                            scorer=scorer, value_norm=(stats["mean"], max(stats["std"], 1e-6)), dtype=dtype)
        identity = cfg.run_identity(model, critic_model, spec["dtype"], sha, spec["data_sha256"],
                                    spec["policy_sha256"], spec["reward_sha256"])
        train(cfg, roles, prompts, Paths(reports=Path(spec["reports"]), checkpoints=Path(spec["checkpoints"]),
                                         run_dir=Path(spec["run_dir"])),
              end_id=special_ids(tok)["end_turn_id"], identity=identity,
              decode=lambda ids: tok.decode(ids, skip_special_tokens=False))
