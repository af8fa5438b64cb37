"""The ``evaluate`` stage's measurements: does each policy the DAG trained (PPO, DPO, …) beat the
SFT policy it started from, at what cost, and how good are the models the pipeline made?

On held-out prompts (the valid split of the SFT conversations, each cut before its last reply:
prompts no policy trained on), SFT and every policy each sample ``samples_per_prompt`` replies per
prompt with the same sampling settings and the same seeds (batch ``j`` draws from a generator
seeded ``seed + j`` for every policy, so adding a policy changes no other's numbers), and the
reward model scores every prompt + reply at its last token, normalised with the mean and std the
reward stage saved.

**Names.** SFT is the baseline every other policy is compared with; ``ppo`` is required, ``dpo``
(and any later policy of :data:`POLICIES`) is compared when given. A policy's own value of a
measure is ``<measure>_<policy>`` (``reward_sft``, ``reward_ppo``, ``reward_dpo``, ``gold_rm_dpo``).
A comparison of a policy with SFT is ``<measure>`` for PPO (its names from when it was the only
policy: dashboards and the registry's champion rule read them) and ``<measure>_<policy>`` for any
other (``win_rate`` and ``win_rate_dpo``, ``kl`` and ``kl_dpo``, ``gold_score_gain`` and
``gold_score_gain_dpo``); a standard error always ends the name (``win_rate_se``,
``win_rate_dpo_se``). :func:`versus` makes those names, :func:`policy_view` reads one policy's
metrics back under PPO's names. One helper, :func:`paired`, compares a policy with SFT for every
judge (gain, win rate and their standard errors over the prompts). Reported:

* ``reward_<p>``: mean normalised reward of each policy's replies; ``win_rate``: share of (prompt,
  draw) pairs where the policy's ``i``-th reply to a prompt scores higher than SFT's ``i``-th, ties
  counting half (a model against itself: 0.5): an estimate of the probability that its reply beats
  an SFT reply to the same held-out prompt. ``win_rate_se``: its standard error, from the spread of
  the per-prompt win shares (prompts are the independent units; several draws per prompt shrink
  it); ``reward_gain`` (± ``_se``): the mean per-prompt difference;
* ``kl``: KL(policy || SFT) estimated on the policy's samples, the mean over replies of
  ``sum_t log p(y_t) - log p_sft(y_t)`` over the reply's tokens (its end-of-turn included), both
  from full forward passes at temperature 1 (unbiased at temperature 1 without truncation, the
  default); ``kl_within_limit``: whether it is within ``kl_limit``;
* ``length_<p>``: mean reply length in tokens; ``ended_<p>``: share of replies that ended with
  ``<|end|>`` within ``max_new_tokens`` (reward hacking often shows as replies that grow and stop ending);
* ``perplexity_<m>`` for every language model (pretrain, sft and the policies): on held-out text,
  ``windows`` evenly spaced windows of ``seq_len + 1`` tokens of the ``tokenize`` stage's valid
  shard; ``reply_perplexity_<m>``: on the held-out SFT conversations' assistant replies;
* ``reward_accuracy``: share of held-out preference pairs the reward model ranks right (chosen
  strictly above rejected), and ``reward_margin``, the mean normalised gap;
* the DPO export's implicit reward on the same held-out pairs (TRL's rewards/accuracies):
  ``r(y) = beta * (log pi_dpo(y|x) - log pi_sft(y|x))`` over the reply's tokens, summed (``sigmoid``,
  ``cdpo``) or averaged per token (``ipo``, whose loss works on the per-token average, as TRL's);
  SimPO has no reference, so its reward is ``beta`` times the mean log-prob per token of the policy
  alone. ``beta`` and the loss come from the export's ``dpo`` config. ``dpo_pref_accuracy``: share of
  pairs with ``r(chosen) > r(rejected)``; ``dpo_pref_margin``: the mean of ``r(chosen) - r(rejected)``;
  ``dpo_reward_chosen``, ``dpo_reward_rejected``: the means. ``sft_pref_accuracy``: the baseline, the
  share of pairs where SFT's own summed log-prob of the chosen reply is the higher;
* the gold judge (``gold: rule``, :mod:`palm.data.rules`: checks from the source documentation that
  the reward model never learned): ``gold_<measure>_<p>`` for every measure (names the asked
  function, documented signature, word F1, ROUGE-L, repetition, the combined score) and policy,
  the gain ``gold_<measure>_gain`` (policy - SFT; ± ``_se`` over the per-prompt differences), and
  ``gold_win_rate`` (± ``_se``) by the combined score, ties half;
* the gold reward model (``gold: [..., reward_model]``: the ``gold_reward`` stage's export, trained
  on preference pairs that neither the proxy nor any policy saw; Gao et al. 2022's gold model):
  every reply scored like the proxy scores them, normalised with the gold model's own mean and std:
  ``gold_rm_<p>``, ``gold_rm_gain`` (± ``_se``), ``gold_rm_win_rate`` (± ``_se``), and
  ``gold_rm_accuracy`` on the held-out pairs (as ``reward_accuracy``);
* ``trained_on_<judge>_<p>``: 1 when the policy's training optimised that gold judge (a ``ppo``
  export's config ``reward`` terms name ``rule``): that judge is then not gold for that policy,
  and the report and the registry say so instead of using it;
* ``verdict``: 1 when there are at least ``min_prompts`` held-out prompts, else 0 (the report then
  gives no headline number); ``eval_set``: an id of the prompts, the judges (and the gold reward
  model's weights) and the sampling, so that only evaluations of the same set are compared (the
  registry's champion rule).

The reward model's numbers are the *proxy*: PPO was trained to raise them, so they measure
optimisation, not quality (Gao et al. 2022). The gold judges and people (``human_judgments``, a
``palm feedback compare`` file of SFT against PPO) are the evidence.

Everything runs in this process (one-process torch.distributed, whole models), in bounded time:
each count above is a field of :class:`EvaluateConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from palm.core.config import check
from palm.core.errors import ConfigError, UserError
from palm.data import rules
from palm.decode.cache import new_cache
from palm.decode.generate import Generation, SamplingConfig, generate
from palm.model.export import Export, load_model, load_tokenizer, read_export, same_tokenizer
from palm.model.parallel import process_groups

GOLD = ("rule", "reward_model")  # the gold judges evaluate knows ("none": no gold judge)

# the policies compared with SFT, in the report's order: ppo required, the others when given
POLICIES = ("ppo", "dpo")
LM_MODELS = ("pretrain", "sft")  # language models besides the policies, whose perplexity is measured
# the measures comparing a policy with SFT (named by versus); every other per-policy measure ends in _<policy>
COMPARISONS = ("win_rate", "reward_gain", "kl", "kl_within_limit", "gold_win_rate", "gold_rm_gain", "gold_rm_win_rate",
               *(f"gold_{m}_gain" for m in rules.MEASURES))
# metrics of a policy the champion rule may compare (palm.ops.registry), by PPO's names (policy_view)
POLICY_METRICS = ("win_rate", "reward_ppo", "reward_gain", "kl", "length_ppo", "ended_ppo", "perplexity_ppo",
                  "reply_perplexity_ppo", "gold_score_ppo", "gold_score_gain", "gold_win_rate", "gold_names_ppo",
                  "gold_f1_ppo", "gold_rouge_l_ppo", "gold_rm_gain", "gold_rm_win_rate", "gold_rm_ppo",
                  "human_win_rate")


def versus(measure: str, policy: str) -> str:
    """The metric name of ``measure`` comparing ``policy`` with SFT: PPO's keeps the bare name."""
    return measure if policy == "ppo" else f"{measure}_{policy}"


def policy_view(metrics: dict[str, Any], policy: str) -> dict[str, Any]:
    """``policy``'s metrics under PPO's names (``win_rate_dpo`` as ``win_rate``, ``reward_dpo`` as
    ``reward_ppo``), with the measures every policy shares (``prompts``, ``verdict``, ``eval_set``,
    ``kl_limit``…): what the registry's champion rule reads for that policy. Another policy's
    measures and people's judgements (of SFT against PPO only) are left out."""
    if policy == "ppo":
        return dict(metrics)
    out = {k: v for k, v in metrics.items()  # the shared ones: no policy's, no comparison's
           if k.removesuffix("_se") not in COMPARISONS and not k.startswith("human_")
           and not any(k.endswith(f"_{p}") or k.endswith(f"_{p}_se") for p in POLICIES)}
    for k, v in metrics.items():
        if k.endswith(f"_{policy}_se") and k.removesuffix(f"_{policy}_se") in COMPARISONS:
            out[k.removesuffix(f"_{policy}_se") + "_se"] = v
        elif k.endswith(f"_{policy}"):
            base = k.removesuffix(f"_{policy}")
            out[base if base in COMPARISONS else f"{base}_ppo"] = v
    return out


def trained_against(export: Export) -> tuple[str, ...]:
    """The gold judges (of :data:`GOLD`) a policy's training optimised, so not gold for it: ``rule``
    when its config's ``reward`` terms (``[{name, weight}]``, the ppo stage's) name ``rule`` or a
    function of :mod:`palm.data.rules` with a weight other than 0. Without ``reward`` a ppo export
    trained on the reward model alone, and a DPO export on preference pairs: no gold judge."""
    terms = export.config.get("reward") if export.kind != "reward" else None
    names = [str(t.get("name")) for t in terms if isinstance(t, dict) and t.get("weight", 1) != 0] \
        if isinstance(terms, list) else []  # a term of weight 0 trained nothing
    return ("rule",) if any(n == "rule" or n.startswith("python:palm.data.rules:") for n in names) else ()


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` section of params.yaml."""

    prompts: int = 64  # held-out prompts every policy answers (the first of the valid split; 0 = all)
    samples_per_prompt: int = 1  # replies each policy samples per prompt (win rate over all the pairs)
    max_new_tokens: int = 64  # longest reply; longer prompts are cut from the left to leave it room
    temperature: float = 1.0  # sampling of every policy (1, no top-k/top-p: the policies themselves)
    top_k: int | None = None  # sample from the k likeliest tokens only; null: all
    top_p: float | None = None  # sample from the smallest set of tokens holding this probability; null: all
    seed: int = 1234  # batch j of every policy samples from a generator seeded seed + j
    batch_size: int = 32  # sequences per forward pass / generation batch
    pairs: int = 200  # held-out preference pairs for the reward accuracy (0 = all)
    windows: int = 8  # windows of held-out text per language model for its perplexity
    replies: int = 32  # held-out conversations for the reply perplexity (0 = all)
    samples: int = 12  # prompts shown in the report with every policy's replies
    # the bound on each policy's KL to the SFT policy (nats per reply, the mean over the prompts):
    # a policy beyond it has drifted from the reference far enough that its reward wins may be
    # reward hacking; the metrics say whether it holds (kl_within_limit, kl_within_limit_dpo)
    kl_limit: float = 2.0
    threads: int = 0  # torch threads; 0 = OMP_NUM_THREADS if set, else all cores
    # the champion rule of the model registry (palm/ops/registry.py): a new palm-chat (or palm-dpo)
    # version becomes @champion when its champion_metric (by PPO's name; palm-dpo's own value, see
    # policy_view) beats its current champion's (strictly: higher for "max", lower for "min");
    # otherwise it is @candidate. The first version is champion.
    champion_metric: str = "win_rate"
    champion_direction: Literal["max", "min"] = "max"  # max: higher champion_metric wins; min: lower
    # the judges independent of the reward model PPO trained against, the first the headline's:
    # rule (palm/data/rules.py, the default data's checks from the documentation), reward_model (the
    # gold_reward stage's export, --gold-reward); a list, or one name; none (or []): no gold judge
    gold: str | tuple[str, ...] = "rule"
    # below this many held-out prompts the report gives no verdict (verdict 0) and the registry
    # does not make the policy champion: one prompt's "100 %" is not evidence
    min_prompts: int = 30
    # a judgments file of `palm feedback compare SFT PPO` (people's blind A/B): human_win_rate in
    # the metrics and the report's headline; null: none
    human_judgments: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "windows", "samples_per_prompt"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("prompts", "pairs", "replies", "samples", "threads"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.kl_limit > 0, "kl_limit", f"must be > 0 (nats per reply), got {self.kl_limit}")
        judges = (self.gold,) if isinstance(self.gold, str) else tuple(self.gold)
        check(all(j in GOLD for j in judges) or judges == ("none",), "gold",
              f"must be a list of {', '.join(GOLD)} (or none), got {list(judges)}")
        check(len(set(judges)) == len(judges), "gold", f"names a judge twice: {list(judges)}")
        check(self.min_prompts >= 1, "min_prompts", f"must be >= 1, got {self.min_prompts}")
        check(self.champion_metric in POLICY_METRICS, "champion_metric",
              f"must be one of {', '.join(POLICY_METRICS)}, got {self.champion_metric!r}")
        self.sampling  # temperature, top_k and top_p checked by SamplingConfig

    @property
    def judges(self) -> tuple[str, ...]:
        """The gold judges in order (the first the headline's); () for none."""
        judges = (self.gold,) if isinstance(self.gold, str) else tuple(self.gold)
        return () if judges == ("none",) else judges

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate` returns: the metrics, and what the report shows besides them."""

    metrics: dict[str, float | int]
    rewards: dict[str, list[float]]  # normalised reward of every reply (draw j of prompt i at i * samples_per_prompt + j), per policy
    samples: list[dict[str, Any]]  # prompt, reference, each policy's reply (by name), reward_<p> and gold_<p>
    gold: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # the gold score of every reply, per policy
    judges: tuple[str, ...] = ()  # the gold judges in the order of evaluate.gold
    policies: tuple[str, ...] = ("ppo",)  # the policies compared with SFT, of POLICIES


# --- the champion of this evaluation -------------------------------------------------------------

def sft_value(metrics: dict[str, Any], metric: str) -> float | None:
    """SFT's own value of a champion metric named by PPO's names: a comparison with SFT is at its
    neutral point for SFT itself (win rates 0.5; gains and KL 0); a policy's own measure
    (``reward_ppo``) is SFT's of the same name (``reward_sft``); None when SFT has none."""
    if metric in COMPARISONS or metric == "human_win_rate":
        return None if metric == "kl_within_limit" else 0.5 if metric.endswith("win_rate") else 0.0
    value = metrics.get(metric.removesuffix("_ppo") + "_sft") if metric.endswith("_ppo") else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def champion_policy(metrics: dict[str, Any], policies: Sequence[str], metric: str, direction: str) -> tuple[str, str]:
    """The policy this evaluation ships (its HF export is the stage's ``champion-hf``) and why, in
    one line: a policy that passes the champion rule on its own numbers
    (:func:`palm.ops.registry.own_reason`: KL within the limit, a verdict, a judge it did not
    train against) and beats SFT strictly in ``direction`` (and every other such policy); else SFT.
    Unlike the registry's @champion, which compares a policy with earlier versions, this one is
    decided by this evaluation alone, so the stage's output is the same on every machine."""
    from palm.ops.registry import beats, own_reason

    sft = sft_value(metrics, metric)
    best, value = "sft", sft
    lines = []
    for name in policies:
        view = policy_view(metrics, name)
        reason = own_reason(view, metric)
        if reason:
            lines.append(f"{name}: {reason}")
            continue
        theirs = float(view[metric])
        lines.append(f"{name} {theirs:.4g}")
        if value is None or beats(theirs, value, direction):
            best, value = name, theirs
    return best, f"{metric} ({direction}): sft {'n/a' if sft is None else f'{sft:.4g}'}, {'; '.join(lines)}"


# --- data ----------------------------------------------------------------------------------------

def held_out_prompts(rows: list[dict], limit: int) -> list[dict]:
    """Prompts of SFT conversations (``input_ids``, ``loss_mask``): each sequence up to the start
    of its last reply (ending with ``<|assistant|>``), and that reply; duplicates dropped."""
    out, seen = [], set()
    for row in rows:
        ids, mask = list(row["input_ids"]), list(row["loss_mask"])
        starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
        if not starts or tuple(ids[:starts[-1]]) in seen:
            continue
        seen.add(tuple(ids[:starts[-1]]))
        out.append({"prompt_ids": ids[:starts[-1]], "reply_ids": ids[starts[-1]:]})
        if limit and len(out) >= limit:
            break
    return out


def text_windows(tokens_dir: Path, meta: dict, seq_len: int, count: int) -> torch.Tensor:
    """``[k, <= seq_len + 1]`` windows of the valid shard (its documents back to back, EOD
    between), evenly spaced over it, ``k <= count``."""
    data = np.memmap(Path(tokens_dir) / "valid.bin", dtype=np.dtype(meta.get("dtype", "uint16")), mode="r")
    width = min(seq_len + 1, len(data))
    starts = sorted({int(s) for s in np.linspace(0, len(data) - width, count)})
    return torch.from_numpy(np.stack([np.asarray(data[s:s + width], dtype=np.int64) for s in starts]))


def pad_right(rows: Sequence[Sequence[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, longest]`` int64 and the length of each row ``[b]``."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.full((len(rows), int(lengths.max())), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out, lengths


# --- measurements --------------------------------------------------------------------------------

@torch.no_grad()
def masked_nll(model: Any, rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int]] | None,
               batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL and the number of tokens counted: token ``t+1`` of a row counts
    where its mask is 1 (no mask: every token after the first)."""
    total, count = 0.0, 0
    device = model.embedding.weight.device
    for i in range(0, len(rows), batch_size):
        tokens, lengths = pad_right(rows[i:i + batch_size])
        if masks is None:
            weight = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).float()
        else:
            weight, _ = pad_right(masks[i:i + batch_size])
            weight = weight.float()
        weight = weight[:, 1:]
        nll, _ = model(tokens[:, :-1].to(device), labels=tokens[:, 1:].to(device))  # [b, s-1] fp32
        total += float((nll.cpu() * weight).sum())
        count += int(weight.sum())
    return total, count


@torch.no_grad()
def response_logprobs(model: Any, gen: Generation) -> torch.Tensor:
    """``[b, n]`` log-probabilities (temperature 1, the full vocabulary) of ``gen``'s response
    tokens under ``model``, from one forward pass over the left-padded batch; 0 where masked."""
    b, total = gen.tokens.shape
    cache = new_cache(model, b, total, gen.pad)  # per-row positions and the padding mask
    h = model.trunk(gen.tokens[:, :-1], cache)[:, gen.prompt_len - 1:]  # the states predicting responses
    logits = model.logits(h).float()[..., :model.cfg.vocab_size]  # [b, n, V] (one process: whole vocab)
    logp = logits.log_softmax(-1).gather(-1, gen.response[..., None]).squeeze(-1)
    return logp.masked_fill(~gen.response_mask, 0.0)


@torch.no_grad()
def scores(reward_model: Any, seqs: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """Raw reward of each sequence ``[len(seqs)]`` fp64: the scalar at its last token (right
    padding, as the reward model was trained). Scored ``batch_size`` at a time in order of length
    (each batch pads only to its longest row), so equal inputs get bit-equal scores."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    out = torch.empty(len(seqs), dtype=torch.float64)
    device = reward_model.embedding.weight.device
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        tokens, lengths = pad_right([seqs[j] for j in rows])
        values = reward_model(tokens.to(device)).cpu()  # [b, s]
        out[rows] = values.gather(1, (lengths - 1)[:, None]).squeeze(1).double()
    return out


def win_rate(ours: torch.Tensor, theirs: torch.Tensor, per_prompt: int = 1) -> tuple[float, float]:
    """Share of pairs where ``ours`` scores higher, ties counting half, and its standard error
    (nan for one prompt): ``ours``, ``theirs`` ``[prompts * per_prompt]``, each prompt's draws
    next to each other; the error from the per-prompt shares, as draws of a prompt are correlated."""
    wins = ((ours > theirs).double() + 0.5 * (ours == theirs).double()).view(-1, per_prompt).mean(1)
    se = float(wins.std() / math.sqrt(len(wins))) if len(wins) > 1 else math.nan
    return float(wins.mean()), se


def paired(ours: torch.Tensor, sft: torch.Tensor, per_prompt: int) -> dict[str, float]:
    """One policy against SFT by one judge: ``ours``, ``sft`` ``[prompts * per_prompt]`` scores of
    the replies (draw ``j`` of prompt ``i`` at ``i * per_prompt + j``; nan where the judge does not
    apply to the prompt). Over the prompts where it applies: the means ``ours`` and ``sft`` (a
    prompt's draws averaged first), ``gain`` (ours - SFT) and ``win_rate`` (ties half), each with
    ``gain_se`` / ``win_rate_se`` from the per-prompt values (prompts are the independent units;
    absent below two prompts); {} where it applies to none."""
    a, b = ours.double().view(-1, per_prompt), sft.double().view(-1, per_prompt)
    applies = ~(a.isnan().any(1) | b.isnan().any(1))
    if not applies.any():
        return {}
    a, b = a[applies], b[applies]
    gain = a.mean(1) - b.mean(1)
    out = {"ours": float(a.mean(1).mean()), "sft": float(b.mean(1).mean()), "gain": float(gain.mean())}
    if len(gain) > 1:
        out["gain_se"] = float(gain.std() / math.sqrt(len(gain)))
    out["win_rate"], se = win_rate(a.flatten(), b.flatten(), per_prompt)
    if math.isfinite(se):
        out["win_rate_se"] = se
    return out


def named(found: dict[str, float], policy: str, *, value: str | None, gain: str, win: str | None) -> dict[str, float]:
    """A :func:`paired` result of ``policy`` as metrics (module docstring, "Names"): the means as
    ``<value>_sft`` and ``<value>_<policy>``, the gain and win rate as :func:`versus` names them."""
    out = {f"{value}_sft": found["sft"], f"{value}_{policy}": found["ours"]} if value and found else {}
    for key, measure in (("gain", gain), ("win_rate", win)):
        for se in ("", "_se"):
            if measure and key + se in found:
                out[versus(measure, policy) + se] = found[key + se]
    return out


def gold_rule(prompts: Sequence[str], answers: Sequence[str], got: dict[str, list[str]],
              per_prompt: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The rule judge on every policy's replies (``got["sft"]`` and each policy's: reply ``i *
    per_prompt + j`` is draw ``j`` of prompt ``i``): the metrics of the module docstring, and every
    reply's combined score per policy. A check that does not apply to a prompt (its question names
    no function) leaves that prompt out of that measure."""
    judged = {name: [rules.judge(prompts[i // per_prompt], answers[i // per_prompt], r) for i, r in enumerate(rs)]
              for name, rs in got.items()}
    values = {name: {m: torch.tensor([math.nan if j[m] is None else j[m] for j in js], dtype=torch.float64)
                     for m in rules.MEASURES} for name, js in judged.items()}
    out: dict[str, float] = {}
    for policy in (p for p in got if p != "sft"):
        for m in rules.MEASURES:
            out.update(named(paired(values[policy][m], values["sft"][m], per_prompt), policy, value=f"gold_{m}",
                             gain=f"gold_{m}_gain", win="gold_win_rate" if m == "score" else None))
    return out, {name: [j["score"] for j in js] for name, js in judged.items()}


def gold_rm(rewards: dict[str, torch.Tensor], per_prompt: int) -> dict[str, float]:
    """The gold reward model's measures of every policy from the normalised score of every reply
    (``rewards["sft"]`` and each policy's: reply ``i * per_prompt + j`` is draw ``j`` of prompt
    ``i``): the means, the gain and the win rate against SFT (:func:`paired`)."""
    out: dict[str, float] = {}
    for policy in (p for p in rewards if p != "sft"):
        out.update(named(paired(rewards[policy], rewards["sft"], per_prompt), policy, value="gold_rm",
                         gain="gold_rm_gain", win="gold_rm_win_rate"))
    return out


@torch.no_grad()
def reply_logprobs(model: Any, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability (temperature 1, the full vocabulary) of each reply given its prompt ``[n]`` fp64, and
    its token count ``[n]``: teacher-forced, right padding (causal: padding changes no earlier token)."""
    sums, counts = torch.empty(len(prompts), dtype=torch.float64), torch.empty(len(prompts), dtype=torch.long)
    device = model.embedding.weight.device
    for i in range(0, len(prompts), batch_size):
        rows = [list(p) + list(r) for p, r in zip(prompts[i:i + batch_size], replies[i:i + batch_size])]
        tokens, lengths = pad_right(rows)
        starts = torch.tensor([len(p) for p in prompts[i:i + batch_size]])
        t = torch.arange(1, tokens.shape[1])[None]  # the position of each predicted token
        mask = (t >= starts[:, None]) & (t < lengths[:, None])  # [b, s-1] reply tokens
        # over the real vocabulary (the padded columns are no tokens), as the dpo stage computes it
        nll, _ = model(tokens[:, :-1].to(device), labels=tokens[:, 1:].to(device), vocab=model.cfg.vocab_size)
        sums[i:i + len(rows)] = -(nll.cpu().double() * mask).sum(1)
        counts[i:i + len(rows)] = mask.sum(1)
    return sums, counts


def implicit_rewards(logp: torch.Tensor, ref: torch.Tensor | None, tokens: torch.Tensor, loss: str,
                     beta: float) -> torch.Tensor:
    """DPO's implicit reward of each reply (module docstring): ``beta`` times the log-ratio to the
    reference, summed over the reply (sigmoid, cdpo) or per token (ipo); simpo: ``beta`` times the
    policy's own mean log-prob per token (reference-free)."""
    if loss == "simpo":
        return beta * logp / tokens.clamp(min=1)
    ratio = logp - ref
    return beta * (ratio / tokens.clamp(min=1) if loss == "ipo" else ratio)


def eval_set_id(prompts: list[dict], cfg: EvaluateConfig, gold_reward: str | None = None) -> str:
    """An id of what the numbers were measured on: the prompts and references, the judges (and
    ``gold_reward``, the gold reward model's weights sha256) and the sampling. Two evaluations
    compare only when their ids are equal."""
    import hashlib
    import json

    judges = cfg.judges
    what = {"prompts": [[p["prompt_ids"], p["reply_ids"]] for p in prompts],
            # one judge: the id evaluations of the single-judge days had
            "gold": judges[0] if len(judges) == 1 else list(judges) if judges else "none",
            **({"gold_reward": gold_reward} if gold_reward else {}),
            **{k: getattr(cfg, k) for k in ("samples_per_prompt", "max_new_tokens", "temperature", "top_k", "top_p",
                                            "seed")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def sample(model: Any, prompts: list[list[int]], cfg: EvaluateConfig, *, stop_ids: Sequence[int],
           pad_id: int) -> list[Generation]:
    """One reply per prompt, ``batch_size`` prompts per :func:`generate` call; batch ``j``
    draws from a generator seeded ``cfg.seed + j``."""
    device = model.embedding.weight.device
    s = cfg.sampling
    out = []
    for j, i in enumerate(range(0, len(prompts), cfg.batch_size)):
        gen = torch.Generator(device).manual_seed(cfg.seed + j)
        out.append(generate(model, prompts[i:i + cfg.batch_size], cfg.max_new_tokens, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p, stop_ids=stop_ids, pad_id=pad_id, generator=gen))
    return out


def replies(gens: list[Generation]) -> list[list[int]]:
    """Each row's response tokens (its end-of-turn included, padding not)."""
    return [row[m].tolist() for g in gens for row, m in zip(g.response, g.response_mask)]


# --- the stage's computation ---------------------------------------------------------------------

def read_models(paths: dict[str, Path]) -> dict[str, Export]:
    """The exports (pretrain, sft, reward, the policies, and ``gold_reward`` where ``paths`` names
    it), checked: kinds, one tokenizer, reward models whose context holds the policies' sequences,
    a gold reward model that is not the proxy, a DPO export that says its loss and beta."""
    kinds = {"pretrain": ("pretrain",), "sft": ("sft",), "reward": ("reward",), "gold_reward": ("reward",),
             **{p: (p,) for p in POLICIES}}
    missing = [n for n in ("pretrain", "sft", "ppo", "reward") if paths.get(n) is None]
    if missing:
        raise UserError(f"no {', '.join(missing)} export given: evaluate compares every policy with SFT and needs "
                        "the pretrain, sft, ppo and reward exports")
    names = [n for n in ("sft", *POLICIES, "reward", "gold_reward", "pretrain") if paths.get(n) is not None]
    exports = {name: read_export(paths[name], kinds[name]) for name in names}
    same_tokenizer(exports.values())
    longest = max(exports[n].model.seq_len for n in ("sft", *POLICIES) if n in exports)
    for name in ("reward", "gold_reward"):
        if name in exports and exports[name].model.seq_len < longest:
            raise UserError(f"{exports[name].path}: the reward model's context ({exports[name].model.seq_len} tokens) "
                            f"is shorter than the policies' ({longest}); train them from one parent")
    if "gold_reward" in exports and _weights(exports["gold_reward"]) == _weights(exports["reward"]):
        raise UserError(f"{exports['gold_reward'].path}: the gold reward model is the proxy itself "
                        f"({exports['reward'].path}); give the gold_reward stage's export")
    if "dpo" in exports:
        dpo_objective(exports["dpo"])
    return exports


def dpo_objective(export: Export) -> tuple[str, float]:
    """The loss and beta of a DPO export (its config's ``dpo``), checked."""
    found = export.config.get("dpo")
    loss, beta = (found.get("loss"), found.get("beta")) if isinstance(found, dict) else (None, None)
    if loss not in ("sigmoid", "cdpo", "ipo", "simpo") or isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise UserError(f"{export.path}/config.json: no dpo.loss (sigmoid, cdpo, ipo or simpo) and numeric dpo.beta, "
                        f"got {found!r}; give the dpo stage's export")
    return loss, float(beta)


def _weights(export: Export) -> str:
    from palm.core.io import files_sha256

    return files_sha256(export.path, ["model.safetensors"])


def evaluate(cfg: EvaluateConfig, *, models: dict[str, Path], sft_data: Path, prefs: Path,
             tokens: Path) -> Evaluation:
    """Measure everything in the module docstring. ``models``: export folders by name
    (``pretrain``, ``sft``, ``ppo``, ``reward``; ``dpo`` (or any of :data:`POLICIES`) to compare
    it too; ``gold_reward`` when ``cfg.gold`` names ``reward_model``)."""
    from palm.core.process import default_threads
    from palm.core.tokenizer import special_ids
    from palm.data.chat import load_prefs, load_sft
    from palm.train.data import check_shards

    use_gold_rm = "reward_model" in cfg.judges
    if use_gold_rm and models.get("gold_reward") is None:
        raise ConfigError("evaluate.gold", "names reward_model but no gold reward model was given (--gold-reward "
                                           "models/gold_reward, the gold_reward stage's export)")
    exports = read_models({k: v for k, v in models.items() if k != "gold_reward" or use_gold_rm})
    policies = tuple(p for p in POLICIES if p in exports)  # ppo: read_models refuses it missing
    sha = exports["sft"].tokenizer_sha256
    seq_len = min(exports[n].model.seq_len for n in ("sft", *policies))
    if cfg.max_new_tokens >= seq_len:
        raise ConfigError("evaluate.max_new_tokens", f"{cfg.max_new_tokens} leaves no room for a prompt in the "
                                                     f"policies' context of {seq_len} tokens (model.seq_len)")
    valid = load_sft(sft_data, "valid", sha).select(["input_ids", "loss_mask"]).to_pylist()
    prompts = held_out_prompts(valid, cfg.prompts)
    if not prompts:
        raise UserError(f"{sft_data}: no held-out conversations in its valid split to take prompts from; "
                        "more data or a larger sft_data.valid_fraction (dvc repro sft_data)")
    pairs = load_prefs(prefs, "valid", sha).select(["prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()
    pairs = pairs[:cfg.pairs] if cfg.pairs else pairs
    if not pairs:
        raise UserError(f"{prefs}: no held-out preference pairs in its valid split; more data or a larger "
                        "prefs.valid_fraction (dvc repro prefs)")
    shard_meta = check_shards(tokens, sha)
    tokenizer = load_tokenizer(exports["sft"])
    ids = special_ids(tokenizer)
    stop_ids, pad_id = (ids["end_turn_id"], ids["eod_id"]), ids["pad_id"]
    room = seq_len - cfg.max_new_tokens
    k = cfg.samples_per_prompt
    prompt_ids = [p["prompt_ids"][-room:] for p in prompts for _ in range(k)]  # cut from the left, as the
    # data stages cut; each prompt k times in a row, so reply i*k + j is draw j of prompt i
    conversations = valid[:cfg.replies] if cfg.replies else valid
    stats = exports["reward"].config["reward"]
    mean, std = float(stats["mean"]), float(stats["std"])
    pair_prompts = [p["prompt_ids"] for p in pairs]
    sides = {side: [p[f"{side}_ids"] for p in pairs] for side in ("chosen", "rejected")}

    torch.set_num_threads(cfg.threads or default_threads())
    metrics: dict[str, float | int] = {"prompts": len(prompts), "samples_per_prompt": k, "pairs": len(pairs),
                                       "truncated_prompts": sum(len(p["prompt_ids"]) > room for p in prompts)}
    with process_groups():
        reward_model = load_model(exports["reward"])
        gens, logp, rewards, seqs, pair_logp = {}, {}, {}, {}, {}
        for name in ("sft", *policies):
            policy = load_model(exports[name])
            gens[name] = sample(policy, prompt_ids, cfg, stop_ids=stop_ids, pad_id=pad_id)
            if name != "sft":
                logp[name] = [response_logprobs(policy, g) for g in gens[name]]
            if name == "dpo" or (name == "sft" and "dpo" in policies):  # the implicit reward's terms
                pair_logp[name] = {s: reply_logprobs(policy, pair_prompts, r, cfg.batch_size) for s, r in sides.items()}
            seqs[name] = [p + r for p, r in zip(prompt_ids, replies(gens[name]))]
            rewards[name] = (scores(reward_model, seqs[name], cfg.batch_size) - mean) / std
            lengths = torch.cat([g.response_mask.sum(1) for g in gens[name]]).double()
            metrics[f"reward_{name}"] = float(rewards[name].mean())
            metrics[f"length_{name}"] = float(lengths.mean())
            metrics[f"ended_{name}"] = float(torch.cat([g.stopped for g in gens[name]]).double().mean())
            del policy
        sft = load_model(exports["sft"])
        metrics["kl_limit"] = cfg.kl_limit
        for name in policies:
            kl = float(torch.cat([(lp - response_logprobs(sft, g)).sum(1) for lp, g in zip(logp[name], gens[name])])
                       .double().mean())
            metrics[versus("kl", name)] = kl
            metrics[versus("kl_within_limit", name)] = int(kl <= cfg.kl_limit)
            metrics.update(named(paired(rewards[name], rewards["sft"], k), name, value=None, gain="reward_gain",
                                 win="win_rate"))
        del sft
        if "dpo" in policies:
            metrics.update(dpo_preferences(pair_logp, *dpo_objective(exports["dpo"])))

        chosen = scores(reward_model, [p["prompt_ids"] + p["chosen_ids"] for p in pairs], cfg.batch_size)
        rejected = scores(reward_model, [p["prompt_ids"] + p["rejected_ids"] for p in pairs], cfg.batch_size)
        metrics["reward_accuracy"] = float((chosen > rejected).double().mean())
        metrics["reward_margin"] = float(((chosen - rejected) / std).mean())
        del reward_model

        if use_gold_rm:  # the gold reward model: the same replies and pairs, its own scale
            gold_model, gold_stats = load_model(exports["gold_reward"]), exports["gold_reward"].config["reward"]
            g_mean, g_std = float(gold_stats["mean"]), float(gold_stats["std"])
            metrics.update(gold_rm({name: (scores(gold_model, seqs[name], cfg.batch_size) - g_mean) / g_std
                                    for name in seqs}, k))
            chosen = scores(gold_model, [p["prompt_ids"] + p["chosen_ids"] for p in pairs], cfg.batch_size)
            rejected = scores(gold_model, [p["prompt_ids"] + p["rejected_ids"] for p in pairs], cfg.batch_size)
            metrics["gold_rm_accuracy"] = float((chosen > rejected).double().mean())
            del gold_model

        for name in (*LM_MODELS, *policies):
            model = load_model(exports[name])
            windows = text_windows(tokens, shard_meta, model.cfg.seq_len, cfg.windows)
            total, count = masked_nll(model, windows.tolist(), None, cfg.batch_size)
            metrics[f"perplexity_{name}"] = math.exp(min(total / count, 50.0))
            total, count = masked_nll(model, [c["input_ids"] for c in conversations],
                                      [c["loss_mask"] for c in conversations], cfg.batch_size)
            metrics[f"reply_perplexity_{name}"] = math.exp(min(total / max(count, 1), 50.0))
            metrics["text_tokens"], metrics["reply_tokens"] = int(windows.shape[0] * (windows.shape[1] - 1)), count
            del model

    decode = lambda t, special=False: tokenizer.decode(t, skip_special_tokens=not special)  # noqa: E731
    got = {name: [decode(r) for r in replies(gens[name])] for name in gens}
    prompt_text = [decode(p["prompt_ids"], special=True) for p in prompts]
    answers = [decode(p["reply_ids"]) for p in prompts]
    gold: dict[str, list[float]] = {}
    if "rule" in cfg.judges:
        found, gold = gold_rule(prompt_text, answers, got, k)
        metrics.update(found)
    for name in policies:  # a judge the policy trained against is not gold for it: the report and registry read this
        against = trained_against(exports[name])
        metrics.update({f"trained_on_{judge}_{name}": int(judge in against) for judge in cfg.judges})
    metrics["min_prompts"] = cfg.min_prompts
    metrics["verdict"] = int(len(prompts) >= cfg.min_prompts)
    metrics["eval_set"] = eval_set_id(prompts, cfg, _weights(exports["gold_reward"]) if use_gold_rm else None)
    samples = [{"prompt": prompt_text[i], "reference": answers[i],
                **{name: got[name][i * k] for name in gens},
                **{f"reward_{name}": float(rewards[name][i * k]) for name in gens},
                **({f"gold_{name}": gold[name][i * k] for name in gens} if gold else {})}
               for i in range(min(cfg.samples, len(prompts)))]
    return Evaluation(metrics=metrics, rewards={k: v.tolist() for k, v in rewards.items()}, samples=samples,
                      gold=gold, judges=cfg.judges, policies=policies)


def dpo_preferences(logp: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], loss: str,
                    beta: float) -> dict[str, float]:
    """DPO's held-out preference measures (module docstring) from the summed log-probs and token
    counts of each pair's chosen and rejected replies, ``logp[policy][side]`` (policy ``dpo``,
    and ``sft``, its reference)."""
    (dc, nc), (dr, nr) = logp["dpo"]["chosen"], logp["dpo"]["rejected"]
    (sc, _), (sr, _) = logp["sft"]["chosen"], logp["sft"]["rejected"]
    chosen, rejected = implicit_rewards(dc, sc, nc, loss, beta), implicit_rewards(dr, sr, nr, loss, beta)
    return {"dpo_pref_accuracy": float((chosen > rejected).double().mean()),
            "dpo_pref_margin": float((chosen - rejected).mean()), "dpo_reward_chosen": float(chosen.mean()),
            "dpo_reward_rejected": float(rejected.mean()), "dpo_beta": beta,
            "sft_pref_accuracy": float((sc > sr).double().mean())}
