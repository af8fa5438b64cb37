"""Verifiable checks of a reply against its documented answer: the gold rule judge.

The embedded default's questions ask about one function (``What does `json.dumps` do?``) and its
reference answer starts with the documented signature (``json.dumps(obj, *, …)``: …), both taken
from the source documentation (:mod:`palm.data.chat_default`). A reply is checked, from text only:

* ``names``: it names the asked function (the question's backticked dotted name appears in it);
* ``signature``: it gives the documented signature (the answer's leading backticked span, spaces
  normalised);
* ``f1``: word F1 against the answer (multiset overlap of lower-cased words, as SQuAD scores);
* ``rouge_l``: ROUGE-L F-measure against the answer (longest common word subsequence; Lin 2004);
* ``repetition``: the degenerate-repetition rate, the share of the reply's word 3-grams that
  repeat an earlier one (0 for a reply without a loop, near 1 for a loop).

``graded`` is the checks of ``names`` and ``signature`` with partial credit, for a reward that a
policy which never passes them yet can climb (RL on the binary checks has no signal where SFT
passes them 0 % of the time): the reply's opening code span (its first backticked span) is read
as ``name(parameters)``; the name's dotted parts are compared with the asked name's and the
parameters (split at top-level commas) with the documented signature's, each as the longest
common subsequence over the longer of the two lists (1 exactly when they are equal, in order).
``graded`` is the mean of the two shares (the name's alone where the answer documents no
signature), 0 without a code span, None where the question names no function. A reply whose
span is the documented signature scores 1 and passes both binary checks.

``score`` combines them into one number in [0, 1] for pairwise wins: the mean of the quality
checks that apply, times ``1 - repetition``. Where a question names no function (a user's own
data), ``names`` and ``signature`` do not apply (None) and the score is F1 and ROUGE-L's.

None of this is what the reward model learned: it is computed from the documentation, so a
policy that fools the reward model does not fool it (Gao et al. 2022's "gold" judge).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

MEASURES = ("names", "signature", "f1", "rouge_l", "repetition", "score")
QUALITY = ("names", "signature", "f1", "rouge_l")  # higher is better; repetition scales them down
_SPAN = re.compile(r"`([^`\n]+)`")
_NAME = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+")
_WORD = re.compile(r"\w+")


def asked_name(prompt: str) -> str | None:
    """The dotted name the question asks about: the last backticked ``a.b`` span of ``prompt``."""
    names = [m.group(1).strip() for m in _SPAN.finditer(prompt) if _NAME.fullmatch(m.group(1).strip())]
    return names[-1] if names else None


def documented_signature(answer: str) -> str | None:
    """The answer's leading backticked span when it is a call signature (``mod.f(a, b=1)``)."""
    m = _SPAN.match(answer.strip())
    return " ".join(m.group(1).split()) if m and "(" in m.group(1) else None


def split_call(span: str) -> tuple[list[str], list[str] | None]:
    """``"mod.f(a, b=(1, 2))"`` -> ``(["mod", "f"], ["a", "b=(1, 2)"])``: the dotted name's parts and
    the parameters split at top-level commas (spaces normalised); parameters None without a ``(``."""
    span = " ".join(span.split())
    head, paren, rest = span.partition("(")
    parts = [p.strip() for p in head.strip().split(".")]
    if not paren:
        return parts, None
    params, depth, current = [], 0, ""
    for ch in rest:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break  # the call's closing parenthesis
            depth -= 1
        if ch == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        params.append(current.strip())
    return parts, params


def share(ours: Sequence[str], theirs: Sequence[str]) -> float:
    """Longest common subsequence over the longer list: 1 exactly when equal, 0 when disjoint."""
    longest = max(len(ours), len(theirs))
    return 1.0 if longest == 0 else lcs_length(list(ours), list(theirs)) / longest


def graded_parts(prompt: str, answer: str, reply: str) -> tuple[float, float | None] | None:
    """The two shares of :func:`graded`: the name's, and the parameters' (None where the answer
    documents no signature); None where the question names no function."""
    name = asked_name(prompt)
    if name is None:
        return None
    signature = documented_signature(answer)
    m = _SPAN.search(reply)
    if m is None:
        return 0.0, None if signature is None else 0.0
    parts, params = split_call(m.group(1))
    if signature is None:
        return share(parts, name.split(".")), None
    _, documented = split_call(signature)
    return share(parts, name.split(".")), share(params or [], documented or [])


def graded(prompt: str, answer: str, reply: str) -> float | None:
    """The partial-credit ``names`` and ``signature`` check (module docstring), in [0, 1]; None where
    the question names no function."""
    parts = graded_parts(prompt, answer, reply)
    if parts is None:
        return None
    name_share, param_share = parts
    return name_share if param_share is None else (name_share + param_share) / 2


def name_share(prompt: str, reply: str) -> float:
    """The name half of :func:`graded` alone, as a ``python:palm.data.rules:name_share`` reward term
    (it needs no answer): the share of the asked dotted name's parts that the reply's opening code
    span names, in order; 0 where the question names no function or the reply has no code span."""
    parts = graded_parts(prompt, "", reply)
    return 0.0 if parts is None else parts[0]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_f1(reply: str, answer: str) -> float:
    """Harmonic mean of word precision and recall, words counted with multiplicity."""
    ours, theirs = Counter(words(reply)), Counter(words(answer))
    common = sum((ours & theirs).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ours.values()), common / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic programme at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(reply: str, answer: str) -> float:
    """ROUGE-L F1 over lower-cased words."""
    ours, theirs = words(reply), words(answer)
    lcs = lcs_length(ours, theirs)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(ours), lcs / len(theirs)
    return 2 * precision * recall / (precision + recall)


def repetition(reply: str, n: int = 3) -> float:
    """Share of the reply's word ``n``-grams that already occurred earlier in it."""
    w = words(reply)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def judge(prompt: str, answer: str, reply: str) -> dict[str, float | None]:
    """Every measure of :data:`MEASURES` for one reply (None where a check does not apply)."""
    name, signature = asked_name(prompt), documented_signature(answer)
    flat = " ".join(reply.split())
    out: dict[str, float | None] = {
        "names": None if name is None else float(name in flat),
        "signature": None if signature is None else float(signature in flat),
        "f1": word_f1(reply, answer),
        "rouge_l": rouge_l(reply, answer),
        "repetition": repetition(reply),
    }
    quality = [out[k] for k in QUALITY if out[k] is not None]
    out["score"] = sum(quality) / len(quality) * (1.0 - out["repetition"])
    return out
