"""The corpus format shared by the data stages: Parquet parts ``part-NNNNN.parquet`` with one row
per document, read back as a stream of record batches (never the whole corpus at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from palm.core.errors import UserError

CORPUS_SCHEMA = pa.schema([
    ("url", pa.string()),  # where the document came from (http(s)://, file://, hf://)
    ("title", pa.string()),
    ("text", pa.string()),  # cleaned, NFC-normalised main text
    ("sha1", pa.string()),  # SHA-1 of text (the exact-dedup key and the document's id)
    ("fetched_at", pa.string()),  # ISO-8601 UTC
    ("source", pa.string()),  # scrape.source that produced it
])


def read_corpus(corpus_dir: Path, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
    """Stream the corpus Parquet parts in order, ``batch_size`` rows at a time."""
    parts = sorted(Path(corpus_dir).glob("part-*.parquet"))
    if not parts:
        raise UserError(f"{corpus_dir}: no corpus parts (part-*.parquet); run the scrape stage first (dvc repro scrape)")
    for part in parts:
        try:
            reader = pq.ParquetFile(part)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{part}: not a readable corpus part ({err}); rerun the scrape stage "
                            f"(dvc repro -f scrape)") from None
        yield from reader.iter_batches(batch_size=batch_size, columns=columns)


def write_corpus(rows: list[dict], corpus_dir: Path, part: int = 0) -> Path:
    """Write ``rows`` (dicts with the corpus columns) as one part; for tools and tests."""
    path = Path(corpus_dir) / f"part-{part:05d}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA), path)
    return path
