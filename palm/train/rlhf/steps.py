"""What each PPO role computes per token: the actor's and the reference's log-probs, the critic's
values, the reward model's score, and the actor's and critic's losses as engine forward steps.

All PPO maths live in :mod:`palm.train.ppo` in response space ``[b, n]`` (row ``i``'s response
tokens first, then padding); the models see label space ``[b, L]``: the log-prob of response
token ``j`` of row ``i`` is at label position ``len(prompt_i) - 1 + j`` (``index``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from palm.model.network import PaLM
from palm.model.reward import read_rewards
from palm.train import ppo
from palm.train.engine import Batch, Engine, metric
from palm.train.finetune import pad, padded_length
from palm.train.rlhf.config import PPOConfig

# (prompts, responses) -> one score per row [b] (the reward model's, normalised; or a toy's)
Scorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]


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


def actor_forward_step(cfg: PPOConfig):
    """Clipped policy loss (+ entropy bonus; grpo, dr_grpo: + beta * k3 KL to the reference, the
    others have the KL in the reward) over the response tokens of a micro-batch; metrics: clip
    fraction, entropy, approx KL(old || new), each per valid token.

    The loss is returned as ``(sum, count)`` for the engine to divide summed over micro-batches
    and DP ranks: ``count`` is the valid tokens, except for ``dr_grpo``, whose count is the constant
    ``rows x max_new_tokens`` (:func:`ppo.constant_count`: Dr. GRPO's length-unbiased loss)."""

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
            if cfg.advantage in ppo.KL_IN_LOSS:
                total = total + batch["kl_coef"][0] * (ppo.kl_estimate(logp, batch["ref_logp"], "k3") * mask).sum()
            if cfg.advantage == "dr_grpo":
                return total, ppo.constant_count(mask.shape[0], cfg.max_new_tokens), metrics
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


