"""The embedded default chat data: questions about standard-library functions, answered by
their own documentation, derived from the default corpus (pydoc pages) with no network.

These are automatic labels, not human preferences: for every function documented in a page's
``Functions`` section (``name(signature) Docstring…``, as pydoc writes them, in alphabetical
order), the user asks about ``module.name`` and

- the SFT reply is the function's signature and the first sentences of its docstring;
- three preference pairs rank that reply above (1) the reply about a function of another module
  (the same module where there is only one), (2) a damaged copy: its docstring's words shuffled,
  and (3) a degenerate copy: its opening words repeated in a loop to the same length, the failure
  a small language model falls into when sampling (and a policy must not be rewarded for).

Each pair carries its kind (``other``, ``shuffled``, ``repeated``); the reward stage reports its
held-out accuracy per kind.

Deterministic: the corpus and the seed fix every choice.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from palm.data.chat_readers import Conversation, Pair, Turn

QUESTIONS = ("What does `{}` do?", "Explain `{}`.", "What is `{}` for?", "Tell me about `{}`.")
SECTIONS = {"Functions", "Classes", "Data", "Modules", "Package Contents", "Author", "Credits", "Version", "File"}
_ENTRY = re.compile(r"(?<![\w.])([A-Za-z]\w*)\(")  # a public name followed by its argument list
MAX_SIGNATURE = 80  # longer signatures are shortened to name(...)
MAX_DOC = 280  # characters of docstring in a reply (whole sentences where they fit)


@dataclass(frozen=True)
class FunctionDoc:
    module: str
    name: str
    signature: str  # "dumps(obj, *, skipkeys=False, …)"
    doc: str  # the docstring, as one line

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _close_paren(text: str, start: int) -> int:
    """Index just past the parenthesis matching the one at ``start``, or -1."""
    depth = 0
    for i in range(start, min(len(text), start + 400)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return -1


def parse_functions(module: str, section: str) -> list[FunctionDoc]:
    """The entries of a ``Functions`` section. An entry starts where a public name's argument list
    is followed by a docstring starting in upper case, and names come in alphabetical order (as
    pydoc sorts them), which rejects calls mentioned inside a docstring."""
    starts = []  # (position, name, signature end)
    for m in _ENTRY.finditer(section):
        end = _close_paren(section, m.end() - 1)
        if end < 0 or not section[end:end + 2].strip()[:1].isupper() or section[end:end + 1] != " ":
            continue
        if starts and m.group(1) <= starts[-1][1]:
            continue
        starts.append((m.start(), m.group(1), end))
    docs = []
    for i, (pos, name, end) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else len(section)
        doc = " ".join(section[end:stop].split())
        if len(doc.split()) >= 4:
            docs.append(FunctionDoc(module, name, " ".join(section[pos:end].split()), doc))
    return docs


def function_docs(corpus_dir: Path) -> Iterator[FunctionDoc]:
    """Every documented function of the corpus's pydoc pages, in corpus order."""
    from palm.data.corpus import read_corpus

    for batch in read_corpus(corpus_dir, ["url", "text"]):
        for url, text in zip(batch.column("url").to_pylist(), batch.column("text").to_pylist()):
            page = urlsplit(url).path.rsplit("/", 1)[-1]
            if not page.endswith(".html"):
                continue
            module = page[: -len(".html")]
            lines = text.split("\n")
            for i, line in enumerate(lines):
                if line.strip() == "Functions":
                    body = []
                    for nxt in lines[i + 1:]:
                        if nxt.strip() in SECTIONS:
                            break
                        body.append(nxt)
                    yield from parse_functions(module, " ".join(body))


def _summary(doc: str) -> str:
    """Whole sentences of ``doc``, up to :data:`MAX_DOC` characters (at least the first)."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z`'\"(])", doc)
    out = sentences[0]
    if len(out) > MAX_DOC:  # one long sentence: cut at a word
        out = out[:MAX_DOC].rsplit(" ", 1)[0] + " …"
    for s in sentences[1:]:
        if len(out) + 1 + len(s) > MAX_DOC:
            break
        out += " " + s
    return out


def answer(f: FunctionDoc) -> str:
    sig = f.signature if len(f.signature) <= MAX_SIGNATURE else f"{f.name}(...)"
    return f"`{f.module}.{sig}`: {_summary(f.doc)}"


def _damaged(f: FunctionDoc, rng: random.Random) -> str:
    words = _summary(f.doc).split()
    shuffled = words[:]
    while len(set(words)) > 1 and shuffled == words:
        rng.shuffle(shuffled)
    sig = f.signature if len(f.signature) <= MAX_SIGNATURE else f"{f.name}(...)"
    return f"`{f.module}.{sig}`: {' '.join(shuffled)}"


def _repeated(f: FunctionDoc, rng: random.Random) -> str:
    """The reply's first few words of docstring, looped to the reply's length."""
    head, _, doc = answer(f).partition(": ")
    words = doc.split()
    loop = words[: rng.randint(2, 4)]
    out: list[str] = []
    while len(out) < len(words):
        out += loop
    return f"{head}: {' '.join(out[:max(len(words), 2 * len(loop))])}"


def _docs(corpus_dir: Path, counts: Counter) -> list[FunctionDoc]:
    docs = list(function_docs(corpus_dir))
    counts["read"] += len(docs)
    return docs


def _question(f: FunctionDoc, seed: int) -> str:
    return random.Random(f"{seed}:{f.qualname}").choice(QUESTIONS).format(f.qualname)


def default_conversations(corpus_dir: Path, seed: int, counts: Counter) -> Iterator[Conversation]:
    for f in _docs(corpus_dir, counts):
        yield (Turn("user", _question(f, seed)), Turn("assistant", answer(f)))


def default_pairs(corpus_dir: Path, seed: int, counts: Counter) -> Iterator[Pair]:
    docs = _docs(corpus_dir, counts)
    answers = [answer(f) for f in docs]
    several_modules = len({f.module for f in docs}) > 1
    for i, f in enumerate(docs):
        rng = random.Random(f"{seed}:pair:{f.qualname}")
        prompt = (Turn("user", _question(f, seed)),)
        other = None
        if several_modules:  # another module's function
            while other is None or docs[other].module == f.module or answers[other] == answers[i]:
                other = rng.randrange(len(docs))
        elif len(set(answers)) > 1:  # a corpus of one module: another function of it
            while other is None or answers[other] == answers[i]:
                other = rng.randrange(len(docs))
        if other is not None:
            yield Pair(prompt, answers[i], answers[other], "other")
        for kind, damaged in (("shuffled", _damaged(f, rng)), ("repeated", _repeated(f, rng))):
            if damaged != answers[i]:
                yield Pair(prompt, answers[i], damaged, kind)
