"""The four PPO roles, each an :class:`~palm.train.engine.Engine` at the run's TP x DP layout:
the actor and the frozen reference from the policy export (with LoRA: the actor's base, its
adapters off), the critic (a value head per position) from the reward export, and the scorer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from palm.model.lora import AdaptersOff
from palm.model.network import ModelConfig
from palm.model.reward import HEAD, RewardModel
from palm.train.engine import Engine
from palm.train.finetune import load_parent
from palm.train.rlhf.config import PPOConfig
from palm.train.rlhf.steps import Scorer, actor_forward_step, critic_forward_step


@dataclasses.dataclass
class Roles:
    actor: Engine
    critic: Engine | None  # None with advantage: grpo
    reference: Engine | AdaptersOff  # with lora: the actor with its adapters off
    scorer: Scorer
    value_norm: tuple[float, float] = (0.0, 1.0)  # the critic's head is read as (v - mean) / std


def build_roles(cfg: PPOConfig, model: ModelConfig, *, policy: Path, critic_from: Path | None, scorer: Scorer,
                critic_model: ModelConfig | None = None, value_norm: tuple[float, float] = (0.0, 1.0),
                dtype: torch.dtype = torch.float32) -> Roles:
    """Actor and reference from the ``policy`` export, the critic (value head per position) from
    ``critic_from`` (a reward export, whose mean and std are ``value_norm``; an export without the
    head, e.g. the policy's, starts the head fresh). With ``cfg.lora`` actor and critic train
    adapters (the critic its head too) and the reference is the actor with its adapters off.
    Process groups must exist."""
    steps = cfg.train_steps * cfg.ppo_epochs * (cfg.rollout_per_rank // cfg.mini_batch)
    common = dict(micro_batch_size=cfg.micro_batch_size, num_microbatches=cfg.num_microbatches,
                  train_steps=steps, dtype=dtype, seed=cfg.seed)
    actor = Engine(model, cfg.optim, forward_step=actor_forward_step(cfg), lora=cfg.lora, **common)
    load_parent(actor, policy)
    if cfg.lora is not None:  # the frozen base is the reference: one copy of the policy's weights
        reference: Engine | AdaptersOff = AdaptersOff(actor)
    else:
        reference = Engine(model, None, **common)
        load_parent(reference, policy)
    critic = None
    if cfg.advantage == "gae":
        critic = Engine(critic_model or model, cfg.critic_optim, forward_step=critic_forward_step(cfg, *value_norm),
                        chunk=RewardModel, lora=cfg.lora, lora_trainable=(HEAD,), **common)
        load_parent(critic, critic_from or policy, new=[HEAD])
    return Roles(actor=actor, critic=critic, reference=reference, scorer=scorer, value_norm=value_norm)


