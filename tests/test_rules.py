"""The gold rule judge (palm/data/rules.py) against slow obvious implementations and hand values."""

from __future__ import annotations

import itertools
import random

import pytest

from palm.data import rules

PROMPT = "<|user|>What is `email.utils.parseaddr` for?<|assistant|>"
ANSWER = "`email.utils.parseaddr(addr, *, strict=True)`: Parse addr into its constituent realname and email address parts."


def naive_lcs(a, b):
    """The full dynamic-programming table."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, j in itertools.product(range(len(a)), range(len(b))):
        t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_equals_the_full_table():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert rules.lcs_length(a, b) == naive_lcs(a, b)


def test_hand_values():
    assert rules.asked_name(PROMPT) == "email.utils.parseaddr"
    assert rules.asked_name("<|user|>What is `x` for?") is None  # not a dotted name
    assert rules.documented_signature(ANSWER) == "email.utils.parseaddr(addr, *, strict=True)"
    assert rules.documented_signature("Plain text.") is None
    # F1: reply "parse addr now" vs answer words: common {parse, addr} -> p 2/3, r 2/17
    n = len(rules.words(ANSWER))
    p, r = 2 / 3, 2 / n
    assert rules.word_f1("Parse addr now", ANSWER) == pytest.approx(2 * p * r / (p + r))
    assert rules.word_f1("nothing shared", ANSWER) == 0.0
    # ROUGE-L: "a b c d" vs "a c x d": LCS 3
    assert rules.rouge_l("a b c d", "a c x d") == pytest.approx(0.75)
    assert rules.repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert rules.repetition("one two three four") == 0.0
    assert rules.repetition("short") == 0.0


def test_judge_rewards_the_answer_and_not_its_failures():
    best = rules.judge(PROMPT, ANSWER, ANSWER)
    assert best["names"] == best["signature"] == 1.0 and best["score"] == pytest.approx(1.0)
    other = rules.judge(PROMPT, ANSWER, "`json.dumps(obj)`: Serialize obj to a JSON formatted str.")
    assert other["names"] == other["signature"] == 0.0 and other["score"] < 0.3
    named = rules.judge(PROMPT, ANSWER, "email.utils.parseaddr splits an address")
    assert named["names"] == 1.0 and named["signature"] == 0.0 and named["score"] > other["score"]
    loop = rules.judge(PROMPT, ANSWER, "`email.utils.parseaddr(addr, *, strict=True)`: Parse addr Parse addr "
                                       "Parse addr Parse addr Parse addr Parse addr")
    assert loop["repetition"] >= 0.5 and loop["score"] < best["score"] / 2
    # a question that names no function: only the text overlap applies
    free = rules.judge("<|user|>Say hi<|assistant|>", "Hello there.", "Hello there.")
    assert free["names"] is None and free["signature"] is None and free["score"] == pytest.approx(1.0)
