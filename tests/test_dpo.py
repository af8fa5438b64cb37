"""DPO and its kin at the library level: every loss against TRL's published formulas and a slow
per-pair loop, mutation checks (a sign flip, a missing reference term, IPO without the per-token
average, SimPO without its margin each fail the check), the engine's loss and metrics on a real
tiny model against per-sequence log-probs computed row by row, and the config's checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, chat_data, redraw_weights  # noqa: E402

from palm.core.config import ConfigError  # noqa: E402
from palm.train.dpo import LOSSES, DPOConfig, dpo_forward_step, pair_batch, preference_loss  # noqa: E402


# --- TRL's formulas, transcribed ----------------------------------------------------------------
# huggingface/trl, trl/trainer/dpo_trainer.py, DPOTrainer.dpo_loss (loss_type "sigmoid" with
# label_smoothing: cDPO; "ipo", whose log-probs concatenated_forward averages over the completion's
# tokens), and trl/trainer/cpo_trainer.py, CPOTrainer.cpo_loss with loss_type "simpo" (average
# log-probs, gamma_logratios = simpo_gamma / beta).

def trl_dpo(pc, pr, rc, rr, beta, label_smoothing=0.0):
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * (pc - rc), beta * (pr - rr)


def trl_ipo(pc, pr, rc, rr, beta, nc, nr):
    pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    logits = (pc - pr) - (rc - rr)
    return (logits - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)


def trl_simpo(pc, pr, beta, gamma, nc, nr):
    pc, pr = pc / nc, pr / nr
    logits = (pc - pr) - gamma / beta
    return -F.logsigmoid(beta * logits), beta * pc, beta * pr


def trl(kind: str, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
    if kind == "sigmoid":
        return trl_dpo(pc, pr, rc, rr, beta)
    if kind == "cdpo":
        return trl_dpo(pc, pr, rc, rr, beta, eps)
    if kind == "ipo":
        return trl_ipo(pc, pr, rc, rr, beta, nc, nr)
    return trl_simpo(pc, pr, beta, gamma, nc, nr)


# --- a slow, obvious per-pair loop (the papers' equations, in floats) ---------------------------

def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def slow(kind: str, pc, pr, rc, rr, nc, nr, beta, eps, gamma) -> list[float]:
    out = []
    for i in range(len(pc)):
        if kind == "simpo":  # Meng et al. 2024, eq. 6
            out.append(-log_sigmoid(beta / nc[i] * pc[i] - beta / nr[i] * pr[i] - gamma))
        elif kind == "ipo":  # Azar et al. 2023, eq. 17, per-token averages
            h = (pc[i] / nc[i] - rc[i] / nc[i]) - (pr[i] / nr[i] - rr[i] / nr[i])
            out.append((h - 1 / (2 * beta)) ** 2)
        else:  # Rafailov et al. 2023, eq. 7; Mitchell 2023 with eps
            h = (pc[i] - rc[i]) - (pr[i] - rr[i])
            e = eps if kind == "cdpo" else 0.0
            out.append(-(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h))
    return out


def cases(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 40, (n,), generator=g).double()
    nr = torch.randint(1, 40, (n,), generator=g).double()
    pc, pr = -nc * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64)), -nr * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr, nc, nr


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
SETTINGS = [(0.1, 0.1, 0.5), (0.5, 0.25, 1.0), (2.0, 0.05, 0.3)]  # (beta, label_smoothing, simpo_gamma)


def matches_references(fn: LossFn, kind: str) -> bool:
    """Whether ``fn`` (:func:`preference_loss`'s signature) gives TRL's losses and rewards and the
    slow loop's losses, to 1e-6, over random log-probs and several settings."""
    for seed, (beta, eps, gamma) in enumerate(SETTINGS):
        pc, pr, rc, rr, nc, nr = cases(seed)
        loss, reward_c, reward_r = fn(kind, pc, pr, rc, rr, beta=beta, label_smoothing=eps if kind == "cdpo" else 0.0,
                                      simpo_gamma=gamma, chosen_tokens=nc, rejected_tokens=nr)
        want, want_c, want_r = trl(kind, pc, pr, rc, rr, nc, nr, beta, eps, gamma)
        slow_loss = torch.tensor(slow(kind, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc.tolist(),
                                      nr.tolist(), beta, eps, gamma), dtype=torch.float64)
        for got, ref in ((loss, want), (reward_c, want_c), (reward_r, want_r), (loss, slow_loss)):
            if not torch.allclose(got, ref, atol=1e-6, rtol=0):
                return False
    return True


@pytest.mark.parametrize("kind", LOSSES)
def test_each_loss_equals_trl_and_a_slow_loop(kind):
    assert matches_references(preference_loss, kind)


# --- mutation checks: each wrong variant must fail the same check --------------------------------

def flipped_sign(kind, pc, pr, rc, rr, **kw):
    return preference_loss(kind, pr, pc, rr, rc, **{**kw, "chosen_tokens": kw["rejected_tokens"],
                                                   "rejected_tokens": kw["chosen_tokens"]})


def no_reference(kind, pc, pr, rc, rr, **kw):
    return preference_loss(kind, pc, pr, torch.zeros_like(rc), torch.zeros_like(rr), **kw)


def no_token_average(kind, pc, pr, rc, rr, **kw):
    ones = torch.ones_like(pc)
    return preference_loss(kind, pc, pr, rc, rr, **{**kw, "chosen_tokens": ones, "rejected_tokens": ones})


def no_margin(kind, pc, pr, rc, rr, **kw):
    return preference_loss(kind, pc, pr, rc, rr, **{**kw, "simpo_gamma": 0.0})


def beta_outside(kind, pc, pr, rc, rr, **kw):
    loss, c, r = preference_loss(kind, pc, pr, rc, rr, **{**kw, "beta": 1.0})
    return loss * kw["beta"], c * kw["beta"], r * kw["beta"]


def no_smoothing(kind, pc, pr, rc, rr, **kw):
    return preference_loss(kind, pc, pr, rc, rr, **{**kw, "label_smoothing": 0.0})


MUTANTS = [(flipped_sign, LOSSES), (no_reference, ("sigmoid", "cdpo", "ipo")), (no_token_average, ("ipo", "simpo")),
           (no_margin, ("simpo",)), (beta_outside, LOSSES), (no_smoothing, ("cdpo",))]


@pytest.mark.parametrize("mutant,kind", [(m, k) for m, kinds in MUTANTS for k in kinds],
                         ids=[f"{m.__name__}-{k}" for m, kinds in MUTANTS for k in kinds])
def test_a_mutated_loss_fails_the_reference_check(mutant, kind):
    assert not matches_references(mutant, kind)


def test_unknown_loss_is_refused():
    pc, pr, rc, rr, nc, nr = cases()
    with pytest.raises(ValueError, match="unknown preference loss 'hinge'"):
        preference_loss("hinge", pc, pr, rc, rr, beta=0.1, chosen_tokens=nc, rejected_tokens=nr)


# --- the engine's loss on a real model -------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return chat_data(tmp_path_factory.mktemp("dpo"))


def row_logp(model, prompt: list[int], reply: list[int]) -> tuple[float, int]:
    """log p(reply | prompt) of one unpadded sequence, token by token from the full logits."""
    seq = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model.logits(model.trunk(seq[:, :-1]))[0, :, :MODEL.vocab_size].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(reply)), len(reply)


@pytest.mark.parametrize("kind", LOSSES)
def test_forward_step_equals_the_loss_of_row_by_row_log_probs(inputs, single, kind):
    """The micro-batch's summed loss and metrics equal :func:`preference_loss` on log-probs computed
    one unpadded sequence at a time; a padding pair counts for nothing."""
    from palm.model.network import PaLM
    from palm.train.reward import read_rows

    policy = PaLM(MODEL, seed=3).eval()
    redraw_weights(policy, 3)
    reference = PaLM(MODEL, seed=4).eval()
    redraw_weights(reference, 4)
    rows = read_rows(inputs["prefs"], "train", inputs["sha"])[:3]
    cfg = DPOConfig(micro_batch_size=8, loss=kind, beta=0.3, label_smoothing=0.1 if kind == "cdpo" else 0.0)
    batch = pair_batch([*rows, None], MODEL.seq_len)
    mine = [row_logp(policy, r["prompt_ids"], r[s]) for s in ("chosen_ids", "rejected_ids") for r in rows]
    ref = [row_logp(reference, r["prompt_ids"], r[s]) for s in ("chosen_ids", "rejected_ids") for r in rows]
    # the padding pair's rows (3 and 7) get arbitrary reference values: they must not count
    batch["ref_logp"] = torch.tensor([ref[0][0], ref[1][0], ref[2][0], 5.0, ref[3][0], ref[4][0], ref[5][0], -5.0])
    with torch.no_grad():
        output, loss_func = dpo_forward_step(cfg, MODEL.vocab_size)(batch, policy)
        total, pairs, metrics = loss_func(output)
    lp = torch.tensor([m[0] for m in mine], dtype=torch.float64)
    rp = torch.tensor([r[0] for r in ref], dtype=torch.float64)
    n = torch.tensor([m[1] for m in mine], dtype=torch.float64)
    want, rc, rr = preference_loss(kind, lp[:3], lp[3:], rp[:3], rp[3:], beta=cfg.beta,
                                   label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                                   chosen_tokens=n[:3], rejected_tokens=n[3:])
    assert pairs.item() == 3
    assert abs(total.item() - want.sum().item()) <= 1e-4
    for name, value in (("rewards_chosen", rc.mean()), ("rewards_rejected", rr.mean()), ("margin", (rc - rr).mean()),
                        ("accuracy", (rc > rr).double().mean()), ("logps_chosen", lp[:3].mean())):
        got = metrics[name][0] / metrics[name][1]
        assert abs(got.item() - value.item()) <= 1e-4, name


def test_pair_batch_masks_the_reply_tokens_only(inputs):
    from palm.train.reward import read_rows

    rows = read_rows(inputs["prefs"], "train", inputs["sha"])[:2]
    b = pair_batch(rows, MODEL.seq_len)
    for i, (r, side) in enumerate((r, s) for s in ("chosen_ids", "rejected_ids") for r in rows):
        seq = r["prompt_ids"] + r[side]
        counted = [b["labels"][i, t].item() for t in range(MODEL.seq_len) if b["loss_mask"][i, t]]
        assert counted == r[side]  # exactly the reply's tokens are predicted and counted
        assert b["tokens"][i, :len(seq) - 1].tolist() == seq[:-1]


def test_config_checks_are_one_line_and_name_the_key():
    assert DPOConfig(micro_batch_size=6).pairs_per_micro_batch == 3
    assert DPOConfig(loss="simpo").reference_free and not DPOConfig().reference_free
    for kwargs, key in (({"micro_batch_size": 5}, "micro_batch_size"), ({"beta": 0.0}, "beta"),
                        ({"loss": "cdpo", "label_smoothing": 0.5}, "label_smoothing"),
                        ({"label_smoothing": 0.1}, "label_smoothing"), ({"simpo_gamma": -1.0}, "simpo_gamma")):
        with pytest.raises(ConfigError, match=key):
            DPOConfig(**kwargs)
