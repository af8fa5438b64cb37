"""palm.data.warc on strangers' archives: oversize records skipped unread, malformed ones skipped
without losing the rest of the file; and the scrape stage reporting both."""

from __future__ import annotations

import functools
import gzip
import io
import json
import tracemalloc
from collections import Counter

from warcio.warcwriter import WARCWriter

from helpers import ROOT, run_stage_cli
from palm.data.warc import read_warc

PROSE = " ".join(f"Sentence {i} tells how the heron number {i} fishes in pond {i % 7} at dawn." for i in range(30))
HUGE = 100_000_000  # decoded bytes of the bomb record; ~100 kB in the file


def _record(url: str, body: bytes, gzipped: bool) -> bytes:
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=gzipped)
    writer.write_record(writer.create_warc_record(url, "resource", payload=io.BytesIO(body),
                                                  warc_content_type="text/plain"))
    return out.getvalue()


@functools.cache
def _bomb(url: str, gzipped: bool) -> bytes:
    """A resource record whose content is HUGE zero bytes, written as a stream (never in memory)."""
    class Zeros(io.RawIOBase):
        left = HUGE

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    out = io.BytesIO()
    writer = WARCWriter(out, gzip=gzipped)
    writer.write_record(writer.create_warc_record(url, "resource", payload=io.BufferedReader(Zeros()),
                                                  length=HUGE, warc_content_type="text/plain"))
    return out.getvalue()


MALFORMED = b"this is no WARC record\r\nContent-Length: 4\r\n\r\nbody\r\n\r\n"
GOOD = ["https://example.org/a", "https://example.org/b"]


def hostile_warc_gz() -> bytes:
    """good, a compression bomb, a malformed record, a gzip member that is not gzip, good."""
    return (_record(GOOD[0], PROSE.encode(), True) + _bomb("https://example.org/bomb", True)
            + gzip.compress(MALFORMED) + b"\x1f\x8b\x08\x00 not deflate data" + _record(GOOD[1], PROSE.encode(), True))


def read(path, max_bytes: int) -> tuple[list, Counter, int]:
    skipped: Counter = Counter()
    tracemalloc.start()
    try:
        records = list(read_warc(path, max_bytes=max_bytes, skipped=skipped))
        return records, skipped, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gzip_warc_bomb_and_malformed_records_are_skipped_and_the_rest_read(tmp_path):
    path = tmp_path / "hostile.warc.gz"
    path.write_bytes(hostile_warc_gz())
    records, skipped, peak = read(path, 1_000_000)
    print(f"peak {peak / 1e6:.1f} MB traced while reading past a {HUGE / 1e6:.0f} MB record ({path.stat().st_size} B file)")
    assert [r.url for r in records] == GOOD and all(r.body == PROSE.encode() for r in records)
    assert skipped == {"oversize_record": 1, "malformed_record": 1}  # one resync skips both bad members
    # Bounded by design: warcio inflates one READ_BLOCK of input per step (x1032, deflate's
    # maximum ratio: ~4 MB, a few copies alive at once) and read_warc keeps max_bytes + 1 of a
    # record; reading the bomb whole took over 100 MB.
    assert peak < 40_000_000, peak


def test_plain_warc_malformed_header_does_not_lose_the_rest(tmp_path):
    path = tmp_path / "hostile.warc"
    path.write_bytes(_record(GOOD[0], PROSE.encode(), False) + _record("https://example.org/big", b"y" * 50_000, False)
                     + MALFORMED + _record(GOOD[1], PROSE.encode(), False))
    records, skipped, _ = read(path, 10_000)
    assert [r.url for r in records] == GOOD
    assert skipped == {"oversize_record": 1, "malformed_record": 1}


def test_scrape_reports_warc_skips_in_stats_and_metrics(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hostile.warc.gz").write_bytes(hostile_warc_gz())
    (tmp_path / "params.yaml").write_text(json.dumps({"scrape": {
        "source": "files", "files_path": str(src), "tasks": 1, "workers": 1, "max_bytes": 1_000_000,
        "filters": {"min_words": 20}}}))
    proc = run_stage_cli("scrape", ["--raw", "raw", "--out", "corpus", "--no-mlflow"], cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "corpus" / "stats.json").read_text())
    assert stats["fetched"] == 2
    assert stats["collect"]["oversize_record"] == 1 and stats["collect"]["malformed_record"] == 1
    metrics = json.loads((tmp_path / "reports" / "scrape" / "metrics.json").read_text())
    assert metrics["crawl_oversize_record"] == 1 and metrics["crawl_malformed_record"] == 1


def test_gzip_record_with_an_endless_header_line_is_skipped_in_bounded_memory(tmp_path):
    """50 MB of header line inflated from ~50 kB: warcio's readline would hold it all."""
    line = gzip.compress(b"WARC/1.0\r\nWARC-Type: resource\r\nX-Long: " + b"a" * 50_000_000 + b"\r\n\r\n")
    path = tmp_path / "long-header.warc.gz"
    path.write_bytes(_record(GOOD[0], PROSE.encode(), True) + line + _record(GOOD[1], PROSE.encode(), True))
    records, skipped, peak = read(path, 1_000_000)
    assert [r.url for r in records] == GOOD
    assert skipped == {"malformed_record": 1}
    assert peak < 40_000_000, peak  # MAX_HEADER_BYTES of headers plus the decoding steps
