"""The reward model's network: PaLM with a scalar head (the ``reward`` stage trains it, PPO's critic
starts from it).

:class:`RewardModel` is a chunk factory like :class:`palm.model.network.PaLM` (same constructor), so the
training engine builds it at any TP/PP layout: every chunk is a PaLM chunk, and the last one adds
a bias-free linear ``d -> 1`` on the final-normed hidden state, replicated on every TP rank (its
input is whole on every rank; same seed, same gradients, so it needs no collective). On the last
stage it returns one scalar per position ``[b, s]``; the reward of a sequence is the scalar at its
last real token, read at an explicit per-row index (``last``), never at a padding position. The
per-position scalars are also what PPO's critic (value model) needs.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from palm.model import parallel
from palm.model.network import ModelConfig, PaLM

HEAD = "head.weight"  # the one parameter a language-model parent does not have


class RewardModel(PaLM):
    """PaLM (or one pipeline chunk of it) whose last chunk ends in a scalar head."""

    def __init__(self, cfg: ModelConfig, mcfg: Any = None, *, pre_process: bool = True,
                 post_process: bool = True, layers: Iterable[int] | None = None, seed: int = 0):
        super().__init__(cfg, mcfg, pre_process=pre_process, post_process=post_process, layers=layers, seed=seed)
        if post_process:
            torch.manual_seed(parallel.init_seed(seed, "reward_head"))
            self.head = parallel.replicated_linear(self.config, cfg.d_model, 1)

    def forward(self, tokens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        """Last stage: a scalar per position ``[b, s]`` (fp32); other stages: activations
        ``[s, b, d]`` for the next stage (megatron's p2p protocol, as :class:`PaLM`)."""
        assert labels is None, "a reward model has no labels"
        x = self.trunk(tokens, cache)
        if not self.post_process:
            return x.transpose(0, 1).contiguous()
        return self.head(self.final_norm(x)).squeeze(-1).float()


def read_rewards(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The reward of each row: ``values [b, s]`` at position ``last [b]``."""
    return values.gather(1, last.long().unsqueeze(1)).squeeze(1)
