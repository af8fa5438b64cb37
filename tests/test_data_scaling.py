"""The data-scaling benchmark's own bookkeeping (``benchmarks/data_scaling.py``,
``benchmarks/synthetic_corpus.py``): the synthetic corpus passes the scrape stage's quality
filters, its planted copies come after their sources with the Jaccard similarity the manifest
records (checked against the plain-Python definition on the text), it is deterministic and cached;
and the metric functions count precision, recall and the summary ratios right. No stage runs here."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import data_scaling as ds  # noqa: E402
import synthetic_corpus as sc  # noqa: E402

from palm.data.clean import FilterConfig, normalize, quality_reason  # noqa: E402

SPEC = sc.CorpusSpec(target_bytes=1 << 20, seed=7, files=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    folder, info = sc.ensure(SPEC, cache, log=lambda _: None)
    docs = {}
    for f in sorted((folder / "docs").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            docs[row["url"]] = row
    return cache, folder, info, docs, sc.read_manifest(folder)


def test_every_document_passes_the_quality_filters(corpus):
    _, folder, info, docs, _ = corpus
    assert sorted((folder / "docs").iterdir()) == [folder / "docs" / f"part-{i:05d}.jsonl" for i in range(4)]
    assert list(docs) == sc.all_urls(info)  # collection order = the url's index
    assert info["text_bytes"] == sum(len(d["text"].encode()) for d in docs.values()) >= SPEC.target_bytes
    assert sum(info["counts"].values()) == info["documents"] == len(docs)
    cfg = FilterConfig()
    for url, d in docs.items():
        assert normalize(d["text"]) == d["text"], url
        assert quality_reason(d["text"], cfg) is None, url
        assert d["title"]
    words = [len(d["text"].split()) for d in docs.values()]
    assert min(words) >= SPEC.min_words and 300 < sorted(words)[len(words) // 2] < 900


def test_planted_copies_and_their_jaccard(corpus):
    _, _, info, docs, manifest = corpus
    planted = {r["url"] for r in manifest}
    index = {u: i for i, u in enumerate(docs)}
    kinds = {}
    for r in manifest:
        kinds.setdefault(r["kind"], []).append(r["jaccard"])
        assert index[r["source"]] < index[r["url"]]  # the copy comes later: the stage keeps the source
        assert r["source"] not in planted  # copies are of originals only
        real = sc.text_jaccard(docs[r["url"]]["text"], docs[r["source"]]["text"])
        assert abs(real - r["jaccard"]) < 1e-5, r
        if r["kind"] == "exact":
            assert docs[r["url"]]["text"] == docs[r["source"]]["text"]
    assert {k: len(v) for k, v in kinds.items()} == {k: info["counts"][k] for k in sc.KINDS}
    assert all(len(kinds[k]) >= 3 for k in sc.KINDS), {k: len(v) for k, v in kinds.items()}
    assert all(j == 1.0 for j in kinds["exact"])
    assert all(0.93 <= j < 0.97 for j in kinds["near95"]), kinds["near95"]
    assert all(0.9 <= j < 0.93 for j in kinds["near90"]), kinds["near90"]
    assert all(0.4 <= j <= 0.6 for j in kinds["distract50"]), kinds["distract50"]
    assert all(0.2 <= j <= 0.4 for j in kinds["distract30"]), kinds["distract30"]


def test_deterministic_and_cached(corpus, tmp_path):
    cache, folder, info, _, _ = corpus
    digest = lambda d: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.rglob("*.jsonl")))).hexdigest()  # noqa: E731
    again = sc.generate(SPEC, tmp_path / "again")
    assert digest(tmp_path / "again") == digest(folder) and again["counts"] == info["counts"]
    mtime = (folder / "info.json").stat().st_mtime_ns
    assert sc.ensure(SPEC, cache, log=lambda _: None) == (folder, info)  # reused, not remade
    assert (folder / "info.json").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no unfinished folder left
    other = sc.generate(sc.CorpusSpec(target_bytes=1 << 20, seed=8, files=4), tmp_path / "other")
    assert digest(tmp_path / "other") != digest(folder) and other["documents"] > 0


def _manifest():
    return [{"url": "d1", "source": "o1", "kind": "exact", "jaccard": 1.0},
            {"url": "n1", "source": "o1", "kind": "near95", "jaccard": 0.95},
            {"url": "n2", "source": "o2", "kind": "near90", "jaccard": 0.91},
            {"url": "x1", "source": "o2", "kind": "distract50", "jaccard": 0.5},
            {"url": "x2", "source": "o3", "kind": "distract30", "jaccard": 0.3}]


def test_dedup_metrics():
    urls = ["o1", "o2", "o3", "d1", "n1", "n2", "x1", "x2"]
    perfect = ds.dedup_metrics(urls, ["o1", "o2", "o3", "x1", "x2"], _manifest())
    assert (perfect["recall"], perfect["precision"], perfect["distractor_drop_rate"]) == (1.0, 1.0, 0.0)
    assert perfect["true_positives"] == 3 and perfect["false_positives"] == 0 and perfect["kept"] == 5
    # one near duplicate kept, one distractor and one original dropped
    m = ds.dedup_metrics(urls, ["o1", "o2", "n2", "x2", "zz"], _manifest())
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(2 / 4)
    assert m["recall_by_kind"] == {"exact": 1.0, "near95": 1.0, "near90": 0.0}
    assert m["distractor_drop_rate"] == 0.5 and m["distractor_drop_rate_by_kind"] == {"distract50": 1.0, "distract30": 0.0}
    assert m["originals_dropped"] == 1 and m["unknown_kept"] == 1 and m["kept"] == 4
    none = ds.dedup_metrics(urls, urls, _manifest())
    assert none["recall"] == 0.0 and math.isnan(none["precision"])


def _run(mult, peak_scrape, peak_tok, per_core, recall=1.0, precision=1.0):
    return {"mult": mult, "ok": True, "docs_per_cpu_s": per_core,
            "stages": {"scrape": {"peak_max_mib": peak_scrape}, "tokenize": {"peak_max_mib": peak_tok}},
            "dedup": {"recall": recall, "precision": precision}}


def test_summary_lines():
    runs = {1: _run(1, 100, 500, 10.0), 4: _run(4, 400, 500, 8.0, 0.5, 0.5), 16: _run(16, 520, 550, 7.0, 0.97, 0.995)}
    lines, note = ds.summary_lines(runs)
    assert note is None
    # the worse stage's growth (scrape 520/400), 7/8, and the 16x dedup numbers
    assert lines == ["rss_ratio_16x_4x 1.3000", "throughput_ratio_16x_4x 0.8750",
                     "dedup_recall 0.9700", "dedup_precision 0.9950"]
    lines, note = ds.summary_lines({1: runs[1], 4: runs[4]})
    assert "4x and 1x stand in" in note and lines[0] == "rss_ratio_16x_4x 4.0000" and lines[2] == "dedup_recall 0.5000"
    lines, note = ds.summary_lines({16: runs[16], 4: {"mult": 4, "ok": False}})
    assert "nan" in note and lines[:2] == ["rss_ratio_16x_4x nan", "throughput_ratio_16x_4x nan"]
    assert ds.per_core(100, 10.0, 2) == 5.0 and math.isnan(ds.ratio(1.0, 0.0))


def test_scrape_section_styles():
    base = {"source": "pydoc", "shards": 8, "tasks": 8, "executor": "ray", "workers": 0, "dedup": {"threshold": 0.8}}
    new = ds.scrape_section(base, Path("/c/docs"), "tasks", 32, 2, {"dedup.threshold": 0.7, "executor": "local"})
    assert new == {"source": "files", "files_path": "/c/docs", "tasks": 32, "executor": "local", "workers": 2,
                   "dedup": {"threshold": 0.7}}
    old = ds.scrape_section(base, Path("/c/docs"), "shards", 32, 2, {})
    assert old == {"source": "files", "files_path": "/c/docs", "shards": 32, "workers": 2, "dedup": {"threshold": 0.8}}
    assert base["dedup"] == {"threshold": 0.8}  # the side's own params are not changed
    assert ds.parse_sets(["a.b=0.5", "c=[1, 2]"]) == {"a.b": 0.5, "c": [1, 2]}
