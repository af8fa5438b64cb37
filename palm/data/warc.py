"""Raw pages as WARC, the format real crawls use: N gzip shards, a record's shard chosen by a
hash of its URL, so each shard can be processed on its own (here a process, later a node)."""

from __future__ import annotations

import hashlib
import io
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from warcio.archiveiterator import ArchiveIterator
from warcio.bufferedreaders import DecompressingBufferedReader
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


@dataclass
class RawRecord:
    """One fetched or read document before cleaning."""

    url: str
    content_type: str  # "text/html; charset=…", "text/plain", …
    body: bytes
    fetched_at: str  # ISO-8601 UTC
    title: str = ""
    seq: int = -1  # order in which the source produced it (dedup keeps the earliest copy)


SEQ_HEADER = "Palm-Seq"  # a WARC extension header: the record's position in the collection order


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.warc.gz"


class WarcShardWriter:
    """Append records to ``n`` WARC shards under ``folder``; use as a context manager."""

    def __init__(self, folder: Path, n: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files = [open(self.folder / shard_name(i), "wb") for i in range(n)]
        self.writers = [WARCWriter(f, gzip=True) for f in self.files]
        self.count = 0

    def write(self, rec: RawRecord) -> None:
        url, ctype, title = _header_text(rec.url), _header_text(rec.content_type), _header_text(rec.title)
        i = int(hashlib.sha1(url.encode()).hexdigest(), 16) % len(self.writers)
        writer = self.writers[i]
        warc_headers = {"WARC-Date": _header_text(rec.fetched_at), SEQ_HEADER: str(self.count)}
        if title:
            warc_headers["WARC-Title"] = title  # local sources carry a title of their own
        if url.startswith(("http://", "https://")):  # a fetched page: an HTTP response record
            http_headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(rec.body),
                                               http_headers=http_headers, warc_headers_dict=warc_headers)
        else:  # a local file, a dataset row: a resource record carrying its own content type
            record = writer.create_warc_record(url, "resource", payload=io.BytesIO(rec.body),
                                               warc_content_type=ctype, warc_headers_dict=warc_headers)
        writer.write_record(record)
        self.count += 1

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "WarcShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_HEADER_BREAKS = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _header_text(value: str) -> str:
    """``value`` fit for one WARC/HTTP header line: control characters (a CR or LF would end the
    header, or start a forged one) become spaces, lone surrogates (not UTF-8) U+FFFD."""
    return _SURROGATES.sub("\ufffd", _HEADER_BREAKS.sub(" ", value))


# Why read_warc skipped a record (counted in its ``skipped`` Counter, zeros included).
WARC_SKIPS = ("oversize_record", "malformed_record")
_GZIP_MAGIC, _WARC_MAGIC = b"\x1f\x8b\x08", b"WARC/"
# Compressed bytes warcio reads per step: at most ~4 MB once inflated (deflate's 1032:1 maximum).
READ_BLOCK = 4096
MAX_HEADER_BYTES = 1 << 20  # WARC plus HTTP headers of one record; more is malformed


class _HeaderBoundedReader(DecompressingBufferedReader):
    """warcio's reader, refusing a header block over MAX_HEADER_BYTES: warcio reads headers by
    readline (content by read) without a limit, and one compressed line can inflate to GBs."""

    header_bytes = 0

    def readline(self, length: int | None = None) -> bytes:
        room = MAX_HEADER_BYTES + 1 - self.header_bytes
        line = super().readline(room if length is None else min(length, room))
        self.header_bytes += len(line)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise ValueError(f"record headers over {MAX_HEADER_BYTES} bytes")
        return line

    def read(self, length: int | None = None) -> bytes:
        self.header_bytes = 0  # content (or skipping it) follows the headers
        return super().read(length)


class _Records(ArchiveIterator):
    """ArchiveIterator over ``f`` in READ_BLOCK steps, with bounded header lines."""

    def __init__(self, f) -> None:  # noqa: ANN001
        super().__init__(f, block_size=READ_BLOCK)
        self.reader = _HeaderBoundedReader(self.fh, block_size=READ_BLOCK)  # read lazily: not used yet


def read_warc(path: Path, max_bytes: int | None = None, skipped: Counter | None = None) -> Iterator[RawRecord]:
    """Records of a WARC/WET file (gzip or not): responses, resources and WET conversions.

    A stranger's file is read defensively: a record whose content is over ``max_bytes`` is skipped
    without being held in memory (warcio decodes in bounded blocks, headers are bounded by
    MAX_HEADER_BYTES), and a record that cannot be
    parsed is skipped by resuming at the next record start (gzip member or ``WARC/`` line) after
    it. Both are counted in ``skipped`` (``malformed_record`` once per stretch skipped); the
    iteration never raises for a bad record."""
    skipped = Counter() if skipped is None else skipped
    with open(path, "rb") as f:
        gzipped = f.read(3) == _GZIP_MAGIC
        start: int | None = 0
        while start is not None:
            f.seek(start)
            records = _Records(f)
            try:
                for record in records:
                    if record.format != "warc":  # warcio reads junk as a (lenient) ARC record
                        raise ValueError("not a WARC record")
                    if record.rec_type not in ("response", "resource", "conversion"):
                        continue  # warcinfo, request, metadata…: no document
                    rec = _raw_record(record, max_bytes)
                    if rec is None:
                        skipped["oversize_record"] += 1
                    else:
                        yield rec
                return
            except Exception:  # noqa: BLE001 - warcio raises many kinds for a malformed record
                skipped["malformed_record"] += 1
                start = _next_start(f, records.offset + 1, _GZIP_MAGIC if gzipped else _WARC_MAGIC)


def _raw_record(record, max_bytes: int | None) -> RawRecord | None:  # noqa: ANN001 - a warcio record
    """The RawRecord of one document record, None when its content is over ``max_bytes``."""
    stream = record.content_stream()
    body = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    if max_bytes is not None and len(body) > max_bytes:
        return None
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    fetched = record.rec_headers.get_header("WARC-Date") or now_iso()
    if record.rec_type == "response" and record.http_headers is not None:
        ctype = record.http_headers.get_header("Content-Type") or ""
    elif record.rec_type == "conversion":
        ctype = "text/plain"
    else:
        ctype = record.rec_headers.get_header("Content-Type") or ""
    title = record.rec_headers.get_header("WARC-Title") or ""
    seq = record.rec_headers.get_header(SEQ_HEADER) or ""
    return RawRecord(url, ctype, body, fetched, title, int(seq) if seq.lstrip("-").isdigit() else -1)


def _next_start(f, after: int, magic: bytes) -> int | None:  # noqa: ANN001
    """Offset of the first record start at or after ``after`` in file ``f``: a ``WARC/`` line, or
    a gzip member that inflates to one (compressed data holds stray gzip magic bytes)."""
    pos = after
    while (hit := _find(f, pos, magic)) is not None:
        f.seek(hit)
        head = f.read(READ_BLOCK)
        try:
            if magic == _WARC_MAGIC or zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 5) == _WARC_MAGIC:
                return hit
        except zlib.error:
            pass
        pos = hit + 1
    return None


def _find(f, after: int, magic: bytes, block: int = 1 << 16) -> int | None:  # noqa: ANN001
    """Offset of the first ``magic`` at or after ``after`` in file ``f``, scanning in blocks."""
    f.seek(after)
    carry, pos = b"", after
    while chunk := f.read(block):
        data = carry + chunk
        hit = data.find(magic)
        if hit >= 0:
            return pos - len(carry) + hit
        carry = data[-(len(magic) - 1):]
        pos += len(chunk)
    return None
