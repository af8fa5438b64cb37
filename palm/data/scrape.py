"""The scrape stage: collect raw documents from a source, then clean, filter and deduplicate them
into a Parquet corpus, as datatrove pipelines on the chosen executor (:mod:`palm.data.executors`).

    collect (this process)    clean (tasks ranks)           buckets      cluster     filter (tasks ranks)
    pydoc | crawl | files  ─► read shard r, extract,      ─► pairs per ─► earliest ─► drop duplicates,
    | hf  → raw WARC shards    normalise, filter, sign       band          copy kept    write part r

Raw pages are kept as WARC (the format real crawls use): N = ``tasks`` gzip shards, a record's shard
chosen by a hash of its URL, each record numbered in collection order (dedup keeps the earliest
copy). Rank r of every step handles shard r, so ``tasks`` fixes the output and ``workers`` and the
executor only the speed.

Memory per process, whatever the corpus size: collection streams every source (a record at a
time; one text or HTML file, or one JSONL line, is bounded by ``max_bytes``); a clean or filter
rank holds one document (and a Parquet row group being written); a bucket rank one signature per
clean rank; the cluster step the duplicate pairs (:mod:`palm.data.dedup`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from palm.core.config import check
from palm.core.errors import UserError, first_line
from palm.core.io import write_json
from palm.data.clean import FilterConfig
from palm.data.crawl import CrawlConfig, Page, crawl
from palm.data.dedup import DedupConfig
from palm.data.executors import ExecutorConfig, Step, output_settings, run_steps, step_counts, work_folder
from palm.data.pydoc_server import allowed_module
from palm.data.steps import DROP
from palm.data.warc import WARC_SKIPS, RawRecord, WarcShardWriter, now_iso, read_warc

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
_HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
_WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")


@dataclass(frozen=True)
class ScrapeConfig(CrawlConfig, ExecutorConfig):
    """The ``scrape`` section: the crawl settings of :class:`CrawlConfig` (used by the ``crawl``
    and ``pydoc`` sources), the executor settings of :class:`ExecutorConfig`, the source, the
    filters and dedup."""

    source: Literal["pydoc", "crawl", "files", "hf"] = "pydoc"  # where documents come from
    files_path: str = ""  # `files`: a folder of .txt/.md/.html/.jsonl/.parquet/.warc(.gz)/.wet files
    hf_dataset: str = ""  # `hf`: a Hugging Face dataset name (or local dataset folder), streamed
    hf_config: str = ""  # `hf`: dataset config name ("" for the default)
    hf_split: str = "train"  # `hf`: split to stream
    hf_text_field: str = "text"  # `hf`: column holding the document text
    hf_max_docs: int = 100_000  # `hf`: stop after this many rows
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        ExecutorConfig.__post_init__(self)
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
        name, suffix = path.name.lower(), path.suffix.lower()
        fetched = _mtime_iso(path)  # not the clock: the same files give the same corpus
        url = path.resolve().as_uri()
        if suffix in _TEXT_SUFFIXES or suffix in _HTML_SUFFIXES:
            if path.stat().st_size > cfg.max_bytes:  # one document: held whole, so bounded
                stats["oversize_record"] += 1
                continue
            if suffix in _TEXT_SUFFIXES:
                out.write(RawRecord(url, "text/plain", path.read_bytes(), fetched, path.stem))
            else:
                out.write(RawRecord(url, "text/html", path.read_bytes(), fetched))
        elif name.endswith(_WARC_SUFFIXES):
            try:
                for rec in read_warc(path, cfg.max_bytes, stats):
                    out.write(rec)
            except OSError as err:  # bad records are skipped and counted inside; this is the file
                print(f"warning: scrape: skipped unreadable WARC {path}: {err}", file=sys.stderr)
                stats["unreadable_file"] += 1
                continue
        elif suffix == ".jsonl":
            for i, row in enumerate(_jsonl_rows(path, cfg.max_bytes, stats)):
                if row is None:
                    continue
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    out.write(RawRecord(_row_url(row, f"{url}#L{i + 1}"), "text/plain",
                                        _utf8(row["text"]), fetched, _row_title(row)))
                else:
                    stats["no_text_field"] += 1
        elif suffix == ".parquet":
            if not _collect_parquet(path, url, fetched, out, stats):
                continue
        else:
            stats["unsupported_file"] += 1
            continue
        stats["files_read"] += 1
    stats["fetched"] = out.count
    return dict(stats)


def _mtime_iso(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonl_rows(path: Path, max_bytes: int, stats: Counter) -> Iterator[object]:
    """Each line's JSON value, streamed (None for a line that is not JSON or is over
    ``max_bytes``, counted in ``stats``): a line is read in bounded steps, never the whole file."""
    with open(path, "rb") as f:
        while line := f.readline(max_bytes + 1):
            if len(line) > max_bytes and not line.endswith(b"\n"):
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass  # the rest of an oversize line, skipped in bounded reads
                stats["oversize_record"] += 1
                yield None
                continue
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                yield json.loads(text)
            except (ValueError, RecursionError):  # not JSON, a 5000-digit number, nested past the parser
                stats["bad_json_line"] += 1
                yield None


def _collect_parquet(path: Path, url: str, fetched: str, out: WarcShardWriter, stats: Counter) -> bool:
    """Stream a Parquet file's rows (record batches of its ``text``, ``url`` and ``title`` columns);
    False when it could not be read at all."""
    try:
        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as err:  # not Parquet, truncated, corrupt
        print(f"warning: scrape: skipped unreadable Parquet {path}: {' '.join(str(err).split())}", file=sys.stderr)
        stats["unreadable_file"] += 1
        return False
    if "text" not in names:
        stats["no_text_field"] += 1
        return False
    i = 0
    try:
        for batch in reader.iter_batches(batch_size=1024, columns=[c for c in ("text", "url", "title") if c in names]):
            for row in batch.to_pylist():
                out.write(RawRecord(_row_url(row, f"{url}#row{i}"), "text/plain",
                                    _utf8(str(row["text"])), fetched, _row_title(row)))
                i += 1
    except (pa.ArrowException, OSError, ValueError) as err:  # a corrupt row group: what came before stays
        print(f"warning: scrape: stopped reading Parquet {path} at row {i}: {' '.join(str(err).split())}",
              file=sys.stderr)
        stats["unreadable_file"] += 1
        return False
    return True


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


# ----------------------------------------------------------------------------- WARC → corpus


def pipeline_steps(cfg: ScrapeConfig, raw_dir: Path, work: Path) -> list[Step]:
    """The datatrove pipelines after collection, in order (see the module docstring)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter

    from palm.data.dedup import DedupCluster, DedupSignature, minhash_config
    from palm.data.steps import (CleanPartReader, Extract, Normalize, QualityFilter, Tally, WarcShardReader,
                                 clean_writer, corpus_writer)

    w = str(work)
    mh = minhash_config(cfg.dedup)
    return [
        Step("clean", [WarcShardReader(str(raw_dir)), Extract(), Normalize(cfg.source), QualityFilter(cfg.filters),
                       clean_writer(f"{w}/clean"), DedupSignature(f"{w}/dedup", cfg.dedup)], cfg.tasks),
        Step("buckets", [MinhashDedupBuckets(f"{w}/dedup/sigs", f"{w}/dedup/buckets", config=mh)], mh.num_buckets,
             light=True),
        Step("cluster", [DedupCluster(f"{w}/dedup", cfg.dedup, cfg.tasks)], 1, light=True),
        Step("filter", [CleanPartReader(f"{w}/clean"), MinhashDedupFilter(f"{w}/dedup/remove"),
                        corpus_writer(f"{w}/corpus"), Tally()], cfg.tasks, light=True),
    ]


def work_key(cfg: ScrapeConfig) -> str:
    """What the work folder is keyed by: every setting that changes the output (not the executor,
    the workers or how Slurm is asked)."""
    values = output_settings(cfg, ("concurrency",))
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scrape(cfg: ScrapeConfig, raw_dir: Path, corpus_dir: Path, *, work: Path | None = None,
           progress: bool = True) -> dict:
    """Run the whole stage into ``raw_dir`` (WARC shards) and ``corpus_dir`` (Parquet parts and
    ``stats.json``); both must be fresh, empty folders (the caller makes them atomic).

    ``work`` holds what the steps write on the way (and datatrove's logs and completion markers):
    a rerun with the same folder after a crash skips the collection and the ranks that finished.
    The caller keys it by the params (:func:`work_key`); None = a temporary folder. It is removed
    on success. Returns the stats. Raises :class:`UserError` when no document survives."""
    with work_folder(work, "palm-scrape-") as work:
        stats = _scrape(cfg, Path(raw_dir), Path(corpus_dir), work, progress)
    return stats


def collect(cfg: ScrapeConfig, work: Path, progress: bool = False) -> dict:
    """Collect the source into ``<work>/raw`` (``tasks`` WARC shards) and ``<work>/collected.json``
    (the counts), once: a rerun with the same work folder finds them there."""
    raw, done = work / "raw", work / "collected.json"
    if done.is_file():  # a rerun after a crash: the pages are already here
        return json.loads(done.read_text())
    shutil.rmtree(raw, ignore_errors=True)
    with WarcShardWriter(raw, cfg.tasks) as writer:
        collect_stats = COLLECTORS[cfg.source](cfg, writer, progress)
    collected = {"fetched": writer.count, "collect": collect_stats}
    write_json(done, collected)
    return collected


def _scrape(cfg: ScrapeConfig, raw_dir: Path, corpus_dir: Path, work: Path, progress: bool) -> dict:
    raw = work / "raw"
    collected = collect(cfg, work, progress)
    fetched = collected["fetched"]
    if fetched == 0:
        raise UserError(f"scrape ({cfg.source}) collected no documents ({_describe(collected['collect'])}); "
                        f"check the scrape section of params.yaml")

    run_steps(pipeline_steps(cfg, raw, work), cfg, work, progress=progress)

    counts = step_counts(work / "logs")
    drops = Counter({k[len(DROP):]: v for k, v in counts.items() if k.startswith(DROP) and v})
    kept, words = int(counts.get("kept", 0)), int(counts.get("words", 0))
    if kept == 0:
        raise UserError(f"scrape ({cfg.source}): all {fetched} documents were dropped ({_describe(dict(drops))}); "
                        f"loosen scrape.filters or point the source at text documents")
    for part in sorted((work / "corpus").glob("part-*.parquet")):
        os.replace(part, corpus_dir / part.name)
    for shard in sorted(raw.glob("shard-*.warc.gz")):
        os.replace(shard, raw_dir / shard.name)
    stats = {
        "source": cfg.source,
        "fetched": fetched,
        "documents": kept,
        "words": words,
        "dropped": dict(sorted(drops.items())),
        "dropped_total": int(sum(drops.values())),
        "collect": collected["collect"],
    }
    write_json(corpus_dir / "stats.json", stats)
    return stats


def _describe(counts: dict) -> str:
    flat = {k: v for k, v in counts.items() if isinstance(v, int) and v}
    return ", ".join(f"{k}: {v}" for k, v in sorted(flat.items())) or "nothing found"
