"""The data stages' own work as datatrove pipeline steps: the scrape's (read a raw WARC shard,
extract, normalise, filter, write corpus rows) and the tokenize's (encode a slice of the corpus).
Each holds one document, or one batch, at a time.

A dropped document is counted with ``stat_update("dropped_<reason>")``; datatrove writes every
rank's counters to ``logs/<step>/stats/<rank>.json``, which the stage sums into ``stats.json``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.parquet import ParquetWriter

from palm.data.clean import FilterConfig, decode, extract_html, normalize, quality_reason
from palm.data.corpus import CORPUS_SCHEMA
from palm.data.split import split_score
from palm.data.warc import WARC_SKIPS, read_warc, shard_name

# The rows between the steps: the corpus columns plus the collection order.
CLEAN_SCHEMA = CORPUS_SCHEMA.append(pa.field("seq", pa.int64()))
DROP = "dropped_"  # the prefix of every drop counter


class WarcShardReader(PipelineStep):
    """Rank ``r`` reads raw shard ``r`` (``shard-<r>.warc.gz``): a document per record, its bytes
    in ``metadata["body"]`` until :class:`Extract` decodes them."""

    type = "📖 - READER"
    name = "raw WARC shard"

    def __init__(self, raw_dir: str):
        super().__init__()
        self.raw_dir = Path(raw_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        path = self.raw_dir / shard_name(rank)
        if not path.is_file():
            return
        skipped: Counter[str] = Counter()
        for rec in read_warc(path, skipped=skipped):  # our own shards: records already bounded
            self.stat_update("records")
            yield Document(text="", id=str(rec.seq), metadata={
                "url": rec.url, "content_type": rec.content_type, "body": rec.body,
                "fetched_at": rec.fetched_at, "title": rec.title, "seq": rec.seq})
        for reason in WARC_SKIPS:
            if skipped[reason]:
                self.stat_update(DROP + reason, value=skipped[reason])


class Extract(PipelineStep):
    """Bytes → text: binary and non-text content types dropped, the charset found, the main
    text of an HTML page extracted (trafilatura), undecodable text dropped."""

    type = "🛢 - EXTRAC"
    name = "decode and extract"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            with self.track_time():
                meta = doc.metadata
                body, ctype = meta.pop("body"), meta.pop("content_type")
                text, reason = _extract(body, ctype, meta)
            if reason:
                self.stat_update(DROP + reason)
                continue
            doc.text = text
            yield doc


def _extract(body: bytes, content_type: str, meta: dict) -> tuple[str, str | None]:
    ctype = content_type.lower()
    if b"\x00" in body[:65536]:
        return "", "binary"
    raw, fallback = decode(body, content_type)
    if "html" in ctype or (not ctype and raw.lstrip()[:15].lower().startswith(("<!doctype", "<html"))):
        text, title = extract_html(raw)
        meta["title"] = meta["title"] or title
    elif ctype.startswith("text/") or not ctype:
        text = raw
    else:
        return "", "content_type"
    if fallback and raw.count("\ufffd") > 0.01 * max(1, len(raw)):
        return "", "undecodable"
    return text, None


class Normalize(PipelineStep):
    """NFC, no control characters, tidy blank lines; the title (or the first line) and the SHA-1."""

    type = "✂️ - FORMAT"
    name = "normalise"

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            with self.track_time():
                doc.text = normalize(doc.text)
                meta = doc.metadata
                meta["title"] = normalize(meta["title"] or "") or doc.text.split("\n", 1)[0][:200]
                meta["sha1"] = hashlib.sha1(doc.text.encode("utf-8")).hexdigest()
                meta["source"] = self.source
            yield doc


class QualityFilter(BaseFilter):
    """The quality filters of :func:`palm.data.clean.quality_reason` (length, symbols, repeated
    lines and words, alphabetic words); the reason is counted as ``dropped_<reason>``."""

    name = "quality filters"

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = quality_reason(doc.text, self.cfg)
        return True if reason is None else (False, reason)


def _row(self, doc: Document) -> dict:  # a ParquetWriter adapter (bound to the writer)
    meta = doc.metadata
    return {"url": meta["url"], "title": meta["title"], "text": doc.text, "sha1": meta["sha1"],
            "fetched_at": meta["fetched_at"], "source": meta["source"], "seq": meta["seq"]}


def _corpus_row(self, doc: Document) -> dict:
    row = _row(self, doc)
    del row["seq"]
    return row


def clean_writer(folder: str) -> ParquetWriter:
    """The cleaned rows of rank ``r`` in ``<folder>/part-<r>.parquet``, in shard order."""
    return ParquetWriter(folder, output_filename="part-${rank}.parquet", adapter=_row, schema=CLEAN_SCHEMA,
                         max_file_size=-1, use_content_defined_chunking=False)


def corpus_writer(folder: str) -> ParquetWriter:
    """The corpus part of rank ``r``: ``<folder>/part-<r>.parquet`` (absent when it kept nothing)."""
    return ParquetWriter(folder, output_filename="part-${rank}.parquet", adapter=_corpus_row, schema=CORPUS_SCHEMA,
                         max_file_size=-1, use_content_defined_chunking=False)


class CleanPartReader(PipelineStep):
    """Rank ``r`` reads back ``<folder>/part-<r>.parquet`` (the rows :func:`clean_writer` wrote), in
    record batches; no file means the rank kept nothing."""

    type = "📖 - READER"
    name = "cleaned part"

    def __init__(self, folder: str, batch_size: int = 1000):
        super().__init__()
        self.folder, self.batch_size = Path(folder), batch_size

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        path = self.folder / f"part-{rank:05d}.parquet"
        if not path.is_file():
            return
        for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
            for row in batch.to_pylist():
                text = row.pop("text")
                yield Document(text=text, id=str(row["seq"]), metadata=row)


class Tally(PipelineStep):
    """Counts the documents and words that reach it (``kept``, ``words``)."""

    type = "📊 - STATS"
    name = "tally"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("kept")
            self.stat_update("words", value=len(doc.text.split()))
            yield doc


class TokenizeRank(PipelineStep):
    """Rank ``r`` of ``T`` encodes corpus parts ``[r*P/T, (r+1)*P/T)`` (in order) into
    ``train-<r>`` and ``valid-<r>`` ``.bin/.idx`` pairs with datatrove's Megatron writer; the
    stage then appends the pairs in rank order, so the shards are the same for any ``T``."""

    type = "🔢 - TOKENIZER"
    name = "encode a slice of the corpus"

    def __init__(self, corpus_dir: str, tokenizer_path: str, out: str, *, valid_fraction: float, seed: int,
                 batch_size: int, token_size: int, forced_valid: str | None, forced_train: str | None):
        super().__init__()
        self.corpus_dir, self.tokenizer_path, self.out = corpus_dir, tokenizer_path, out
        self.valid_fraction, self.seed, self.batch_size, self.token_size = valid_fraction, seed, batch_size, token_size
        self.forced_valid, self.forced_train = forced_valid, forced_train

    def is_valid(self, sha1: str) -> bool:
        if sha1 == self.forced_train:
            return False
        return sha1 == self.forced_valid or split_score(sha1, self.seed) < self.valid_fraction

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import pyarrow.parquet as pq
        from datatrove.pipeline.tokens.megatron_tokenizer import MegatronTokenizedFile

        from palm.core.tokenizer import load_tokenizer, special_ids

        tok = load_tokenizer(Path(self.tokenizer_path))
        eod = special_ids(tok)["eod_id"]
        parts = sorted(Path(self.corpus_dir).glob("part-*.parquet"))
        mine = parts[rank * len(parts) // world_size:(rank + 1) * len(parts) // world_size]
        files = {name: MegatronTokenizedFile(self.out, f"{name}-{rank:05d}", token_size=self.token_size)
                 for name in ("train", "valid")}
        counts: Counter[str] = Counter()

        def batches():
            for part in mine:
                yield from pq.ParquetFile(part).iter_batches(batch_size=self.batch_size, columns=["text", "sha1"])

        def encode(batch):  # on a helper thread: encode_batch releases the GIL
            return batch.column("sha1").to_pylist(), tok.encode_batch(batch.column("text").to_pylist(),
                                                                      add_special_tokens=False)

        def write(sha1s, encodings):
            for sha1, enc in zip(sha1s, encodings):
                name = "valid" if self.is_valid(sha1) else "train"
                ids = enc.ids
                ids.append(eod)
                files[name].write(ids)
                counts[f"{name}_documents"] += 1
                counts[f"{name}_tokens"] += len(ids)

        # encode batch i+1 on all cores (the tokenizers' Rust threads) while this thread writes batch i
        with self.track_time(), ThreadPoolExecutor(1) as ahead:
            pending = None
            for batch in batches():
                nxt = ahead.submit(encode, batch)
                if pending is not None:
                    write(*pending.result())
                pending = nxt
            if pending is not None:
                write(*pending.result())
        for label, value in counts.items():
            self.stat_update(label, value=value)
        for f in files.values():
            f.close()
        return iter(())
