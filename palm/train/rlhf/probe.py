"""The over-optimisation probe: every ``gold_interval`` iterations the policy answers a fixed set
of prompts, and the gold rule judge (:mod:`palm.data.rules`), the proxy reward and the KL to the
reference are measured on the same replies. Plotted against √KL, proxy and gold show where
optimising the reward model stops helping (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", whose x-axis is √KL).

The probe prompts are set apart from the train split before training: PPO never samples them,
and ``evaluate`` reports on the valid split, so choosing a checkpoint by the probe
(``select: best_gold``) does not leak into the reported numbers. Every probe samples with the
same seed, so two points differ by the policy, not by the draw.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Callable

import numpy as np
import torch
from megatron.core import parallel_state as ps

from palm.data import rules
from palm.train.rlhf.config import PPOConfig
from palm.train.rlhf.roles import Roles
from palm.train.rlhf.rollout import dp_sum, sample_and_score

MEASURES = ("score", "names", "signature", "f1", "rouge_l", "repetition")  # gold_<m> columns
COLUMNS = (*(f"gold_{m}" for m in MEASURES), "proxy_reward", "probe_kl", "probe_length", "gold_warning")


def split_probe(examples: list[tuple[list[int], list[int]]], size: int,
                seed: int) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
    """``(train, probe)``: a seeded choice of ``size`` prompts (at most a quarter of them) set
    apart from the training prompts; the rest keep their order."""
    size = min(size, len(examples) // 4)
    chosen = set(random.Random(f"{seed}:probe").sample(range(len(examples)), size)) if size else set()
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


@dataclasses.dataclass
class Probe:
    """This DP rank's share of the probe, as token ids and as text for the judge."""

    prompts: list[list[int]]
    prompt_text: list[str]
    answers: list[str]
    seed: int

    @classmethod
    def of(cls, probe: list[tuple[list[int], list[int]]], decode: Callable[..., str], seed: int) -> "Probe":
        mine = probe[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
        return cls([p for p, _ in mine], [decode(p, special=True) for p, _ in mine], [decode(a) for _, a in mine],
                   seed)

    def measure(self, roles: Roles, cfg: PPOConfig, *, end_id: int, decode: Callable[..., str]) -> dict[str, float]:
        """The gold measures (means over all DP ranks' probe prompts; a check that does not apply
        to a prompt leaves it out), the proxy reward, the KL (k1, summed over a reply's tokens:
        unbiased at temperature 1) and the reply length; ``gold_score_se`` for the warning."""
        from palm.model.megatron_compat import device

        seed = int(np.random.SeedSequence([self.seed, ps.get_data_parallel_rank(), 7]).generate_state(1)[0])
        s = sample_and_score(roles, cfg, self.prompts, end_id=end_id,
                             generator=torch.Generator(device=device()).manual_seed(seed))
        judged = [rules.judge(p, a, decode(r)) for p, a, r in zip(self.prompt_text, self.answers, s.responses)]
        sums = []
        for m in MEASURES:
            values = [j[m] for j in judged if j[m] is not None]
            sums += [sum(values), len(values)]
        scores = [j["score"] for j in judged]
        kl = ((s.old_logp - s.ref_logp) * s.mask).sum(1)
        total = dp_sum(torch.tensor([*sums, float(s.raw.sum()), float(kl.sum()), float(s.mask.sum()),
                                     float(sum(x * x for x in scores)), float(len(judged))], dtype=torch.float64))
        n = float(total[-1])
        out = {f"gold_{m}": float(total[2 * i] / total[2 * i + 1]) if total[2 * i + 1] > 0 else math.nan
               for i, m in enumerate(MEASURES)}
        out.update(proxy_reward=float(total[-5] / n), probe_kl=float(total[-4] / n), probe_length=float(total[-3] / n))
        var = max(float(total[-2]) / n - out["gold_score"] ** 2, 0.0)
        out["gold_score_se"] = math.sqrt(var / max(n - 1, 1))
        return out


def falling(history: list[dict[str, float]], now: dict[str, float]) -> str | None:
    """A one-line warning when gold is below its peak by more than two standard errors while the
    proxy is above its value at that peak: the policy is optimising the reward model's errors."""
    if not history:
        return None
    peak = max(history, key=lambda h: h["gold_score"])
    if now["gold_score"] < peak["gold_score"] - 2 * now["gold_score_se"] and now["proxy_reward"] > peak["proxy_reward"]:
        return (f"gold score {now['gold_score']:.3f} fell below its peak {peak['gold_score']:.3f} (iteration "
                f"{int(peak['iteration'])}) while the proxy reward rose {peak['proxy_reward']:.3f} -> "
                f"{now['proxy_reward']:.3f}: over-optimisation of the reward model (raise ppo.kl.coef, fewer "
                "ppo.train_steps, or ppo.select: best_gold)")
    return None
