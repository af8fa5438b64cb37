"""Raw pages as WARC, the format real crawls use: N gzip shards, a record's shard chosen by a
hash of its URL, so each shard can be processed on its own (here a process, later a node)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from warcio.archiveiterator import ArchiveIterator
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
        i = int(hashlib.sha1(rec.url.encode()).hexdigest(), 16) % len(self.writers)
        writer = self.writers[i]
        warc_headers = {"WARC-Date": rec.fetched_at, SEQ_HEADER: str(self.count)}
        if rec.title:
            warc_headers["WARC-Title"] = rec.title  # local sources carry a title of their own
        if rec.url.startswith(("http://", "https://")):  # a fetched page: an HTTP response record
            http_headers = StatusAndHeaders("200 OK", [("Content-Type", rec.content_type)], protocol="HTTP/1.1")
            record = writer.create_warc_record(rec.url, "response", payload=io.BytesIO(rec.body),
                                               http_headers=http_headers, warc_headers_dict=warc_headers)
        else:  # a local file, a dataset row: a resource record carrying its own content type
            record = writer.create_warc_record(rec.url, "resource", payload=io.BytesIO(rec.body),
                                               warc_content_type=rec.content_type, warc_headers_dict=warc_headers)
        writer.write_record(record)
        self.count += 1

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "WarcShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_warc(path: Path) -> Iterator[RawRecord]:
    """Records of a WARC/WET file (gzip or not): responses, resources and WET conversions."""
    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type not in ("response", "resource", "conversion"):
                continue
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            fetched = record.rec_headers.get_header("WARC-Date") or now_iso()
            if record.rec_type == "response" and record.http_headers is not None:
                ctype = record.http_headers.get_header("Content-Type") or ""
            elif record.rec_type == "conversion":
                ctype = "text/plain"
            else:
                ctype = record.rec_headers.get_header("Content-Type") or ""
            title = record.rec_headers.get_header("WARC-Title") or ""
            seq = int(record.rec_headers.get_header(SEQ_HEADER) or -1)
            yield RawRecord(url, ctype, record.content_stream().read(), fetched, title, seq)
