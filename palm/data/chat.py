"""Chat data: the project's one chat template, the ``sft_data`` and ``prefs`` stages, and the
loaders that SFT, the reward model and PPO read their data with.

The template, from the tokenizer's special tokens (``palm/core/tokenizer.py``)::

    <|system|>{text}<|end|><|user|>{text}<|end|><|assistant|>{text}<|end|><|user|>…

Each turn is its role token, its text (byte-level BPE; a special token's spelling inside the text
is encoded as plain text, so data cannot forge a turn) and ``<|end|>``. The SFT loss mask is 1 on
every assistant turn's text and its ``<|end|>`` (so the model learns to stop), 0 on everything
else, role tokens included. A generation prompt is the conversation followed by ``<|assistant|>``.

Stage outputs (``data/sft/``, ``data/prefs/``): ``{train,valid}.parquet`` and ``meta.json`` with
the tokenizer's sha256; the loaders refuse data made with another tokenizer. ``data/prefs/`` also
holds ``gold.parquet``: the pairs of ``gold_fraction`` of the prompts that are not held out, for
the gold reward model alone (:func:`gold_groups`; the proxy reward model trains on ``train``).
Every sequence fits the model: ``len(input_ids) <= seq_len`` and ``len(prompt_ids) +
len(reply_ids) <= seq_len``.
Too long: the prompt is cut from the left and the reply kept; dropped only when the reply (with
its ``<|assistant|>`` header) alone does not fit. The train/valid split is by the first user turn
(a prompt is never in both) with the seeded hash of ``palm/data/tokenize.py``; the same seed puts
a question in the same split in both stages. A small input holds out more than ``valid_fraction``
(:func:`split_groups`, ``min_valid``): the next prompts in the hash's order, which may then differ
between the two stages.

What a stage leaves out is counted per reason in its metrics; a reason that takes more than
:data:`DROP_WARN_SHARE` of the input is also one warning line on stderr naming the setting to turn
(:func:`drop_warnings`), as is a valid split smaller than ``min_valid``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from palm.core.config import check
from palm.core.errors import ConfigError, UserError
from palm.core.tokenizer import ASSISTANT, END_TURN, SYSTEM, USER, special_ids
from palm.data.chat_readers import DROP_REASONS, Conversation, Pair, Skip, Turn, read_examples
from palm.data.rankings import RankingStats

META = "meta.json"
DROP_WARN_SHARE = 0.10  # a drop reason above this share of the input gets a warning line
SPLITS = ("train", "valid")
PREFS_SPLITS = (*SPLITS, "gold")  # gold: the gold reward model's pairs, never the proxy's or PPO's
GOLD_SALT = "gold"  # the gold split's hash differs from the valid split's (same seed, another salt)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SFT_SCHEMA = pa.schema([
    ("conversation_id", pa.string()),  # sha1 of the rendered conversation text
    ("group_id", pa.string()),  # sha1 of the first user turn: the unit of the train/valid split
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),  # 1 on assistant text and its <|end|>
    ("text", pa.string()),  # the rendered conversation (before any truncation)
    ("truncated", pa.bool_()),  # the prompt was cut from the left to fit seq_len
])
PREFS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),  # sha1 of the rendered prompt text
    ("group_id", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),  # ends with <|assistant|>
    ("chosen_ids", pa.list_(pa.int32())),  # reply text + <|end|>
    ("rejected_ids", pa.list_(pa.int32())),
    ("prompt", pa.string()),  # the rendered prompt (before any truncation)
    ("chosen", pa.string()),  # reply texts, without the template
    ("rejected", pa.string()),
    ("truncated", pa.bool_()),
    ("kind", pa.string()),  # the pair's kind where the source gives one ("" otherwise)
])


# ----------------------------------------------------------------------------- the template

def render_text(conv: Conversation, generation_prompt: bool = False) -> str:
    """The conversation as template text (``<|user|>…<|end|><|assistant|>…<|end|>``)."""
    text = "".join(f"{ROLE_TOKENS[t.role]}{t.text}{END_TURN}" for t in conv)
    return text + ASSISTANT if generation_prompt else text


class ChatTemplate:
    """Token ids of conversations, prompts and replies in the project's chat template."""

    def __init__(self, tok: Any):
        from tokenizers import Tokenizer

        ids = special_ids(tok)
        self.role_ids = {"system": ids["system_id"], "user": ids["user_id"], "assistant": ids["assistant_id"]}
        self.end_id = ids["end_turn_id"]
        self._tok = Tokenizer.from_str(tok.to_str())  # a copy: the caller's tokenizer is left as it is
        self._tok.encode_special_tokens = True  # "<|end|>" typed in a text is plain text

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def render(self, conv: Conversation) -> tuple[list[int], list[int]]:
        """``(input_ids, loss_mask)`` of a conversation."""
        ids: list[int] = []
        mask: list[int] = []
        for turn, body in zip(conv, self.encode([t.text for t in conv])):
            learn = int(turn.role == "assistant")
            ids += [self.role_ids[turn.role], *body, self.end_id]
            mask += [0] + [learn] * (len(body) + 1)
        return ids, mask

    def render_prompt(self, conv: Conversation) -> list[int]:
        """A prompt for the next assistant reply: the conversation, then ``<|assistant|>``."""
        return self.render(conv)[0] + [self.role_ids["assistant"]]

    def render_reply(self, text: str) -> list[int]:
        """An assistant reply as it follows a prompt: its text, then ``<|end|>``."""
        return self.encode([text])[0] + [self.end_id]


def fit_conversation(ids: list[int], mask: list[int], reply_start: int,
                     seq_len: int) -> tuple[list[int], list[int], bool]:
    """Cut the prompt (``ids[:reply_start]``) from the left so the sequence fits ``seq_len``;
    :class:`Skip` ``too_long`` when the reply alone does not."""
    if len(ids) - reply_start > seq_len:
        raise Skip("too_long")
    if len(ids) <= seq_len:
        return ids, mask, False
    return ids[-seq_len:], mask[-seq_len:], True


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int) -> tuple[list[int], bool]:
    """The prompt, cut from the left (keeping at least its ``<|assistant|>``) so that it fits
    with the longer reply."""
    room = seq_len - max(len(chosen), len(rejected))
    if room < 1:
        raise Skip("too_long")
    return (prompt[-room:], True) if len(prompt) > room else (prompt, False)


# ----------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class ChatDataConfig:
    """The ``sft_data`` and ``prefs`` sections."""

    # "default": derived from the corpus (automatic labels); else a file or folder of .jsonl,
    # .jsonl.gz, .json or .parquet (relative to the project root), or "hf:<dataset name>"; or a
    # list of these, read in turn, e.g. [default, data/feedback/rankings.jsonl]
    path: str | tuple[str, ...] = "default"
    # auto: detected per file (what a list of sources of different kinds needs); rankings: the
    # judgements of `palm feedback serve` (palm/data/rankings.py)
    format: Literal["auto", "oasst", "hh", "pairs", "chat", "instruction", "rankings"] = "auto"
    hf_split: str = "train"  # with hf:<name>: the split to read
    valid_fraction: float = 0.05  # share of prompts held out
    # the valid split holds at least min(min_valid, a quarter of the examples), more prompts than
    # valid_fraction when needed (evaluate draws its held-out prompts from sft_data's valid split);
    # fewer than min_valid is a warning line
    min_valid: int = 32
    seed: int = 1234  # seeds the split (and the default data's choices)
    max_examples: int = 0  # keep at most this many examples (0 = all)
    # prefs only (sft_data: 0): share of the prompts not held out whose pairs go to gold.parquet,
    # for the gold reward model (gold_reward stage) that neither the proxy reward model nor PPO
    # sees; chosen by the prompt's hash with another salt than the valid split's, which stays as it is
    gold_fraction: float = 0.0

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "path", "must name at least one source")
        for source in self.sources:
            check(bool(source.strip()), "path", "must be 'default', a file or folder, or hf:<name>")
            check(source != "hf:", "path", "hf: needs a dataset name, e.g. hf:Anthropic/hh-rlhf")
        check(len(set(self.sources)) == len(self.sources), "path", f"names a source twice: {list(self.sources)}")
        check(0.0 < self.valid_fraction < 1.0, "valid_fraction", "must be between 0 and 1 (exclusive)")
        check(self.max_examples >= 0, "max_examples", "must be >= 0 (0 = all)")
        check(self.min_valid >= 0, "min_valid", f"must be >= 0, got {self.min_valid}")
        check(0.0 <= self.gold_fraction < 1.0, "gold_fraction", f"must be in [0, 1), got {self.gold_fraction}")

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)


# why each reason drops an example, and what to turn about it ({section}: sft_data or prefs)
_CHECK = "check {section}.format and the files of {section}.path"
_ON_PURPOSE = "left out on purpose; other data: {section}.path"
DROP_TEXT = {
    "malformed_json": ("lines that are not JSON", _CHECK),
    "too_deep": ("JSON nested deeper than the parser goes", _CHECK),
    "not_a_record": ("JSON values that are not objects", _CHECK),
    "not_a_list": (".json files whose top level is not a list", _CHECK),
    "unknown_format": ("records of a file whose format was not detected", "set {section}.format"),
    "missing_field": ("a required field absent or not text", _CHECK),
    "unknown_role": ("a role that is not system, user or assistant", _CHECK),
    "empty_turn": ("an empty turn, prompt or reply", _CHECK),
    "no_assistant_turn": ("no assistant reply", _CHECK),
    "prompt_mismatch": ("chosen and rejected with different prompts", _CHECK),
    "same_reply": ("chosen == rejected", _CHECK),
    "empty_tree": ("OpenAssistant trees without a usable (ranked) reply", _CHECK),
    "deleted": ("OpenAssistant messages marked deleted, with their subtrees", _ON_PURPOSE),
    "synthetic": ("OpenAssistant messages a model wrote, with their subtrees", _ON_PURPOSE),
    "failed_review": ("OpenAssistant messages that failed review, with their subtrees", _ON_PURPOSE),
    "duplicate": ("exact duplicates of examples already kept", "check {section}.path for sources that overlap"),
    "too_long": ("{reply} longer than model.seq_len {seq_len} tokens", "raise model.seq_len"),
    "no_pairs_format": ("records of a format without preferences",
                        "point prefs.path at hh, pairs, oasst or rankings data"),
    "superseded": ("judgements replaced by the same labeler's later one", "as intended"),
    "unranked": ("judgements with no preference (all bad or skipped)", "as intended"),
    "bad_order": ("rankings whose order does not list every reply once", _CHECK),
}


def drop_warnings(kind: Literal["sft", "prefs"], counts: dict, kept: int, seq_len: int) -> list[str]:
    """One warning line per drop reason that took more than :data:`DROP_WARN_SHARE` of the input
    (the examples kept plus everything dropped: records, messages or examples, as counted)."""
    section = "sft_data" if kind == "sft" else "prefs"
    unit = "conversations" if kind == "sft" else "preference pairs"
    reply = "the final reply alone" if kind == "sft" else "a reply alone"
    total = kept + sum(counts.get(r, 0) for r in DROP_REASONS)
    lines = []
    for reason in DROP_REASONS:
        n = counts.get(reason, 0)
        if n and n > DROP_WARN_SHARE * total:
            what, knob = (t.format(section=section, seq_len=seq_len, reply=reply) for t in DROP_TEXT[reason])
            lines.append(f"warning: {section}: dropped {n} of {total} {unit} ({100 * n / total:.0f} %) as "
                         f"{reason}: {what} ({knob})")
    return lines


def few_valid(kind: Literal["sft", "prefs"], valid: int, kept: int, min_valid: int) -> str:
    """What a valid split smaller than ``min_valid`` means downstream, in one line."""
    section = "sft_data" if kind == "sft" else "prefs"
    what = "conversations" if kind == "sft" else "preference pairs"
    then = ("evaluate gives no verdict on fewer held-out prompts than evaluate.min_prompts" if kind == "sft"
            else "the reward model's held-out accuracy rests on them")
    return (f"only {valid} of the {kept} {what} held out, fewer than {section}.min_valid {min_valid}: {then}; "
            f"add data to {section}.path")


def split_groups(sizes: dict[str, int], valid_fraction: float, seed: int, min_valid: int) -> set[str]:
    """The groups (``sizes``: group id -> examples) held out: those ``choose_valid`` picks with
    ``valid_fraction``, then, while they hold fewer than min(``min_valid``, a quarter of the
    examples), the next groups in the same hash order (lowest score first), never every group."""
    from palm.data.split import split_score
    from palm.data.tokenize import TokenizeConfig, choose_valid

    valid = choose_valid(sorted(sizes), TokenizeConfig(valid_fraction=valid_fraction, seed=seed))
    want = min(min_valid, sum(sizes.values()) // 4)
    held = sum(sizes[g] for g in valid)
    for group in sorted(sizes, key=lambda g: (split_score(g, seed), g)):
        if held >= want or len(valid) + 1 >= len(sizes):
            break
        if group not in valid:
            valid.add(group)
            held += sizes[group]
    return valid


def gold_groups(groups: Iterable[str], gold_fraction: float, seed: int) -> set[str]:
    """The groups (not held out) set apart for the gold reward model: those whose salted hash
    score is below ``gold_fraction``; with ``gold_fraction > 0`` and two groups or more, at least
    one and never all (the proxy needs training pairs too)."""
    if gold_fraction <= 0:
        return set()
    # uniform in [0, 1) like palm.data.tokenize.split_score, salted: independent of the valid split
    scores = {g: int(hashlib.sha256(f"{GOLD_SALT}:{seed}:{g}".encode()).hexdigest()[:16], 16) / 2**64 for g in groups}
    gold = {g for g, v in scores.items() if v < gold_fraction}
    if len(scores) >= 2:
        if not gold:
            gold = {min(scores, key=lambda g: (scores[g], g))}
        if len(gold) == len(scores):
            gold.discard(max(scores, key=lambda g: (scores[g], g)))
    return gold


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _group(conv: Conversation) -> str:
    return _sha1(next(t.text for t in conv if t.role == "user"))


def _examples(kind: str, cfg: ChatDataConfig, corpus: Path, root: Path, counts: Counter, progress: bool,
              stats: RankingStats):
    for source in cfg.sources:
        if source == "default":
            from palm.data.chat_default import default_conversations, default_pairs

            yield from (default_conversations if kind == "sft" else default_pairs)(corpus, cfg.seed, counts)
        else:
            yield from read_examples(source, cfg.format, kind, counts, root=root, hf_split=cfg.hf_split,
                                     progress=progress, stats=stats)


def _sft_row(t: ChatTemplate, conv: Conversation, seq_len: int) -> dict:
    ids, mask = t.render(conv)
    reply_start = len(ids) - len(t.render(conv[-1:])[0])
    ids, mask, cut = fit_conversation(ids, mask, reply_start, seq_len)
    text = render_text(conv)
    return {"conversation_id": _sha1(text), "group_id": _group(conv), "input_ids": ids, "loss_mask": mask,
            "text": text, "truncated": cut}


def _pair_row(t: ChatTemplate, pair: Pair, seq_len: int) -> dict:
    chosen, rejected = t.render_reply(pair.chosen), t.render_reply(pair.rejected)
    prompt, cut = fit_pair(t.render_prompt(pair.prompt), chosen, rejected, seq_len)
    text = render_text(pair.prompt, generation_prompt=True)
    return {"prompt_id": _sha1(text), "group_id": _group(pair.prompt), "prompt_ids": prompt,
            "chosen_ids": chosen, "rejected_ids": rejected, "prompt": text, "chosen": pair.chosen,
            "rejected": pair.rejected, "truncated": cut, "kind": pair.kind}


def write_chat_data(kind: Literal["sft", "prefs"], cfg: ChatDataConfig, *, corpus: Path, tokenizer: Path,
                    seq_len: int, out: Path, root: Path = Path("."), progress: bool = False
                    ) -> tuple[dict, dict[str, str]]:
    """:func:`build_chat_data` into ``out``, which appears only complete; returns the metrics and the
    MLflow tags naming the human rankings the data holds (:func:`~palm.data.rankings.run_tags`)."""
    from palm.core.io import atomic_dir
    from palm.data.rankings import run_tags

    with atomic_dir(out) as tmp:
        metrics = build_chat_data(kind, cfg, corpus=corpus, tokenizer=tokenizer, seq_len=seq_len, out=tmp,
                                  root=root, progress=progress)
        tags = run_tags(read_chat_meta(tmp, kind))
    return metrics, tags


def build_chat_data(kind: Literal["sft", "prefs"], cfg: ChatDataConfig, *, corpus: Path, tokenizer: Path,
                    seq_len: int, out: Path, root: Path = Path("."), progress: bool = False) -> dict:
    """Read, clean, dedup, tokenize, fit and split the examples of ``cfg`` into ``out`` (a fresh
    folder): ``{train,valid}.parquet`` (prefs: and ``gold.parquet``) + ``meta.json``. Returns the
    metrics: ``read``, ``kept``, one count per drop reason, the split sizes and tokens."""
    from palm.core.io import write_json
    from palm.core.tokenizer import load_tokenizer, sha256_file

    section = "sft_data" if kind == "sft" else "prefs"
    if kind == "sft" and cfg.gold_fraction:
        raise ConfigError("sft_data.gold_fraction", f"only prefs sets a gold split apart: must be 0, got "
                                                    f"{cfg.gold_fraction}")
    tok_path = Path(tokenizer) / "tokenizer.json"
    template = ChatTemplate(load_tokenizer(tok_path))
    counts: Counter = Counter()
    stats = RankingStats()
    seen: set = set()
    rows: list[dict] = []
    to_row = _sft_row if kind == "sft" else _pair_row
    for example in _examples(kind, cfg, Path(corpus), Path(root), counts, progress, stats):
        if example in seen:
            counts["duplicate"] += 1
            continue
        seen.add(example)
        try:
            rows.append(to_row(template, example, seq_len))
        except Skip as skip:
            counts[skip.reason] += 1
            continue
        if cfg.max_examples and len(rows) >= cfg.max_examples:
            break
    dropped = {f"dropped_{r}": counts[r] for r in DROP_REASONS}
    if not rows:
        reasons = ", ".join(f"{r}: {counts[r]}" for r in DROP_REASONS if counts[r]) or "none found"
        where = ", ".join("the default corpus" if s == "default" else s for s in cfg.sources)
        what = "conversations" if kind == "sft" else "preference pairs"
        raise UserError(f"{where}: no usable {what} ({counts['read']} records read; dropped {reasons}); "
                        f"check {section}.path and {section}.format")

    for line in drop_warnings(kind, counts, len(rows), seq_len):
        print(line, file=sys.stderr)
    groups = Counter(r["group_id"] for r in rows)
    valid = split_groups(groups, cfg.valid_fraction, cfg.seed, cfg.min_valid)
    gold = gold_groups(sorted(set(groups) - valid), cfg.gold_fraction, cfg.seed)
    split_of = lambda g: "valid" if g in valid else "gold" if g in gold else "train"  # noqa: E731
    schema = SFT_SCHEMA if kind == "sft" else PREFS_SCHEMA
    id_cols = ("input_ids",) if kind == "sft" else ("prompt_ids", "chosen_ids", "rejected_ids")
    sizes, tokens = {}, {}
    for split in SPLITS if kind == "sft" else PREFS_SPLITS:
        part = [r for r in rows if split_of(r["group_id"]) == split]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), Path(out) / f"{split}.parquet")
        sizes[split] = len(part)
        tokens[split] = sum(len(r[c]) for r in part for c in id_cols)
    if sizes["valid"] < cfg.min_valid:
        print(f"warning: {section}: {few_valid(kind, sizes['valid'], len(rows), cfg.min_valid)}", file=sys.stderr)
    meta = {"kind": kind, "tokenizer_sha256": sha256_file(tok_path), "seq_len": seq_len, "counts": sizes,
            "tokens": tokens, "source": cfg.path, "format": cfg.format, "seed": cfg.seed,
            "valid_fraction": cfg.valid_fraction, "min_valid": cfg.min_valid, "template": render_text(
                (Turn("system", "{system}"), Turn("user", "{user}"), Turn("assistant", "{assistant}")))}
    if kind == "prefs":
        meta["gold_fraction"] = cfg.gold_fraction
    feedback = stats.metrics() if stats.judgements else {}
    if feedback:  # who judged what: the stage tags its MLflow run with these
        meta["rankings"] = {**feedback, "labelers": sorted(stats.labelers), "batches": sorted(stats.batches)}
    write_json(Path(out) / META, meta)
    return {"read": counts["read"], "kept": len(rows), **dropped, "train": sizes["train"], "valid": sizes["valid"],
            "train_tokens": tokens["train"], "valid_tokens": tokens["valid"],
            **({"gold": sizes["gold"], "gold_tokens": tokens["gold"]} if kind == "prefs" else {}),
            "truncated": sum(r["truncated"] for r in rows), **feedback}


# ----------------------------------------------------------------------------- loaders

def read_chat_meta(folder: Path, stage: str) -> dict:
    """``meta.json`` of a chat-data folder (one clear line when missing or unreadable)."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
        meta["tokenizer_sha256"]
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: missing or unreadable; run the {stage} stage (dvc repro {stage})") from None


def _load(folder: Path, split: str, tokenizer_sha256: str, stage: str, kind: str, schema: pa.Schema) -> pa.Table:
    folder = Path(folder)
    splits = PREFS_SPLITS if kind == "prefs" else SPLITS
    if split not in splits:
        raise UserError(f"split must be one of {', '.join(splits)}, not {split!r}")
    meta = read_chat_meta(folder, stage)
    if meta.get("kind") != kind:
        raise UserError(f"{folder}: holds {meta.get('kind')!r} data, not {kind!r}; run the {stage} stage")
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        raise UserError(f"{folder}: made with tokenizer sha256 {meta['tokenizer_sha256'][:12]}… but the tokenizer "
                        f"given has {tokenizer_sha256[:12]}…; rerun the {stage} stage (dvc repro {stage})")
    path = folder / f"{split}.parquet"
    if split == "gold" and not path.is_file():
        raise UserError(f"{folder}: no gold split (made before prefs.gold_fraction existed); rerun the {stage} "
                        f"stage (dvc repro {stage})")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: unreadable ({err}); rerun the {stage} stage (dvc repro {stage})") from None
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing)}; rerun the {stage} stage (dvc repro {stage})")
    return table


def load_sft(folder: Path, split: str, tokenizer_sha256: str) -> pa.Table:
    """The ``sft_data`` stage's ``split`` (columns of :data:`SFT_SCHEMA`), refusing another tokenizer."""
    return _load(folder, split, tokenizer_sha256, "sft_data", "sft", SFT_SCHEMA)


def load_prefs(folder: Path, split: str, tokenizer_sha256: str) -> pa.Table:
    """The ``prefs`` stage's ``split`` (``train``, ``valid`` or ``gold``; columns of
    :data:`PREFS_SCHEMA`), refusing another tokenizer."""
    return _load(folder, split, tokenizer_sha256, "prefs", "prefs", PREFS_SCHEMA)
