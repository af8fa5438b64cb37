"""The critic-free advantage estimators (palm/train/ppo.py's table: grpo, dr_grpo, rloo, reinforce++,
reinforce++_baseline) against slow, obvious loops written from the papers' formulas, and mutation
checks: one checker per estimator is applied to the real function (it passes) and to copies with
one mistake each (a sign flip, a wrong baseline, the std kept, a missing KL term): each copy must
fail. Dr. GRPO's length-unbiased normaliser is checked on the loss, and through the actor's real
forward step: the count it hands the engine is the constant, not the valid tokens."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from palm.train import ppo  # noqa: E402

KINDS = ("grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline")


# --- slow references: Python floats, one row and one token at a time ----------------------------

def slow(kind: str, score: list[float], kl: list[list[float]], beta: float, lengths: list[int],
         k: int) -> list[list[float]]:
    """The advantage of every token of every row, from the formulas:

    * grpo (Shao et al. 2024): ``(s_i - mean) / (sample std + 1e-6)`` over the prompt's k samples;
    * dr_grpo (Liu et al. 2025): ``s_i - mean``;
    * rloo (Ahmadian et al. 2024; KL per sequence as TRL's RLOOTrainer): ``r_i = s_i - beta sum_t kl_it``,
      ``A_i = r_i - (sum_{j != i} r_j) / (k - 1)``;
    * reinforce++ (Hu 2025): reward ``-beta kl_t`` on every token plus ``s`` on the last, the return
      ``A_t = sum_{u >= t} reward_u`` (gamma = 1);
    * reinforce++_baseline (OpenRLHF's reinforce_baseline): the same with ``s_i - mean`` for ``s_i``.
    """
    b, t = len(score), len(kl[0])
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        g = range(i // k * k, i // k * k + k)  # the rows of i's prompt
        mean = sum(score[j] for j in g) / k
        n = lengths[i]
        if kind in ("grpo", "dr_grpo", "rloo"):
            if kind == "grpo":
                std = math.sqrt(sum((score[j] - mean) ** 2 for j in g) / (k - 1))
                a = (score[i] - mean) / (std + 1e-6)
            elif kind == "dr_grpo":
                a = score[i] - mean
            else:
                r = {j: score[j] - beta * sum(kl[j][:lengths[j]]) for j in g}
                a = r[i] - sum(r[j] for j in g if j != i) / (k - 1)
            for u in range(n):
                out[i][u] = a
        else:
            s = score[i] - mean if kind == "reinforce++_baseline" else score[i]
            for u in range(n):
                out[i][u] = sum(-beta * kl[i][v] + (s if v == n - 1 else 0.0) for v in range(u, n))
    return out


def cases(k: int) -> list[tuple]:
    """Random rollouts (groups of k rows, different lengths, one empty row, a constant group)."""
    g = torch.Generator().manual_seed(k)
    out = []
    for beta in (0.0, 0.3):
        b, t = 3 * k, 6
        lengths = [int(x) for x in torch.randint(1, t + 1, (b,), generator=g)]
        lengths[1] = t
        score = torch.randn(b, generator=g)
        score[2 * k:] = 0.7  # a group whose samples agree: no signal for the group estimators
        kl = torch.randn(b, t, generator=g).abs()
        out.append((score, kl, beta, lengths))
    return out


def check(kind: str, fn: Callable) -> None:
    """``fn`` (as :func:`ppo.critic_free_advantages`) equals :func:`slow` on every case; raises
    AssertionError where it does not."""
    for k in (2, 4):
        for score, kl, beta, lengths in cases(k):
            mask = torch.zeros_like(kl)
            for i, n in enumerate(lengths):
                mask[i, :n] = 1
            got = fn(kind, score, kl * mask, beta, mask, k)
            want = torch.tensor(slow(kind, score.tolist(), (kl * mask).tolist(), beta, lengths, k))
            assert torch.allclose(got, want, atol=1e-4), (kind, k, beta, (got - want).abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_each_estimator_equals_the_slow_loop(kind):
    check(kind, ppo.critic_free_advantages)


def test_the_group_estimators_see_no_signal_in_a_constant_group_and_reinforce_does():
    k = 4
    score = torch.full((k,), 2.0)
    mask = torch.ones(k, 3)
    for kind in ("grpo", "dr_grpo", "rloo", "reinforce++_baseline"):
        assert (ppo.critic_free_advantages(kind, score, torch.zeros(k, 3), 0.1, mask, k) == 0).all(), kind
    assert (ppo.critic_free_advantages("reinforce++", score, torch.zeros(k, 3), 0.1, mask, k) == 2.0).all()
    with pytest.raises(ValueError, match="unknown critic-free advantage 'gae'"):
        ppo.critic_free_advantages("gae", score, torch.zeros(k, 3), 0.1, mask, k)


# --- mutation checks: each copy has one mistake; the checker must catch it -------------------------

def _real(kind, score, kl, beta, mask, k):
    return ppo.critic_free_advantages(kind, score, kl, beta, mask, k)


def sign_flipped(kind, score, kl, beta, mask, k):
    return -_real(kind, score, kl, beta, mask, k)


def rloo_with_itself_in_the_baseline(kind, score, kl, beta, mask, k):
    g = ppo.rloo_scores(score, kl, beta, mask).view(-1, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)[:, None] * mask  # the mean of all k, not of the others


def rloo_without_kl(kind, score, kl, beta, mask, k):
    return ppo.rloo_advantages(score, k)[:, None] * mask


def dr_grpo_keeping_the_std(kind, score, kl, beta, mask, k):
    return ppo.group_advantages(score, k)[:, None] * mask


def reinforce_without_kl(kind, score, kl, beta, mask, k):
    return _real(kind, score, kl, 0.0, mask, k)


def reinforce_without_return(kind, score, kl, beta, mask, k):  # each token's own reward, not the sum to the end
    s = ppo.group_centered(score, k) if kind == "reinforce++_baseline" else score
    return ppo.token_rewards(s, kl, beta, mask)


def baseline_left_out(kind, score, kl, beta, mask, k):
    return _real("reinforce++", score, kl, beta, mask, k)


def grpo_population_std(kind, score, kl, beta, mask, k):
    g = score.view(-1, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)[:, None] * mask


MUTANTS = [(kind, sign_flipped) for kind in KINDS] + [
    ("rloo", rloo_with_itself_in_the_baseline), ("rloo", rloo_without_kl), ("dr_grpo", dr_grpo_keeping_the_std),
    ("reinforce++", reinforce_without_kl), ("reinforce++_baseline", reinforce_without_kl),
    ("reinforce++", reinforce_without_return), ("reinforce++_baseline", reinforce_without_return),
    ("reinforce++_baseline", baseline_left_out), ("grpo", grpo_population_std)]


@pytest.mark.parametrize("kind,mutant", MUTANTS, ids=[f"{k}-{m.__name__}" for k, m in MUTANTS])
def test_the_checker_catches_each_mutant(kind, mutant):
    check(kind, _real)  # the real one passes the same checker
    with pytest.raises(AssertionError):
        check(kind, mutant)


# --- Dr. GRPO's constant normaliser ---------------------------------------------------------------

def test_dr_grpo_loss_is_summed_over_tokens_and_divided_by_a_constant():
    """``(1 / (rows x max_new_tokens)) sum_i sum_t loss_it``: each token of a long response weighs
    the same as one of a short response, in any batch (token-mean weighs a token by 1 / the batch's
    token count, which changes with the other rows' lengths)."""
    T = 6
    g = torch.Generator().manual_seed(3)
    logp, old = torch.randn(4, T, generator=g) * 0.1, torch.randn(4, T, generator=g) * 0.1
    adv = torch.randn(4, T, generator=g)

    def weight_of_token_00(lengths):  # d loss / d logp[0, 0] under the Dr. GRPO normaliser
        mask = torch.zeros(4, T)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        x = logp.clone().requires_grad_(True)
        loss, count, _ = ppo.policy_loss(x, old, adv, mask, clip=10.0)  # no clipping: a plain ratio
        (loss / ppo.constant_count(4, T)).backward()
        slow_loss = sum(-adv[i, t].item() * math.exp(logp[i, t].item() - old[i, t].item())
                        for i in range(4) for t in range(lengths[i])) / (4 * T)
        assert (loss / ppo.constant_count(4, T)).item() == pytest.approx(slow_loss, rel=1e-5)
        assert count == sum(lengths)  # the valid tokens: what the other estimators divide by
        return x.grad[0, 0].item()

    assert weight_of_token_00([6, 1, 1, 1]) == pytest.approx(weight_of_token_00([6, 6, 6, 6]), rel=1e-6)
    assert int(ppo.constant_count(4, T)) == 24


def test_the_actor_step_hands_the_engine_the_constant_count_for_dr_grpo_only(single):
    """Through the real forward step of the actor on a tiny PaLM: ``dr_grpo``'s loss function
    returns ``rows x max_new_tokens`` as its count (with the KL term in the loss), the others the
    valid tokens; ``rloo`` and ``reinforce++`` have no KL term in the loss (it is in their reward)."""
    from helpers import MODEL

    from palm.model.network import PaLM
    from palm.train.rlhf.config import KLConfig, PPOConfig
    from palm.train.rlhf.rollout import sequences_batch
    from palm.train.rlhf.steps import actor_forward_step

    torch.manual_seed(0)
    model = PaLM(MODEL)
    prompts, responses = [[5, 6, 7], [8, 9], [10, 11, 12], [13]], [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]]
    n = 6
    batch = sequences_batch(prompts, responses, n, MODEL.seq_len)
    mask = torch.zeros(4, n)
    for i, r in enumerate(responses):
        mask[i, :len(r)] = 1
    g = torch.Generator().manual_seed(1)
    batch.update(mask=mask, old_logp=-torch.rand(4, n, generator=g) * 3 * mask, advantages=torch.randn(4, n, generator=g) * mask,
                 ref_logp=-torch.rand(4, n, generator=g) * 3 * mask, kl_coef=torch.full((1,), 0.5))
    base = PPOConfig(max_new_tokens=n, samples_per_prompt=2, whiten=False, kl=KLConfig(coef=0.5))
    totals = {}
    for kind in KINDS:
        cfg = dataclasses.replace(base, advantage=kind)
        output, loss_func = actor_forward_step(cfg)(batch, model)
        total, count, metrics = loss_func(output)
        assert int(count) == (4 * n if kind == "dr_grpo" else int(mask.sum())), kind
        assert metrics["policy_loss"][1].item() == mask.sum().item()  # metrics stay per valid token
        totals[kind] = total.item()
    # the same advantages in the batch: the totals differ only by the KL term, there for grpo and dr_grpo
    assert totals["grpo"] == pytest.approx(totals["dr_grpo"]) and totals["rloo"] == pytest.approx(totals["reinforce++"])
    assert totals["grpo"] > totals["rloo"]  # + beta x k3 (>= 0, and > 0 here) in the loss
