"""One rollout: this DP rank's prompts of an iteration, a sampled response per row, and the
scores, KL, values and advantages the update trains on."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from megatron.core import parallel_state as ps

from palm.core.errors import UserError
from palm.decode.generate import generate
from palm.model.network import ModelConfig
from palm.train import ppo
from palm.train.engine import Batch
from palm.train.finetune import PAD_ID, EpochOrder, pad, padded_length
from palm.train.rlhf.config import PPOConfig, check_context
from palm.train.rlhf.roles import Roles
from palm.train.rlhf.steps import reference_step, value_step


def prompts_of(rows: list[dict]) -> list[list[int]]:
    """Distinct generation prompts, in order (:func:`prompt_answers` without the answers)."""
    return [p for p, _ in prompt_answers(rows)]


def prompt_answers(rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Distinct generation prompts, in order, each with the data's answer to it: a preference
    row's ``prompt_ids`` and ``chosen_ids``, or a conversation up to (and with) the
    ``<|assistant|>`` of its last reply (where its last run of loss-mask 1s starts) and that reply."""
    seen, out = set(), []
    for r in rows:
        if "prompt_ids" in r:
            p, a = list(r["prompt_ids"]), list(r.get("chosen_ids") or [])
        else:
            mask = r["loss_mask"]
            starts = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
            if not starts:
                continue
            p, a = list(r["input_ids"][:starts[-1]]), list(r["input_ids"][starts[-1]:])
        if p and tuple(p) not in seen:
            seen.add(tuple(p))
            out.append((p, a))
    return out


def load_prompts(data: Path, tokenizer_sha256: str, cfg: PPOConfig, model: ModelConfig) -> list[list[int]]:
    """The train split's prompts that fit the context with ``max_new_tokens`` (one-line errors)."""
    return [p for p, _ in load_prompt_answers(data, tokenizer_sha256, cfg, model)]


def load_prompt_answers(data: Path, tokenizer_sha256: str, cfg: PPOConfig,
                        model: ModelConfig) -> list[tuple[list[int], list[int]]]:
    """:func:`load_prompts` with each prompt's answer in the data (:func:`prompt_answers`)."""
    from palm.data.chat import load_prefs, load_sft, read_chat_meta

    check_context(cfg, model)
    kind = read_chat_meta(data, "sft_data").get("kind")
    table = (load_prefs(data, "train", tokenizer_sha256).select(["prompt_ids", "chosen_ids"]) if kind == "prefs"
             else load_sft(data, "train", tokenizer_sha256).select(["input_ids", "loss_mask"]))
    prompts = prompt_answers(table.to_pylist())
    room = model.seq_len - cfg.max_new_tokens
    fit = [(p, a) for p, a in prompts if len(p) <= room]
    if not fit:
        raise UserError(f"{data}: no training prompt to start rollouts from ({len(prompts)} prompts in the train "
                        f"split, none of at most {room} tokens = model.seq_len {model.seq_len} - ppo.max_new_tokens "
                        f"{cfg.max_new_tokens}); more data, or a smaller ppo.max_new_tokens")
    return fit


# --- rollouts -------------------------------------------------------------------------------------

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


def micro_batches(batch: Batch, rows: Sequence[int], size: int) -> list[Batch]:
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


@dataclasses.dataclass
class Rollout:
    """One iteration's sampled responses and everything the update trains on."""

    prompts: list[list[int]]  # this DP rank's rows (a prompt repeated samples_per_prompt times)
    responses: list[list[int]]  # the sampled tokens of each row, up to and with its <|end|>
    batch: Batch  # label-space inputs plus, in response space [b, n]: mask, old_logp, advantages,
    #               old_values, returns, ref_logp; and kl_coef
    raw: torch.Tensor  # [b] the scorer's normalised scores
    terms: dict[str, torch.Tensor]  # [b] each the values of a reward column (the scorer's ``last``; {} for a plain scorer)
    score: torch.Tensor  # [b] clipped, with the no-end penalty
    kl: torch.Tensor  # [b, n] the per-token KL estimate to the reference
    lengths: torch.Tensor  # [b] response lengths
    stopped: torch.Tensor  # [b] whether each response ended with <|end|>
    explained_variance: float  # of the returns by the critic's values (NaN without a critic)
    t_generate: float  # seconds sampling
    t_score: float  # seconds scoring (reference, reward model, critic, advantages)


@dataclasses.dataclass
class Sampled:
    """Responses sampled by the actor, with what the reference and the reward say about them."""

    responses: list[list[int]]  # each row's tokens, up to and with its <|end|>
    mask: torch.Tensor  # [b, n] 1 on response tokens (a prefix of each row)
    old_logp: torch.Tensor  # [b, n] the behaviour policy's log-probs
    ref_logp: torch.Tensor  # [b, n] the reference's
    raw: torch.Tensor  # [b] the scorer's normalised scores
    terms: dict[str, torch.Tensor]  # [b] each: the reward's columns (:class:`~palm.train.rlhf.rewards.Reward`)
    stopped: torch.Tensor  # [b] whether each response ended with <|end|>
    batch: Batch  # label-space inputs of prompt + response
    micros: list[Batch]  # the batch in micro-batches
    t_generate: float


def sample_and_score(roles: Roles, cfg: PPOConfig, prompts: list[list[int]], *, end_id: int,
                     generator: torch.Generator) -> Sampled:
    """One response per row of ``prompts`` from the actor, the reference's log-probs of it and
    the reward."""
    t0 = time.perf_counter()
    actor = roles.actor.chunks[0]
    gen = generate(actor, prompts, cfg.max_new_tokens, temperature=cfg.sampling.temperature,
                   top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, stop_ids=[end_id], pad_id=PAD_ID,
                   generator=generator)
    mask = gen.response_mask.float().cpu()  # [b, n], a prefix of each row
    lengths = mask.sum(1).long()
    responses = [gen.response[i, :lengths[i]].tolist() for i in range(len(prompts))]
    old_logp = gen.raw_logprobs.float().cpu() * mask
    t_gen = time.perf_counter() - t0
    batch = sequences_batch(prompts, responses, mask.shape[1], actor.cfg.seq_len)
    micros = micro_batches(batch, range(len(prompts)), cfg.micro_batch_size)
    ref_logp = torch.cat([d["logp"] for d in roles.reference.forward(micros, reference_step)]).cpu() * mask
    raw = roles.scorer(prompts, responses).float().cpu()
    terms = {k: v.float().cpu() for k, v in getattr(roles.scorer, "last", {}).items()}  # a plain scorer has none
    return Sampled(responses=responses, mask=mask, old_logp=old_logp, ref_logp=ref_logp, raw=raw, terms=terms,
                   stopped=gen.stopped.cpu(), batch=batch, micros=micros, t_generate=t_gen)


def rollout(roles: Roles, cfg: PPOConfig, prompts: list[list[int]], *, kl_coef: float, end_id: int,
            generator: torch.Generator) -> Rollout:
    """Sample one response per row of ``prompts`` with the actor and score it: the reference's
    log-probs and KL, the reward, the critic's values and the advantages (GAE, or a critic-free
    estimator of :func:`ppo.critic_free_advantages`), whitened over all DP ranks unless
    ``whiten`` is off."""
    t0 = time.perf_counter()
    s = sample_and_score(roles, cfg, prompts, end_id=end_id, generator=generator)
    mask, stopped, batch, raw = s.mask, s.stopped, s.batch, s.raw
    score = raw.clamp(-cfg.reward_clip, cfg.reward_clip) + cfg.no_end_penalty * (~stopped).float()
    kl = ppo.kl_estimate(s.old_logp, s.ref_logp, cfg.kl.estimator) * mask
    values = torch.zeros_like(mask)
    if cfg.advantage == "gae":
        values = torch.cat([d["value"] for d in roles.critic.forward(s.micros, value_step(*roles.value_norm))])
        values = values.float().cpu() * mask
        rewards = ppo.token_rewards(score, kl, kl_coef, mask)
        advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        ev = dp_explained_variance(values, returns, mask)
    else:  # groups of samples_per_prompt consecutive rows: Rollouts repeats each prompt in place
        advantages = ppo.critic_free_advantages(cfg.advantage, score, kl, kl_coef, mask, cfg.samples_per_prompt)
        returns, ev = values, float("nan")
    if cfg.whiten:
        advantages = dp_whiten(advantages, mask)
    batch.update(mask=mask, old_logp=s.old_logp, advantages=advantages, old_values=values, returns=returns,
                 ref_logp=s.ref_logp, kl_coef=torch.full((1,), float(kl_coef)))
    return Rollout(prompts=prompts, responses=s.responses, batch=batch, raw=raw, terms=s.terms, score=score, kl=kl,
                   lengths=mask.sum(1).long(), stopped=stopped, explained_variance=ev, t_generate=s.t_generate,
                   t_score=time.perf_counter() - t0 - s.t_generate)
