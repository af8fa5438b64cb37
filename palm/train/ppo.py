"""RLHF with PPO: the maths, as small pure functions over per-token tensors.

Shapes: a rollout batch is ``[b, t]`` over the *response* tokens of ``b`` sequences, with
``mask [b, t]`` 1 on real response tokens (a prefix of each row: the response, then padding).
``logp`` are log-probs of the sampled tokens under the current policy, ``old_logp`` under the
policy that sampled them, ``ref_logp`` under the frozen reference (the SFT model).

References: PPO (Schulman et al. 2017, clipped surrogate and clipped value loss), GAE (Schulman
et al. 2016), the per-token KL penalty to a reference and the adaptive KL coefficient (Ziegler et
al. 2019, "Fine-Tuning Language Models from Human Preferences"; Stiennon et al. 2020), the k1/k3
KL estimators (Schulman 2020, "Approximating KL divergence"), and group-relative advantages
without a critic (GRPO, Shao et al. 2024, "DeepSeekMath").

The critic-free estimators (``ppo.advantage``), ``score [b]`` one number per sequence, rows in
consecutive groups of ``k = samples_per_prompt`` (the samples of one prompt), and where the KL
penalty goes in each:

==========================  ====================================================  ==================
estimator                   advantage of every token of sample ``i``              KL to the reference
==========================  ====================================================  ==================
``grpo`` (Shao 2024)        ``(s_i - mean_g s) / std_g s``                         ``+β·k3`` in the loss
``dr_grpo`` (Liu 2025)      ``s_i - mean_g s``; the loss summed over tokens and    ``+β·k3`` in the loss
                            divided by ``rows x max_new_tokens`` (a constant)
``rloo`` (Ahmadian 2024)    ``r_i - mean_{j != i} r_j``, ``r = s - β·Σ_t KL_t``    in the score, per
                                                                                   sequence (as TRL's)
``reinforce++`` (Hu 2025)   ``Σ_{u >= t} (-β·KL_u + s·[u last])`` (γ = 1)          per token, in the
                                                                                   reward
``reinforce++_baseline``    the same with ``s_i - mean_g s`` for ``s``             per token, in the
                                                                                   reward
==========================  ====================================================  ==================

Whitening over the whole rollout (``ppo.whiten``) is REINFORCE++'s batch normalisation (Hu 2025,
OpenRLHF normalises ``reinforce`` and ``reinforce_baseline`` this way); ``dr_grpo`` refuses it,
since dividing by a standard deviation is what it removes.

Losses return ``(sum over valid tokens, number of valid tokens)`` so that they plug into the
engine's per-token normalisation (``palm.train.engine``): every valid token of the global batch
weighs the same, however response lengths differ between micro-batches and DP ranks.
"""

from __future__ import annotations

import dataclasses

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the valid tokens (population std); padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens.

    ``k1 = log p - log q`` is unbiased but can be negative per token; ``k3 = (r - 1) - log r`` with
    ``r = q / p`` is unbiased and always >= 0, with lower variance when the policies are close.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1 or k3)")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (0 for an empty row): ``[b, t]`` -> ``[b]``."""
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every response token, plus the sequence's score
    (the reward model's, normalised) on its last token. ``score [b]`` -> ``[b, t]``."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_tokens = mask.sum(dim=1) > 0
    rewards[rows, last_index(mask)] += score * has_tokens
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's valid prefix: ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last valid token is 0: the episode
    ends there), ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``. One backward scan
    over the time axis, vectorised over rows.
    """
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        a = delta + gamma * lam * next_adv
        adv[:, i] = a * m
        # past the end of a row, the "next" state is terminal: nothing flows back from padding
        next_adv = a * m
        next_value = values[:, i] * m
    return adv, (adv + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's score relative to the other samples of its prompt, ``(s - mean) / std``
    within consecutive groups of ``group_size`` (sample std; 0 where a group is constant)."""
    g = scores.view(-1, group_size)
    std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", after Kool et al. 2019): each sample's score
    minus the mean of the *other* ``group_size - 1`` samples of its prompt,
    ``s_i - (sum_g s - s_i) / (k - 1)``. Its expectation is the true advantage (the baseline does
    not depend on the sample). ``[b]`` -> ``[b]``."""
    g = scores.view(-1, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def rloo_scores(score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """RLOO's reward: the score less ``β`` times the sequence's summed KL (the KL as a sequence-level
    penalty, as TRL's RLOOTrainer puts it by default), ``[b]``."""
    return score - kl_coef * (kl * mask).sum(dim=1)


def group_centered(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """The score less its group's mean, *not* divided by the group's std: Dr. GRPO (Liu et al.
    2025, "Understanding R1-Zero-Like Training": the std favours prompts whose samples agree, too
    easy or too hard) and REINFORCE++-baseline (OpenRLHF's ``reinforce_baseline``). ``[b]`` ->
    ``[b]``."""
    g = scores.view(-1, group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def constant_count(rows: int, max_new_tokens: int) -> torch.Tensor:
    """Dr. GRPO's loss normaliser: a constant ``rows x max_new_tokens`` in place of the number of
    valid tokens, so that a long response's tokens weigh no less than a short one's (dividing by
    each sequence's or each batch's length biases towards long wrong answers; Liu et al. 2025,
    verl's ``seq-mean-token-sum-norm``). Returned as the ``num_tokens`` of a loss function, the
    engine's sum over micro-batches and DP ranks stays one constant per mini-batch."""
    return torch.tensor(rows * max_new_tokens)


def reinforce_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs";
    OpenRLHF's ``reinforce``): the return of each token, the sum of the per-token rewards from it to
    the end of its row (γ = 1), no critic. With :func:`token_rewards` that is
    ``-β·Σ_{u >= t} KL_u + s``. ``[b, t]`` -> ``[b, t]``, 0 on padding."""
    r = rewards * mask
    return r.flip(1).cumsum(1).flip(1) * mask


CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline")
KL_IN_LOSS = ("grpo", "dr_grpo")  # the others put -β·KL into the reward


def critic_free_advantages(kind: str, score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """The per-token advantages ``[b, t]`` of a critic-free estimator (the table above) from the
    sequences' scores ``[b]`` and the per-token KL ``[b, t]`` (used by those that put the KL into
    the reward), before any whitening; 0 on padding."""
    if kind == "grpo":
        per_row = group_advantages(score, group_size)
    elif kind == "dr_grpo":
        per_row = group_centered(score, group_size)
    elif kind == "rloo":
        per_row = rloo_advantages(rloo_scores(score, kl, kl_coef, mask), group_size)
    elif kind in ("reinforce++", "reinforce++_baseline"):
        s = group_centered(score, group_size) if kind == "reinforce++_baseline" else score
        return reinforce_returns(token_rewards(s, kl, kl_coef, mask), mask)
    else:
        raise ValueError(f"unknown critic-free advantage {kind!r} ({', '.join(CRITIC_FREE)})")
    return per_row[:, None] * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate ``max(-A r, -A clip(r, 1-e, 1+e))`` with ``r = exp(logp - old_logp)``:
    ``(loss sum, valid tokens, clipped tokens)``."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return (loss * mask).sum(), mask.sum(), ((clipped > unclipped).float() * mask).sum()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2)``:
    ``(loss sum, valid tokens)``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())
    return (loss * mask).sum(), mask.sum()


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(old || new) of an update (k3 estimator), the early-stopping signal."""
    return masked_mean(kl_estimate(old_logp, logp, "k3"), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over valid tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse."""
    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)).square(), mask)

    return 1.0 - var(returns - values) / var(returns).clamp(min=1e-12)


@dataclasses.dataclass
class AdaptiveKL:
    """The KL coefficient controller of Ziegler et al. 2019: move ``coef`` proportionally towards
    keeping the observed KL at ``target`` (error clipped to +-20 %), with time scale ``horizon``
    (in sequences). ``target=None`` keeps the coefficient fixed."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_sequences: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_sequences / self.horizon
        return self.coef
