"""Readers of human chat and preference data, into :class:`Turn` conversations and :class:`Pair`\\ s.

A source is a file or a folder of files (``.jsonl``, ``.jsonl.gz``, ``.json`` holding a list,
``.parquet``), or ``hf:<name>`` (a Hugging Face dataset, needs network). Each file's format is
given, or detected from its first records (``auto``); each gives conversations (SFT) and, where
it holds preferences, pairs:

- ``oasst``: oasst1 message trees ``{"prompt": {role, text, rank, replies}}``; the best-ranked
  path of each tree; every two differently ranked sibling replies (lower rank chosen).
- ``hh``: Anthropic hh-rlhf ``chosen``/``rejected`` transcripts; the chosen one; its last reply
  over the rejected one, the shared conversation before them as the prompt.
- ``pairs``: ``prompt``/``chosen``/``rejected`` strings; prompt + chosen; chosen over rejected.
- ``chat``: ``messages: [{role, content}]``; the messages.
- ``instruction``: dolly ``instruction``/``context``/``response`` or alpaca
  ``instruction``/``input``/``output``; one exchange.
- ``rankings``: people's judgements of K replies (``palm feedback serve``, ``palm/data/rankings.py``);
  the prompt and the best-ranked reply; every two differently ranked replies (better chosen).

Bad data never raises: a record that cannot be used is skipped and counted under a reason (see
:data:`DROP_REASONS`) in the ``counts`` Counter the caller passes. Only a missing path, a folder
without data files or an unreachable ``hf:`` dataset is a :class:`UserError`.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from palm.core.errors import UserError
from palm.data import rankings

FORMATS = ("auto", "oasst", "hh", "pairs", "chat", "instruction", "rankings")
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"system": "system", "user": "user", "prompter": "user", "human": "user", "assistant": "assistant"}

# Why a record, message or example was not kept (each is a key of the stage's metrics).
DROP_REASONS = (
    "malformed_json",     # a .jsonl line that is not JSON (or an unreadable file)
    "too_deep",           # a .jsonl line (or .json file) nested deeper than the JSON parser can go
    "not_a_record",       # a JSON value that is not an object
    "not_a_list",         # a .json file whose top level is not a list (counted once per file)
    "unknown_format",     # a record of a file whose format could not be detected
    "missing_field",      # a required field is absent or not text
    "unknown_role",       # a turn whose role is not system/user/assistant (or an alias)
    "empty_turn",         # a turn, prompt or reply with no text
    "no_assistant_turn",  # a conversation / transcript without an assistant reply
    "prompt_mismatch",    # hh-rlhf: chosen and rejected do not share the prompt
    "same_reply",         # chosen == rejected
    "empty_tree",         # oasst: a tree that holds no usable assistant reply (or, for pairs, no ranked siblings)
    "deleted",            # oasst: a deleted message (its subtree goes with it)
    "synthetic",          # oasst: a model-written message (its subtree goes with it)
    "failed_review",      # oasst: review_result false (its subtree goes with it)
    "duplicate",          # exact duplicate of an example already kept
    "too_long",           # the reply alone does not fit model.seq_len
    "no_pairs_format",    # prefs from a format that holds no preferences (chat, instruction)
    "superseded",         # rankings: a labeler's earlier judgement of an item, replaced by a later one
    "unranked",           # rankings: an item judged all bad or skipped (no preference between its replies)
    "bad_order",          # rankings: an order that does not list every reply exactly once
)


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str


Conversation = tuple[Turn, ...]


@dataclass(frozen=True)
class Pair:
    """Two replies to one prompt; ``chosen`` is preferred. ``prompt`` ends with a user turn."""

    prompt: Conversation
    chosen: str
    rejected: str
    kind: str = ""  # what sets the two apart, where the source says (the default data's kinds)


class Skip(Exception):
    """A record or example is unusable; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str):
        assert reason in DROP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- records

def data_files(path: Path) -> list[Path]:
    """The data files of a file or folder (recursively, sorted); one clear error if none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"{path}: the folder holds no {'/'.join(SUFFIXES)} files")
    return files


def file_records(path: Path, counts: Counter) -> Iterator[Any]:
    """The JSON values of one file: a .jsonl line each, a .json list's items, a Parquet row each."""
    name = path.name
    try:
        if name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                    yield from batch.to_pylist()
            except pa.ArrowException:  # a corrupt file: not all of Arrow's errors are OSError/ValueError
                counts["read"] += 1
                counts["malformed_json"] += 1
        elif name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                counts["read"] += 1
                counts["not_a_list"] += 1
                return
            yield from data
        else:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except ValueError:
                        counts["read"] += 1
                        counts["malformed_json"] += 1
                    except RecursionError:  # e.g. 100,000 "[": the parser recurses once a level
                        counts["read"] += 1
                        counts["too_deep"] += 1
    # an unreadable file: not JSON, not UTF-8 (UnicodeDecodeError), bad gzip (BadGzipFile is an
    # OSError; a corrupt deflate stream raises zlib.error, a cut one EOFError), bad Parquet
    except (OSError, ValueError, EOFError, zlib.error):
        counts["read"] += 1
        counts["malformed_json"] += 1
    except RecursionError:  # a .json file (or Parquet row) nested too deep to parse
        counts["read"] += 1
        counts["too_deep"] += 1


def hf_records(name: str, split: str) -> Iterator[Any]:
    """Rows of a Hugging Face dataset (``datasets.load_dataset``); offline, one clear error."""
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, gated: all one line for the user
        msg = " ".join(str(err).split())[:300]
        raise UserError(f"hf:{name}: cannot load the Hugging Face dataset ({type(err).__name__}: {msg}); "
                        "it needs network access, or point the path at a local file") from None
    yield from ds


# ----------------------------------------------------------------------------- format detection

def detect(record: Any) -> str | None:
    """The format a record looks like, or None."""
    if not isinstance(record, dict):
        return None
    if rankings.is_ranking(record):
        return "rankings"
    if isinstance(record.get("prompt"), dict) and "role" in record["prompt"]:
        return "oasst"
    if "messages" in record:
        return "chat"
    if "chosen" in record and "rejected" in record:
        return "pairs" if "prompt" in record else "hh"
    if "instruction" in record and ("response" in record or "output" in record):
        return "instruction"
    return None


def with_format(records: Iterator[Any], fmt: str, peek: int = 1000) -> tuple[str | None, Iterator[Any]]:
    """``fmt``, or (``auto``) the format of the first recognisable record among the first ``peek``."""
    if fmt != "auto":
        return fmt, records
    head = list(itertools.islice(records, peek))
    found = next((f for f in map(detect, head) if f), None)
    return found, itertools.chain(head, records)


# ----------------------------------------------------------------------------- cleaning

def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Skip("missing_field")
    value = value.strip()
    if not value:
        raise Skip("empty_turn")
    return value


def _role(value: Any) -> str:
    if not isinstance(value, str):
        raise Skip("missing_field")
    role = ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        raise Skip("unknown_role")
    return role


def conversation(turns: Iterable[Turn]) -> Conversation:
    """A usable conversation: ends with its last assistant turn, holds a user turn before it."""
    turns = list(turns)
    while turns and turns[-1].role != "assistant":
        turns.pop()
    if not turns:
        raise Skip("no_assistant_turn")
    if not any(t.role == "user" for t in turns):
        raise Skip("missing_field")
    return tuple(turns)


def prompt_of(turns: Iterable[Turn]) -> Conversation:
    turns = tuple(turns)
    if not turns or turns[-1].role != "user":
        raise Skip("missing_field")
    return turns


def make_pair(prompt: Iterable[Turn], chosen: Any, rejected: Any) -> Pair:
    pair = Pair(prompt_of(prompt), _text(chosen), _text(rejected))
    if pair.chosen == pair.rejected:
        raise Skip("same_reply")
    return pair


# ----------------------------------------------------------------------------- hh-rlhf

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def hh_turns(transcript: Any) -> list[Turn]:
    """``"\\n\\nHuman: …\\n\\nAssistant: …"`` as turns (text before the first marker is ignored)."""
    if not isinstance(transcript, str):
        raise Skip("missing_field")
    parts = _HH_TURN.split(transcript)
    turns = [Turn("user" if who == "Human" else "assistant", text.strip())
             for who, text in zip(parts[1::2], parts[2::2])]
    if not any(t.role == "assistant" for t in turns):
        raise Skip("no_assistant_turn")
    if any(not t.text for t in turns):
        raise Skip("empty_turn")
    return turns


def hh_pair(record: dict) -> Pair:
    chosen, rejected = hh_turns(record.get("chosen")), hh_turns(record.get("rejected"))
    for turns in (chosen, rejected):
        if turns[-1].role != "assistant":
            raise Skip("no_assistant_turn")
    if chosen[:-1] != rejected[:-1]:
        raise Skip("prompt_mismatch")
    return make_pair(chosen[:-1], chosen[-1].text, rejected[-1].text)


# ----------------------------------------------------------------------------- oasst trees

@dataclass
class _Node:
    role: str
    text: str
    rank: int | None
    children: list["_Node"]


def _oasst_message(msg: Any, counts: Counter) -> _Node | None:
    """One message as a node without children, or None (counted) if it goes with its subtree."""
    if not isinstance(msg, dict):
        counts["missing_field"] += 1
        return None
    for flag, reason in (("deleted", "deleted"), ("synthetic", "synthetic")):
        if msg.get(flag) is True:
            counts[reason] += 1
            return None
    if msg.get("review_result") is False:
        counts["failed_review"] += 1
        return None
    try:
        role, text = _role(msg.get("role")), _text(msg.get("text"))
    except Skip as skip:
        counts[skip.reason] += 1
        return None
    rank = msg.get("rank")
    rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
    return _Node(role, text, rank, [])


def _oasst_node(msg: Any, counts: Counter) -> _Node | None:
    """The usable part of a message subtree; deleted, synthetic and failed-review messages go,
    with their subtree, each counted once. Iterative (a stack, children in file order), so a
    tree as deep as the JSON parser reads is walked whatever Python's recursion limit."""
    root = _oasst_message(msg, counts)
    stack = [(root, msg)] if root is not None else []
    while stack:
        node, raw = stack.pop()
        replies = raw.get("replies") or []
        todo = []
        for r in replies if isinstance(replies, list) else []:
            child = _oasst_message(r, counts)
            if child is not None:
                node.children.append(child)
                todo.append((child, r))
        stack.extend(reversed(todo))
    return root


def _oasst_root(record: dict, counts: Counter) -> _Node | None:
    root = _oasst_node(record.get("prompt"), counts)
    if root is not None and root.role != "user":
        counts["missing_field"] += 1
        return None
    return root


def _best(children: list[_Node]) -> _Node:
    """The best-ranked child: lowest rank, unranked after ranked, file order breaks ties."""
    return min(children, key=lambda c: (c.rank is None, c.rank or 0))


def oasst_conversations(record: dict, counts: Counter) -> Iterator[Conversation]:
    """One conversation per tree: from the prompt, always the best-ranked reply, to a leaf."""
    node = _oasst_root(record, counts)
    if node is None:  # the prompt itself was unusable (already counted)
        return
    path = []
    while node is not None:
        path.append(Turn(node.role, node.text))
        node = _best(node.children) if node.children else None
    try:
        yield conversation(path)
    except Skip:
        counts["empty_tree"] += 1


def oasst_pairs(record: dict, counts: Counter) -> Iterator[Pair]:
    """Every two differently ranked sibling replies (once per unordered pair, lower rank chosen),
    the conversation down to their parent as the prompt."""
    root = _oasst_root(record, counts)
    if root is None:  # the prompt itself was unusable (already counted)
        return
    found = 0
    stack = [(root, ())]
    while stack:
        node, above = stack.pop()
        here = above + (Turn(node.role, node.text),)
        ranked = [c for c in node.children if node.role == "user" and c.role == "assistant" and c.rank is not None]
        for a, b in itertools.combinations(ranked, 2):
            if a.rank == b.rank:
                continue
            good, bad = (a, b) if a.rank < b.rank else (b, a)
            try:
                yield make_pair(here, good.text, bad.text)
                found += 1
            except Skip as skip:
                counts[skip.reason] += 1
        stack.extend((c, here) for c in reversed(node.children))
    if not found:
        counts["empty_tree"] += 1


# ----------------------------------------------------------------------------- per-format extraction

def _chat(record: dict) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise Skip("missing_field")
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            raise Skip("missing_field")
        turns.append(Turn(_role(m.get("role")), _text(m.get("content"))))
    return conversation(turns)


def _instruction(record: dict) -> Conversation:
    instruction = _text(record.get("instruction"))
    extra = record.get("context", record.get("input")) or ""
    if not isinstance(extra, str):
        raise Skip("missing_field")
    reply = record.get("response", record.get("output"))
    user = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
    return (Turn("user", user), Turn("assistant", _text(reply)))


def _pairs_prompt(record: dict) -> Conversation:
    return (Turn("user", _text(record.get("prompt"))),)


def _rankings_places(record: dict) -> tuple[Conversation, list[str], list[int]]:
    """The prompt, the replies and each reply's place of a ranked judgement (:class:`Skip` else)."""
    replies = record.get("replies")
    if not isinstance(replies, list) or not isinstance(record.get("prompt"), list):
        raise Skip("missing_field")
    try:
        place = rankings.places(record.get("verdict"), record.get("order"), len(replies))
    except ValueError:
        raise Skip("bad_order") from None
    if place is None:
        raise Skip("unranked")
    messages = [m if isinstance(m, dict) else {} for m in record["prompt"]]
    return prompt_of(Turn(_role(m.get("role")), _text(m.get("content"))) for m in messages), replies, place


def ranking_pairs(record: dict, counts: Counter) -> Iterator[Pair]:
    """Every two differently ranked replies of a judgement, once, the better one chosen."""
    prompt, replies, place = _rankings_places(record)
    for better, worse in rankings.ordered_pairs(place):
        try:
            yield make_pair(prompt, replies[better], replies[worse])
        except Skip as skip:
            counts[skip.reason] += 1


def _ranking_best(record: dict) -> Conversation:
    prompt, replies, place = _rankings_places(record)
    if 0 not in place:  # no reply at the first place (places() rejects such an order; kept as a guard)
        raise Skip("bad_order")
    return conversation((*prompt, Turn("assistant", _text(replies[place.index(0)]))))


def _one(fn: Callable[[dict], Any]) -> Callable[[dict, Counter], Iterator[Any]]:
    def extract(record: dict, counts: Counter) -> Iterator[Any]:
        yield fn(record)
    return extract


SFT_EXTRACTORS: dict[str, Callable[[dict, Counter], Iterator[Conversation]]] = {
    "oasst": oasst_conversations,
    "hh": _one(lambda r: conversation(hh_turns(r.get("chosen")))),
    "pairs": _one(lambda r: _pairs_prompt(r) + (Turn("assistant", _text(r.get("chosen"))),)),
    "chat": _one(_chat),
    "instruction": _one(_instruction),
    "rankings": _one(_ranking_best),
}
PAIR_EXTRACTORS: dict[str, Callable[[dict, Counter], Iterator[Pair]]] = {
    "oasst": oasst_pairs,
    "hh": _one(hh_pair),
    "pairs": _one(lambda r: make_pair(_pairs_prompt(r), r.get("chosen"), r.get("rejected"))),
    "rankings": ranking_pairs,
}


def read_examples(source: str, fmt: str, kind: str, counts: Counter, *, root: Path = Path("."),
                  hf_split: str = "train", progress: bool = False,
                  stats: rankings.RankingStats | None = None) -> Iterator[Any]:
    """Conversations (``kind="sft"``) or pairs (``kind="prefs"``) of ``source`` (a path relative
    to ``root``, or ``hf:<name>``); ``counts`` gets ``read`` (records) and the drop reasons;
    ``stats`` what the rankings files held (judgements, labelers, batches)."""
    from tqdm import tqdm

    extractors = SFT_EXTRACTORS if kind == "sft" else PAIR_EXTRACTORS
    if source.startswith("hf:"):
        streams = [(source, hf_records(source[3:], hf_split))]
    else:
        streams = [(str(p), file_records(p, counts)) for p in data_files(root / source)]
    bar = tqdm(desc=f"read {kind}", unit="record", disable=not progress)
    for _, records in streams:
        file_fmt, records = with_format(records, fmt)
        if file_fmt == "rankings":
            records = rankings.latest(records, counts, stats)
        for record in records:
            counts["read"] += 1
            bar.update()
            if file_fmt is None:
                counts["unknown_format"] += 1
                continue
            if file_fmt not in extractors:
                counts["no_pairs_format"] += 1
                continue
            if not isinstance(record, dict):
                counts["not_a_record"] += 1
                continue
            try:
                yield from extractors[file_fmt](record, counts)
            except Skip as skip:
                counts[skip.reason] += 1
    bar.close()
