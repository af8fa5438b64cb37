"""The PPO update on one rollout: epochs over shuffled mini-batches, one optimizer step of each
trained role (actor; critic with GAE) per mini-batch, stopped as soon as a mini-batch's approximate
KL(old || new) exceeds ``kl_bound``."""

from __future__ import annotations

from typing import Callable

import numpy as np

from palm.train.engine import Batch
from palm.train.rlhf.config import PPOConfig
from palm.train.rlhf.roles import Roles
from palm.train.rlhf.rollout import micro_batches


def update(roles: Roles, cfg: PPOConfig, batch: Batch, rows: int,
           shuffle_seed: Callable[[int], int]) -> tuple[list[dict[str, float]], bool]:
    """Train on the ``rows`` sequences of ``batch``; returns each mini-batch's metrics and whether
    the KL bound stopped the update early. ``shuffle_seed(epoch)`` seeds each epoch's order."""
    window: list[dict[str, float]] = []
    for epoch in range(cfg.ppo_epochs):
        order = np.random.default_rng(shuffle_seed(epoch)).permutation(rows)
        for start in range(0, len(order), cfg.mini_batch):
            mini = order[start:start + cfg.mini_batch]
            stats = roles.actor.train_step(micro_batches(batch, mini, cfg.micro_batch_size))
            if roles.critic is not None:
                critic = roles.critic.train_step(micro_batches(batch, mini, cfg.micro_batch_size))
                stats.update(value_loss=critic["value_loss"], critic_grad_norm=critic["grad_norm"])
            window.append(stats)
            if stats["approx_kl"] > cfg.kl_bound:
                return window, True
    return window, False
