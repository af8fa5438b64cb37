"""The scrape stage: collect raw documents from a source, then clean, filter and deduplicate them
into a Parquet corpus.

    source ──► raw WARC shards ──► per-shard workers ──► global dedup ──► corpus Parquet
    (pydoc | crawl | files | hf)    (decode, extract,     (exact SHA-1,     (url, title, text,
                                     normalise, filter,    MinHash LSH)      sha1, fetched_at,
                                     sign)                                   source)

Raw pages are kept as WARC (the format real crawls use) so that every later step reads one format
and each shard can be processed on its own: here by a local process pool, at scale by any
executor that maps a function over shard files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from palm.core.config import check
from palm.core.errors import UserError, first_line
from palm.data.clean import FilterConfig, decode, extract_html, normalize, quality_reason
from palm.data.corpus import CORPUS_SCHEMA
from palm.data.crawl import CrawlConfig, Page, crawl
from palm.data.dedup import DedupConfig, duplicates, signature
from palm.data.pydoc_server import allowed_module
from palm.data.warc import WARC_SKIPS, RawRecord, WarcShardWriter, now_iso, read_warc, shard_name

_PART_SCHEMA = CORPUS_SCHEMA.append(pa.field("minhash", pa.list_(pa.uint64()))).append(pa.field("seq", pa.int64()))
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
_HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
_WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")


@dataclass(frozen=True)
class ScrapeConfig(CrawlConfig):
    """The ``scrape`` section: the crawl settings of :class:`CrawlConfig` (used by the ``crawl``
    and ``pydoc`` sources) plus the source choice, sharding, filters and dedup."""

    source: Literal["pydoc", "crawl", "files", "hf"] = "pydoc"  # where documents come from
    files_path: str = ""  # `files`: a folder of .txt/.md/.html/.jsonl/.parquet/.warc(.gz)/.wet files
    hf_dataset: str = ""  # `hf`: a Hugging Face dataset name (or local dataset folder), streamed
    hf_config: str = ""  # `hf`: dataset config name ("" for the default)
    hf_split: str = "train"  # `hf`: split to stream
    hf_text_field: str = "text"  # `hf`: column holding the document text
    hf_max_docs: int = 100_000  # `hf`: stop after this many rows
    shards: int = 8  # raw WARC shards (units of parallel work)
    workers: int = 0  # worker processes for cleaning; 0 = all cores
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.shards >= 1, "shards", "must be >= 1")
        check(self.workers >= 0, "workers", "must be >= 0 (0 = all cores)")
        check(self.hf_max_docs >= 1, "hf_max_docs", "must be >= 1")
        check(self.source != "crawl" or len(self.seed_urls) > 0, "seed_urls",
              "at least one seed URL is required when source is 'crawl'")
        check(self.source != "files" or bool(self.files_path), "files_path",
              "a folder is required when source is 'files'")
        check(self.source != "hf" or bool(self.hf_dataset), "hf_dataset",
              "a dataset name is required when source is 'hf'")


# ----------------------------------------------------------------------------- sources → WARC


def _page_record(page: Page) -> RawRecord:
    return RawRecord(page.url, page.content_type, page.body, page.fetched_at)


@contextlib.contextmanager
def pydoc_server() -> Iterator[str]:
    """Start the isolated standard-library pydoc server (see :mod:`palm.data.pydoc_server`) and
    yield its base URL; stop it on exit."""
    script = Path(__file__).with_name("pydoc_server.py")
    # -I: no cwd/script dir on sys.path, no PYTHON* env; -S: no site-packages.
    # a near-empty environment: pydoc's page of os.environ must not show this one's secrets
    env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/", env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("URL "):
            raise UserError(f"the pydoc server did not start (exit code {proc.poll()}); run "
                            f"`{sys.executable} -I -S {script}` to see why")
        yield line.split()[1]
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pydoc_url_filter(base: str):
    """Only the index and allowed standard-library module pages of the server at ``base``."""
    base_netloc = urlsplit(base).netloc

    def ok(url: str) -> bool:
        parts = urlsplit(url)
        if parts.netloc != base_netloc or parts.query:
            return False
        path = parts.path.lstrip("/")
        return path in ("", "index.html") or (path.endswith(".html") and allowed_module(path[:-5]))

    return ok


# The base URL pydoc pages are recorded under: ".invalid" is reserved never to resolve (RFC 2606),
# since the server that served them (a random local port) is gone after the scrape.
PYDOC_BASE = "http://pydoc.invalid/"


def _collect_pydoc(cfg: ScrapeConfig, out: WarcShardWriter, progress: bool) -> dict[str, int]:
    with pydoc_server() as base:
        crawl_cfg = _crawl_config(cfg, seed_urls=(base,), allow_hosts=tuple(cfg.allow_hosts) + (urlsplit(base).netloc,))
        is_index = lambda url: urlsplit(url).path.lstrip("/") in ("", "index.html")  # noqa: E731

        pages: list[RawRecord] = []

        def keep(page: Page) -> None:
            if not is_index(page.url):  # the index is a list of links, not a document
                # recorded under a fixed base, not the server's random port: the URL picks the shard
                path = urlsplit(page.url).path.lstrip("/")
                pages.append(RawRecord(PYDOC_BASE + path, page.content_type, page.body, page.fetched_at))

        stats = crawl(crawl_cfg, keep, url_filter=pydoc_url_filter(base), progress=progress).as_dict()
        # written in page order, not in the order concurrent fetches finished: the corpus order
        # (which near-duplicate dedup keeps, the token shards' order) is the same on every run
        for rec in sorted(pages, key=lambda r: r.url):
            out.write(rec)
        return stats


def _crawl_config(cfg: ScrapeConfig, **overrides: object) -> CrawlConfig:
    from dataclasses import fields

    values = {f.name: getattr(cfg, f.name) for f in fields(CrawlConfig)}
    values.update(overrides)
    return CrawlConfig(**values)


def _collect_crawl(cfg: ScrapeConfig, out: WarcShardWriter, progress: bool) -> dict[str, int]:
    return crawl(_crawl_config(cfg), lambda p: out.write(_page_record(p)), progress=progress).as_dict()


def _collect_files(cfg: ScrapeConfig, out: WarcShardWriter, progress: bool) -> dict[str, int]:
    folder = Path(cfg.files_path)
    if not folder.is_dir():
        raise UserError(f"scrape.files_path: folder {folder} not found (or not a folder); "
                        f"point it at a folder of .txt/.md/.html/.jsonl/.parquet/.warc files")
    stats: Counter[str] = Counter(dict.fromkeys(WARC_SKIPS, 0))  # reported even when none happened
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in tqdm(files, desc="read files", unit="file", disable=not progress):
        name = path.name.lower()
        fetched = now_iso()
        url = path.resolve().as_uri()
        if path.suffix.lower() in _TEXT_SUFFIXES:
            out.write(RawRecord(url, "text/plain", path.read_bytes(), fetched, path.stem))
        elif path.suffix.lower() in _HTML_SUFFIXES:
            out.write(RawRecord(url, "text/html", path.read_bytes(), fetched))
        elif name.endswith(_WARC_SUFFIXES):
            try:
                for rec in read_warc(path, cfg.max_bytes, stats):
                    out.write(rec)
            except OSError as err:  # bad records are skipped and counted inside; this is the file
                print(f"warning: scrape: skipped unreadable WARC {path}: {err}", file=sys.stderr)
                stats["unreadable_file"] += 1
                continue
        elif path.suffix.lower() == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):  # not JSON, a 5000-digit number, nested past the parser
                    stats["bad_json_line"] += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    out.write(RawRecord(_row_url(row, f"{url}#L{i + 1}"), "text/plain",
                                        _utf8(row["text"]), fetched, _row_title(row)))
                else:
                    stats["no_text_field"] += 1
        elif path.suffix.lower() == ".parquet":
            try:
                table = pq.read_table(path)
            except (pa.ArrowException, OSError, ValueError) as err:  # not Parquet, truncated, corrupt
                print(f"warning: scrape: skipped unreadable Parquet {path}: {' '.join(str(err).split())}",
                      file=sys.stderr)
                stats["unreadable_file"] += 1
                continue
            if "text" not in table.column_names:
                stats["no_text_field"] += 1
                continue
            for i, row in enumerate(table.to_pylist()):
                out.write(RawRecord(_row_url(row, f"{url}#row{i}"), "text/plain",
                                    _utf8(str(row["text"])), fetched, _row_title(row)))
        else:
            stats["unsupported_file"] += 1
            continue
        stats["files_read"] += 1
    stats["fetched"] = out.count
    return dict(stats)


def _row_url(row: dict, default: str) -> str:
    """A row's ``url`` where it is text, else ``default`` (the file and line or row)."""
    value = row.get("url")
    return value if isinstance(value, str) and value else default


def _row_title(row: dict) -> str:
    value = row.get("title")
    return value if isinstance(value, str) else str(value or "")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of text that may hold lone surrogates (JSON's ``"\\ud800"``): those become ``?``."""
    return text.encode("utf-8", "replace")


def _collect_hf(cfg: ScrapeConfig, out: WarcShardWriter, progress: bool) -> dict[str, int]:
    try:
        import datasets

        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config or None, split=cfg.hf_split, streaming=True)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, bad config: one clear line
        raise UserError(f"scrape.hf_dataset: could not load {cfg.hf_dataset!r} ({type(err).__name__}: {first_line(err)}); "
                        f"the Hugging Face hub needs network access: when offline use source 'files' "
                        f"with a local folder") from None
    n = 0
    for i, row in enumerate(tqdm(ds, desc="stream hf", unit="doc", disable=not progress, total=cfg.hf_max_docs)):
        if i >= cfg.hf_max_docs:
            break
        text = row.get(cfg.hf_text_field)
        if not isinstance(text, str):
            raise UserError(f"scrape.hf_text_field: {cfg.hf_text_field!r} is not a text column of "
                            f"{cfg.hf_dataset!r}; columns: {', '.join(row)}")
        url = row.get("url") or f"hf://{cfg.hf_dataset}/{cfg.hf_split}#{i}"
        out.write(RawRecord(url, "text/plain", text.encode("utf-8"), now_iso(), str(row.get("title") or "")))
        n += 1
    return {"fetched": n}


COLLECTORS = {"pydoc": _collect_pydoc, "crawl": _collect_crawl, "files": _collect_files, "hf": _collect_hf}


# ----------------------------------------------------------------------------- WARC → clean docs


def _clean_record(rec: RawRecord, cfg: ScrapeConfig) -> tuple[dict | None, str | None]:
    """A corpus row (with its MinHash) for one raw record, or the reason it was dropped."""
    ctype = rec.content_type.lower()
    if b"\x00" in rec.body[:65536]:
        return None, "binary"
    raw, fallback = decode(rec.body, rec.content_type)
    if "html" in ctype or (not ctype and raw.lstrip()[:15].lower().startswith(("<!doctype", "<html"))):
        text, title = extract_html(raw)
    elif ctype.startswith("text/") or not ctype:
        text, title = raw, rec.title
    else:
        return None, "content_type"
    if fallback and raw.count("\ufffd") > 0.01 * max(1, len(raw)):
        return None, "undecodable"
    text = normalize(text)
    reason = quality_reason(text, cfg.filters)
    if reason:
        return None, reason
    title = normalize(rec.title or title or "") or (text.split("\n", 1)[0][:200])
    row = {"url": rec.url, "title": title, "text": text, "sha1": hashlib.sha1(text.encode("utf-8")).hexdigest(),
           "fetched_at": rec.fetched_at, "source": cfg.source,
           "minhash": signature(text, cfg.dedup).tolist(), "seq": rec.seq}
    return row, None


def process_shard(warc_path: Path, part_path: Path, cfg: ScrapeConfig) -> tuple[int, dict[str, int]]:
    """Clean one raw shard into one Parquet part; returns ``(records read, drops by reason)``."""
    rows, drops, n = [], Counter(), 0
    for rec in read_warc(warc_path, skipped=drops):  # our own shards: records already bounded
        n += 1
        row, reason = _clean_record(rec, cfg)
        if row is None:
            drops[reason] += 1
        else:
            rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=_PART_SCHEMA), part_path)
    return n, dict(drops)


# ----------------------------------------------------------------------------- the stage


def scrape(cfg: ScrapeConfig, raw_dir: Path, corpus_dir: Path, *, progress: bool = True) -> dict:
    """Run the whole stage into ``raw_dir`` (WARC shards) and ``corpus_dir`` (Parquet parts and
    ``stats.json``); both must be fresh, empty folders (the caller makes them atomic).
    Returns the stats. Raises :class:`UserError` when no document survives."""
    raw_dir, corpus_dir = Path(raw_dir), Path(corpus_dir)
    with WarcShardWriter(raw_dir, cfg.shards) as writer:
        collect_stats = COLLECTORS[cfg.source](cfg, writer, progress)
        fetched = writer.count
    if fetched == 0:
        raise UserError(f"scrape ({cfg.source}) collected no documents ({_describe(collect_stats)}); "
                        f"check the scrape section of params.yaml")

    parts_dir = corpus_dir / ".parts"
    parts_dir.mkdir()
    shard_paths = [raw_dir / shard_name(i) for i in range(cfg.shards)]
    part_paths = [parts_dir / f"part-{i:05d}.parquet" for i in range(cfg.shards)]
    drops: Counter[str] = Counter()
    workers = min(cfg.workers or os.cpu_count() or 1, cfg.shards)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(process_shard, s, p, cfg) for s, p in zip(shard_paths, part_paths)]
        for fut in tqdm(futures, desc="clean shards", unit="shard", disable=not progress):
            _, d = fut.result()
            drops.update(d)

    # Dedup in collection order (crawl order: shallower pages first), so the earliest copy stays.
    keys, seqs = [], []
    for p in part_paths:
        t = pq.read_table(p, columns=["sha1", "minhash", "seq"])
        keys.extend(zip(t.column("sha1").to_pylist(), t.column("minhash").to_numpy(zero_copy_only=False)))
        seqs.extend(t.column("seq").to_pylist())
    order = sorted(range(len(keys)), key=lambda i: (seqs[i], i))
    sorted_reasons, _, _ = duplicates([keys[i] for i in order], cfg.dedup)
    reasons: list[str | None] = [None] * len(keys)
    for i, r in zip(order, sorted_reasons):
        reasons[i] = r
    drops.update(r for r in reasons if r)

    kept = words = 0
    offset = 0
    for i, p in enumerate(part_paths):
        table = pq.read_table(p)
        mask = pa.array([reasons[offset + j] is None for j in range(table.num_rows)], type=pa.bool_())
        offset += table.num_rows
        table = table.filter(mask).drop_columns(["minhash", "seq"])
        if table.num_rows:
            pq.write_table(table, corpus_dir / f"part-{i:05d}.parquet")
            kept += table.num_rows
            words += sum(len(t.split()) for t in table.column("text").to_pylist())
        p.unlink()
    parts_dir.rmdir()
    if kept == 0:
        raise UserError(f"scrape ({cfg.source}): all {fetched} documents were dropped ({_describe(dict(drops))}); "
                        f"loosen scrape.filters or point the source at text documents")
    stats = {
        "source": cfg.source,
        "fetched": fetched,
        "documents": kept,
        "words": words,
        "dropped": dict(sorted(drops.items())),
        "dropped_total": int(sum(drops.values())),
        "collect": collect_stats,
    }
    (corpus_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def _describe(counts: dict) -> str:
    flat = {k: v for k, v in counts.items() if isinstance(v, int) and v}
    return ", ".join(f"{k}: {v}" for k, v in sorted(flat.items())) or "nothing found"
