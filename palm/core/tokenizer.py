"""The tokenizer stage: a byte-level BPE (GPT-2 style, Radford et al. 2019) trained with the
`tokenizers` library on the corpus, with the special tokens the later stages use.

Deterministic: the same corpus and config give a byte-identical ``tokenizer.json`` (documents are
fed in corpus order; training and serialisation have no randomness). Its SHA-256 names it: token
shards, checkpoints and stages refuse a tokenizer whose hash differs from the one they were made
with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from palm.core.config import check
from palm.core.errors import UserError, first_line

EOD = "<|endoftext|>"  # end of document (appended to every document in the token shards)
PAD = "<|pad|>"  # padding for batches of unequal length
SYSTEM, USER, ASSISTANT, END_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"  # chat roles (SFT)
SPECIAL_TOKENS = (EOD, PAD, SYSTEM, USER, ASSISTANT, END_TURN)


@dataclass(frozen=True)
class TokenizerConfig:
    """The ``tokenizer`` section."""

    vocab_size: int = 8192  # total, special tokens and the 256 byte symbols included
    min_frequency: int = 2  # a pair must occur this often to be merged
    max_doc_chars: int = 1_000_000  # longer documents are truncated for training (not for encoding)

    def __post_init__(self) -> None:
        check(len(SPECIAL_TOKENS) + 256 < self.vocab_size <= 1_000_000, "vocab_size",
              f"must be between {len(SPECIAL_TOKENS) + 257} and 1000000")
        check(self.min_frequency >= 1, "min_frequency", "must be >= 1")
        check(self.max_doc_chars >= 1, "max_doc_chars", "must be >= 1")


def train_tokenizer(texts: Iterator[str], cfg: TokenizerConfig, *, length: int | None = None,
                    progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (in order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
    )
    tok.train_from_iterator((t[: cfg.max_doc_chars] for t in texts), trainer=trainer, length=length)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens, by role: ``eod_id``, ``pad_id``, ``system_id``, …"""
    names = ("eod_id", "pad_id", "system_id", "user_id", "assistant_id", "end_turn_id")
    ids = {n: tok.token_to_id(t) for n, t in zip(names, SPECIAL_TOKENS)}
    missing = [SPECIAL_TOKENS[i] for i, v in enumerate(ids.values()) if v is None]
    if missing:
        raise UserError(f"tokenizer lacks special tokens {missing}; retrain it with the tokenizer stage")
    return ids  # type: ignore[return-value]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tokenizer(path: Path, expected_sha256: str | None = None) -> Tokenizer:
    """Load ``tokenizer.json``; with ``expected_sha256``, refuse a different tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer not found; run the tokenizer stage first (dvc repro tokenizer)")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise UserError(f"{path}: tokenizer sha256 {actual[:12]}… differs from {expected_sha256[:12]}… that the "
                            f"data was made with; rerun the downstream stages (dvc repro)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise UserError(f"{path}: not a readable tokenizer ({first_line(err)}); rerun the tokenizer stage "
                        f"(dvc repro -f tokenizer)") from None
