"""The reward's terms (``ppo.reward``): a sequence's score is the weighted sum of its terms'.

* ``model``: the reward model's score at the response's last token, normalised with the reward
  stage's mean and std (:func:`~palm.train.rlhf.steps.reward_model_scorer`);
* ``rule``: the default data's verifiable check, graded (:func:`palm.data.rules.graded`: the
  reply's opening code span against the asked name and the documented signature), in [0, 1]; a
  prompt that names no function scores 0. Beside its mean, the curve gets the binary pass rates
  ``rule_names`` and ``rule_signature`` (:func:`palm.data.rules.judge`);
* ``python:<module>:<function>``: a user's ``function(prompt: str, reply: str) -> float``,
  imported by name (the project root is on the path). ``prompt`` is the conversation up to the
  reply with its chat markers (``<|user|>…<|end|><|assistant|>``), ``reply`` the response's text
  without them. An import error, an exception or a result that is not a finite number stops the
  run with one line naming the function (RL with verifiable rewards, as TRL's reward functions
  and OpenRLHF's ``reward_func``). It must be deterministic: every tensor-parallel rank of a
  replica scores the same rows and must get the same numbers.

The rule and python terms see text: the token ids are decoded once per call. Each call keeps the
per-row values of each term in :attr:`Reward.last`, for the curve's ``reward_<term>`` columns.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Callable, Mapping, Sequence

import torch

from palm.core.errors import UserError, first_line
from palm.data import rules
from palm.train.rlhf.config import RewardTerm
from palm.train.rlhf.steps import Scorer


@dataclasses.dataclass
class Replies:
    """One scoring call's rows: token ids, and their text decoded on first use."""

    prompt_ids: Sequence[Sequence[int]]
    response_ids: Sequence[Sequence[int]]
    decode_prompt: Callable[[Sequence[int]], str]
    decode_reply: Callable[[Sequence[int]], str]

    @functools.cached_property
    def prompts(self) -> list[str]:
        return [self.decode_prompt(p) for p in self.prompt_ids]

    @functools.cached_property
    def replies(self) -> list[str]:
        return [self.decode_reply(r) for r in self.response_ids]


# a term: the rows -> their values [b] and any extra per-row columns (the rule's pass rates)
Term = Callable[[Replies], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def model_term(scorer: Scorer) -> Term:
    """The reward model (an id-level :data:`Scorer`, normalised) as a term."""
    return lambda rows: (scorer(rows.prompt_ids, rows.response_ids).float().cpu(), {})


def rule_term(answers: Mapping[tuple[int, ...], str]) -> Term:
    """The graded rule check against each prompt's documented answer (``answers``: prompt ids ->
    the data's answer text)."""

    def score(rows: Replies) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        graded, names, signature = [], [], []
        for ids, prompt, reply in zip(rows.prompt_ids, rows.prompts, rows.replies):
            answer = answers.get(tuple(ids), "")
            graded.append(rules.graded(prompt, answer, reply) or 0.0)
            judged = rules.judge(prompt, answer, reply)
            names.append(judged["names"] or 0.0)
            signature.append(judged["signature"] or 0.0)
        return torch.tensor(graded), {"rule_names": torch.tensor(names), "rule_signature": torch.tensor(signature)}

    return score


def load_function(name: str) -> Callable[[str, str], object]:
    """The function of a ``python:<module>:<function>`` term, imported (one-line errors)."""
    _, module, function = name.split(":")
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - the user's module: any error is theirs to fix
        raise UserError(f"ppo.reward: {name}: cannot import {module!r} ({type(err).__name__}: "
                        f"{first_line(err, 200)}); put the module in the project root or on PYTHONPATH") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise UserError(f"ppo.reward: {name}: module {module!r} ({getattr(mod, '__file__', '?')}) has no function "
                        f"{function!r}; define {function}(prompt: str, reply: str) -> float there")
    return fn


def _shown(prompt: str, limit: int = 80) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "…")


def python_term(name: str) -> Term:
    """A user's ``(prompt, reply) -> float`` function as a term; its exceptions and non-finite
    results are one-line errors naming it (and the prompt)."""
    fn = load_function(name)

    def score(rows: Replies) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = []
        for prompt, reply in zip(rows.prompts, rows.replies):
            try:
                value = fn(prompt, reply)
            except Exception as err:  # noqa: BLE001 - the user's function: report it, as one line
                raise UserError(f"ppo.reward: {name} raised {type(err).__name__}: {first_line(err, 200)} "
                                f"(prompt {_shown(prompt)}); fix the function") from None
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise UserError(f"ppo.reward: {name} returned {type(value).__name__} {_shown(str(value), 40)} for "
                                f"the prompt {_shown(prompt)}; it must return a float") from None
            if not math.isfinite(x):
                raise UserError(f"ppo.reward: {name} returned {x} for the prompt {_shown(prompt)}; it must "
                                "return a finite number")
            values.append(x)
        return torch.tensor(values, dtype=torch.float64).float(), {}

    return score


class Reward:
    """The :data:`Scorer` of ``ppo.reward``: the weighted sum of its terms. After each call,
    :attr:`last` holds each column's per-row values (``reward_<term>`` and the rule's pass rates)."""

    def __init__(self, terms: Sequence[tuple[RewardTerm, Term]], *, decode_prompt: Callable[[Sequence[int]], str],
                 decode_reply: Callable[[Sequence[int]], str]):
        self.terms, self.decode_prompt, self.decode_reply = list(terms), decode_prompt, decode_reply
        self.last: dict[str, torch.Tensor] = {}

    @property
    def columns(self) -> tuple[str, ...]:
        extra = ("rule_names", "rule_signature") if any(t.name == "rule" for t, _ in self.terms) else ()
        return (*(t.column for t, _ in self.terms), *extra)

    def __call__(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = Replies(prompts, responses, self.decode_prompt, self.decode_reply)
        total = torch.zeros(len(prompts))
        last: dict[str, torch.Tensor] = {}
        for term, fn in self.terms:
            values, extra = fn(rows)
            total += term.weight * values
            last[term.column] = values
            last.update(extra)
        self.last = last
        return total


def build(terms: Sequence[RewardTerm], *, answers: Mapping[tuple[int, ...], str],
          decode_prompt: Callable[[Sequence[int]], str], decode_reply: Callable[[Sequence[int]], str],
          model: Scorer | None = None) -> Reward:
    """The :class:`Reward` of ``terms``; ``model`` is the reward model's scorer (needed only by a
    ``model`` term), ``answers`` each prompt's documented answer (the ``rule`` term's)."""
    built = []
    for term in terms:
        if term.name == "model":
            if model is None:
                raise ValueError("a model term needs the reward model's scorer")
            built.append((term, model_term(model)))
        elif term.name == "rule":
            built.append((term, rule_term(answers)))
        else:
            built.append((term, python_term(term.name)))
    return Reward(built, decode_prompt=decode_prompt, decode_reply=decode_reply)
