"""The tokenize stage: encode the corpus into Megatron indexed datasets.

Writes ``train.{bin,idx}`` and ``valid.{bin,idx}`` with megatron-core's ``IndexedDatasetBuilder``
(one dataset document per corpus document, end-of-document token appended) and ``meta.json``
naming the tokenizer's SHA-256, which the pretrain stage checks. The split is by document and
seeded: a document goes to ``valid`` when a hash of ``(seed, sha1)`` falls below
``valid_fraction``, so it does not depend on corpus order or on the number of workers.

Memory stays bounded: the corpus is streamed in record batches, encoded batch by batch on all
cores (the tokenizers library's Rust thread pool), and appended to the shards as it goes.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from palm.core.config import check
from palm.core.errors import UserError

META = "meta.json"


@dataclass(frozen=True)
class TokenizeConfig:
    """The ``tokenize`` section."""

    valid_fraction: float = 0.05  # share of documents held out for validation
    seed: int = 1234  # seeds the train/valid split
    batch_size: int = 256  # documents per encode batch
    threads: int = 0  # encoding threads; 0 = all cores

    def __post_init__(self) -> None:
        check(0.0 < self.valid_fraction < 1.0, "valid_fraction", "must be between 0 and 1 (exclusive)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0 (0 = all cores)")


def split_score(sha1: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's hash and the seed."""
    return int(hashlib.sha256(f"{seed}:{sha1}".encode()).hexdigest()[:16], 16) / 2**64


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


def tokenize_corpus(corpus_dir: Path, tokenizer_path: Path, out_dir: Path, cfg: TokenizeConfig,
                    *, progress: bool = True) -> dict:
    """Encode ``corpus_dir`` with ``tokenizer_path`` into ``out_dir`` (a fresh folder)."""
    if cfg.threads:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.threads)  # before the tokenizers thread pool starts
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    from palm.core.io import write_json
    from palm.core.tokenizer import load_tokenizer, sha256_file, special_ids
    from palm.data.corpus import read_corpus

    tok = load_tokenizer(tokenizer_path)
    tok_sha = sha256_file(tokenizer_path)
    eod = special_ids(tok)["eod_id"]
    vocab = tok.get_vocab_size()
    dtype = DType.optimal_dtype(vocab)

    sha1s = [s for b in read_corpus(corpus_dir, ["sha1"]) for s in b.column("sha1").to_pylist()]
    if not sha1s:
        raise UserError(f"{corpus_dir}: the corpus has no documents; rerun the scrape stage")
    valid = choose_valid(sha1s, cfg)

    out_dir = Path(out_dir)
    builders = {name: IndexedDatasetBuilder(str(out_dir / f"{name}.bin"), dtype=dtype) for name in ("train", "valid")}
    docs = {"train": 0, "valid": 0}
    tokens = {"train": 0, "valid": 0}
    started = time.perf_counter()
    bar = tqdm(total=len(sha1s), desc="tokenize", unit="doc", disable=not progress)

    def append(batch_sha1s, encodings):
        for sha1, enc in zip(batch_sha1s, encodings):
            name = "valid" if sha1 in valid else "train"
            ids = np.asarray(enc.ids + [eod], dtype=dtype)
            builders[name].add_document(torch.from_numpy(ids), [len(ids)])
            docs[name] += 1
            tokens[name] += len(ids)
        bar.update(len(batch_sha1s))

    def encode(batch):  # runs on a helper thread: encode_batch releases the GIL
        return batch.column("sha1").to_pylist(), tok.encode_batch(batch.column("text").to_pylist(),
                                                                  add_special_tokens=False)

    # Encode batch i+1 on all cores while the main thread appends batch i to the shards.
    with ThreadPoolExecutor(1) as ahead:
        pending = None
        for batch in read_corpus(corpus_dir, ["text", "sha1"], batch_size=cfg.batch_size):
            nxt = ahead.submit(encode, batch)
            if pending is not None:
                append(*pending.result())
            pending = nxt
        if pending is not None:
            append(*pending.result())
    bar.close()
    for name, builder in builders.items():
        builder.finalize(str(out_dir / f"{name}.idx"))
    seconds = time.perf_counter() - started
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
