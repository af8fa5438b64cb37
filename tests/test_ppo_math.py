"""PPO's maths (palm/train/ppo.py) against slow, obvious implementations: Python loops over rows
and time steps, written straight from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from palm.train import ppo

torch.manual_seed(0)
B, T = 4, 7


def rollout():
    lengths = [7, 3, 1, 5]  # responses of different lengths (a prefix of each row is valid)
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask, lengths


def test_gae_equals_a_naive_backwards_loop():
    mask, lengths = rollout()
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expect = [0.0] * T
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0  # terminal after the last token
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            running = delta + gamma * lam * running
            expect[t] = running
        assert torch.allclose(adv[i], torch.tensor(expect), atol=1e-5), i
        assert torch.allclose(ret[i, :n], adv[i, :n] + values[i, :n], atol=1e-6)
        assert (ret[i, n:] == 0).all() and (adv[i, n:] == 0).all()


def test_token_rewards_put_the_score_on_the_last_real_token():
    mask, lengths = rollout()
    kl = torch.randn(B, T)
    score = torch.tensor([1.0, -2.0, 0.5, 3.0])
    got = ppo.token_rewards(score, kl, 0.1, mask)
    for i, n in enumerate(lengths):
        for t in range(T):
            want = (-0.1 * kl[i, t].item() if t < n else 0.0) + (score[i].item() if t == n - 1 else 0.0)
            assert math.isclose(got[i, t].item(), want, abs_tol=1e-6), (i, t)


def test_kl_estimators():
    logp, ref = torch.randn(50), torch.randn(50)
    for i in range(50):
        p, q = logp[i].item(), ref[i].item()
        assert math.isclose(ppo.kl_estimate(logp, ref, "k1")[i].item(), p - q, abs_tol=1e-6)
        r = math.exp(q - p)
        assert math.isclose(ppo.kl_estimate(logp, ref, "k3")[i].item(), (r - 1) - math.log(r), rel_tol=1e-5, abs_tol=1e-6)
    assert (ppo.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1 or k3"):
        ppo.kl_estimate(logp, ref, "k2")
    # both are unbiased for KL(p || q) when sampling from p: check on a small categorical
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum().item()
    for kind in ("k1", "k3"):
        expectation = (p * ppo.kl_estimate(p.log(), q.log(), kind)).sum().item()
        assert math.isclose(expectation, exact, rel_tol=1e-5), kind


def test_clipped_policy_and_value_losses():
    mask, _ = rollout()
    logp, old = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3
    adv, values, old_values, returns = (torch.randn(B, T) for _ in range(4))
    clip = 0.2
    loss, count, clipped = ppo.policy_loss(logp, old, adv, mask, clip)
    vloss, vcount = ppo.value_loss(values, old_values, returns, mask, clip)
    want = want_clip = want_v = 0.0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            rc = min(max(r, 1 - clip), 1 + clip)
            want += max(-a * r, -a * rc)
            want_clip += float(-a * rc > -a * r)
            v, vo, R = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            vc = vo + min(max(v - vo, -clip), clip)
            want_v += 0.5 * max((v - R) ** 2, (vc - R) ** 2)
    assert count == vcount == mask.sum()
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    assert clipped.item() == want_clip
    assert math.isclose(vloss.item(), want_v, rel_tol=1e-5)


def test_group_relative_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    got = ppo.group_advantages(scores, 3)
    for g in range(2):
        s = scores[3 * g:3 * g + 3].tolist()
        mean = sum(s) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / 2)  # sample std
        for j in range(3):
            assert math.isclose(got[3 * g + j].item(), (s[j] - mean) / (std + 1e-6), abs_tol=1e-5)
    assert (got[3:] == 0).all()  # a constant group carries no signal


def test_whiten_explained_variance_and_adaptive_kl():
    mask, _ = rollout()
    x = torch.randn(B, T) * 3 + 2
    w = ppo.masked_whiten(x, mask)
    vals = [w[i, t].item() for i in range(B) for t in range(T) if mask[i, t]]
    mean = sum(vals) / len(vals)
    assert abs(mean) < 1e-5 and abs(sum((v - mean) ** 2 for v in vals) / len(vals) - 1) < 1e-4
    assert (w[mask == 0] == 0).all()
    returns = torch.randn(B, T)
    assert ppo.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros(B, T) + ppo.masked_mean(returns, mask), returns, mask).item() == pytest.approx(0.0, abs=1e-5)
    ctl = ppo.AdaptiveKL(coef=0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +20 %
    assert ppo.AdaptiveKL(coef=0.1).update(100.0, 10) == 0.1  # no target: fixed


def test_the_probe_is_set_apart_seeded_and_small():
    from palm.train.rlhf.probe import split_probe

    examples = [([i], [i + 100]) for i in range(40)]
    train, probe = split_probe(examples, 8, seed=3)
    assert len(probe) == 8 and len(train) == 32 and not {tuple(p) for p, _ in probe} & {tuple(p) for p, _ in train}
    assert [e for e in examples if e not in probe] == train  # the rest keep their order
    assert split_probe(examples, 8, seed=3) == (train, probe) and split_probe(examples, 8, seed=4)[1] != probe
    assert len(split_probe(examples, 100, seed=3)[1]) == 10  # at most a quarter
    assert split_probe(examples[:3], 8, seed=3) == (examples[:3], [])


def test_the_overoptimisation_warning():
    from palm.train.rlhf.probe import falling

    peak = {"iteration": 5.0, "gold_score": 0.30, "proxy_reward": 0.2, "gold_score_se": 0.01}
    history = [{"iteration": 0.0, "gold_score": 0.25, "proxy_reward": 0.0, "gold_score_se": 0.01}, peak]
    assert falling([], peak) is None
    line = falling(history, {"gold_score": 0.20, "proxy_reward": 0.5, "gold_score_se": 0.01})
    assert "fell below its peak 0.300 (iteration 5)" in line and "0.200 -> 0.500" in line and "\n" not in line
    assert falling(history, {"gold_score": 0.29, "proxy_reward": 0.5, "gold_score_se": 0.01}) is None  # within 2 SE
    assert falling(history, {"gold_score": 0.20, "proxy_reward": 0.1, "gold_score_se": 0.01}) is None  # proxy fell too
