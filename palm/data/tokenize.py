"""The tokenize stage: encode the corpus into Megatron indexed datasets.

Writes ``train.{bin,idx}`` and ``valid.{bin,idx}`` (one dataset document per corpus document,
end-of-document token appended) and ``meta.json`` naming the tokenizer's SHA-256, which the
pretrain stage checks. The split is by document and seeded: a document goes to ``valid`` when a
hash of ``(seed, sha1)`` falls below ``valid_fraction``, so it does not depend on corpus order,
on ``tasks`` or on the executor.

The encoding is a datatrove pipeline (:class:`palm.data.steps.TokenizeRank`) of ``tasks`` ranks,
each writing its slice of the corpus parts with datatrove's Megatron writer; megatron-core's
``IndexedDatasetBuilder`` then appends the ranks' pairs in order. Memory stays bounded: the
corpus is streamed in record batches; a rank holds one batch and its documents' lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from palm.core.config import check
from palm.core.errors import UserError
from palm.data.executors import ExecutorConfig
from palm.data.split import split_score

META = "meta.json"


@dataclass(frozen=True)
class TokenizeConfig(ExecutorConfig):
    """The ``tokenize`` section: the executor settings of :class:`ExecutorConfig` (``tasks`` ranks
    each encode a slice of the corpus parts), the split and the encoding."""

    valid_fraction: float = 0.05  # share of documents held out for validation
    seed: int = 1234  # seeds the train/valid split
    batch_size: int = 256  # documents per encode batch
    threads: int = 0  # encoding threads; 0 = all cores

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.valid_fraction < 1.0, "valid_fraction", "must be between 0 and 1 (exclusive)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0 (0 = all cores)")


def choose_valid(sha1s: list[str], cfg: TokenizeConfig) -> set[str]:
    """The documents held out; at least one (and not all) when there are two or more."""
    scores = {s: split_score(s, cfg.seed) for s in sha1s}
    valid = {s for s, v in scores.items() if v < cfg.valid_fraction}
    if len(scores) >= 2:
        if not valid:
            valid = {min(scores, key=scores.__getitem__)}
        if len(valid) == len(scores):
            valid.discard(max(scores, key=scores.__getitem__))
    return valid


def split_plan(corpus_dir: Path, cfg: TokenizeConfig) -> tuple[int, str | None, str | None]:
    """One streaming pass over the ``sha1`` column: ``(documents, forced_valid, forced_train)``,
    the exceptions that make :func:`choose_valid`'s guarantees hold without holding every hash."""
    from palm.data.corpus import read_corpus

    n = n_valid = 0
    lo: tuple[float, str | None] = (2.0, None)
    hi: tuple[float, str | None] = (-1.0, None)
    for batch in read_corpus(corpus_dir, ["sha1"], batch_size=8192):
        for sha1 in batch.column("sha1").to_pylist():
            score = split_score(sha1, cfg.seed)
            n += 1
            n_valid += score < cfg.valid_fraction
            lo, hi = min(lo, (score, sha1)), max(hi, (score, sha1))
    forced_valid = lo[1] if n >= 2 and n_valid == 0 else None
    forced_train = hi[1] if n >= 2 and n_valid == n else None
    return n, forced_valid, forced_train


def token_dtype(vocab: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab)


def tokenize_work_key(cfg: TokenizeConfig, corpus_dir: Path, tokenizer_path: Path) -> str:
    """The work folder's key: the output-changing settings, the tokenizer and the corpus parts."""
    from palm.core.tokenizer import sha256_file
    from palm.data.executors import output_settings

    values = output_settings(cfg, ("threads",))
    parts = [] if not Path(corpus_dir).is_dir() else [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(corpus_dir).glob("part-*.parquet"))]
    tok = sha256_file(tokenizer_path) if Path(tokenizer_path).is_file() else ""  # missing: tokenize_corpus says so
    blob = json.dumps([values, tok, parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize_corpus(corpus_dir: Path, tokenizer_path: Path, out_dir: Path, cfg: TokenizeConfig,
                    *, work: Path | None = None, progress: bool = True) -> dict:
    """Encode ``corpus_dir`` with ``tokenizer_path`` into ``out_dir`` (a fresh folder), as a
    datatrove pipeline of ``cfg.tasks`` ranks on ``cfg.executor``; ``work`` (None = a temporary
    folder) keeps the ranks' files and completion markers for a rerun after a crash, and is
    removed on success."""
    import shutil

    if cfg.threads:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.threads)  # before the tokenizers thread pool starts
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from palm.core.io import write_json
    from palm.core.tokenizer import load_tokenizer, sha256_file, special_ids
    from palm.data.executors import Step, run_steps, step_counts, work_folder
    from palm.data.steps import TokenizeRank

    tok = load_tokenizer(tokenizer_path)
    tok_sha = sha256_file(tokenizer_path)
    eod = special_ids(tok)["eod_id"]
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    n_docs, forced_valid, forced_train = split_plan(corpus_dir, cfg)
    if not n_docs:
        raise UserError(f"{corpus_dir}: the corpus has no documents; rerun the scrape stage")

    started = time.perf_counter()
    out_dir = Path(out_dir)
    with work_folder(work, "palm-tok-") as work:
        ranks = work / "ranks"
        step = TokenizeRank(str(Path(corpus_dir).resolve()), str(Path(tokenizer_path).resolve()), str(ranks),
                            valid_fraction=cfg.valid_fraction, seed=cfg.seed, batch_size=cfg.batch_size,
                            token_size=np.dtype(dtype).itemsize, forced_valid=forced_valid, forced_train=forced_train)
        run_steps([Step("tokenize", [step], cfg.tasks)], cfg, work, progress=progress)
        counts = step_counts(work / "logs")
        for name in ("train", "valid"):  # the ranks' pairs appended in rank order (megatron-core's builder)
            if cfg.tasks == 1:  # one rank's pair is the result, byte for byte (tests: same as 3 ranks')
                for ext in ("bin", "idx"):  # add_index would only copy it, after a gc.collect() of ~1 s
                    shutil.move(ranks / f"{name}-00000.{ext}", out_dir / f"{name}.{ext}")  # /tmp may be another disk
                continue
            builder = IndexedDatasetBuilder(str(out_dir / f"{name}.bin"), dtype=dtype)
            for r in range(cfg.tasks):
                builder.add_index(str(ranks / f"{name}-{r:05d}"))
            builder.finalize(str(out_dir / f"{name}.idx"))
    seconds = time.perf_counter() - started
    docs = {n: int(counts.get(f"{n}_documents", 0)) for n in ("train", "valid")}
    tokens = {n: int(counts.get(f"{n}_tokens", 0)) for n in ("train", "valid")}
    meta = {
        "tokenizer_sha256": tok_sha,
        "vocab_size": vocab,
        "eod_id": eod,
        "dtype": np.dtype(dtype).name,
        "documents": docs,
        "tokens": tokens,
        "valid_fraction": cfg.valid_fraction,
        "seed": cfg.seed,
    }
    write_json(out_dir / META, meta)
    total = tokens["train"] + tokens["valid"]
    return {
        "documents": docs["train"] + docs["valid"],
        "train_documents": docs["train"],
        "valid_documents": docs["valid"],
        "tokens": total,
        "train_tokens": tokens["train"],
        "valid_tokens": tokens["valid"],
        "tokens_per_s": round(total / max(seconds, 1e-9), 1),
        "encode_seconds": round(seconds, 3),
    }


def read_meta(tokens_dir: Path) -> dict:
    """``meta.json`` of a token-shard folder (one clear line when missing or unreadable)."""
    import json

    path = Path(tokens_dir) / META
    if not path.is_file():
        raise UserError(f"{path}: token shards have no meta.json; run the tokenize stage (dvc repro tokenize)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: unreadable ({err}); rerun the tokenize stage (dvc repro tokenize)") from None
