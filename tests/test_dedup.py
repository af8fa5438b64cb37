"""Dedup on datatrove's MinHash stages (palm/data/dedup.py): the banding against datasketch's own
choice, the signature's Jaccard estimate against the exact value, the cluster rule (earliest copy
in collection order kept, candidates confirmed) against a slow all-pairs loop, and the stage's
four steps end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from palm.data.dedup import DedupConfig, bands, record_dtype, resolve, signature

WORDS = [f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(2000)]  # letters only:
# the shingles' normalisation maps every digit run to 0


def shingles(text: str, k: int) -> set[str]:
    w = text.lower().split()
    return {" ".join(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb)


def doc(rng: random.Random, n: int = 300) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edit(rng: random.Random, text: str, changes: int) -> str:
    w = text.split()
    for _ in range(changes):
        w[rng.randrange(len(w))] = rng.choice(WORDS)
    return " ".join(w)


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.5, 128), (0.9, 256), (0.7, 64)])
def test_bands_are_datasketchs_choice(threshold, num_perm):
    """An independent implementation of the same optimisation picks the same (bands, rows)."""
    from datasketch.lsh import _optimal_param

    assert bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_signature_estimates_jaccard():
    rng = random.Random(0)
    cfg = DedupConfig()
    errors = []
    for _ in range(20):
        a = doc(rng)
        b = edit(rng, a, rng.randint(0, 60))
        est = float(np.mean(signature(a, cfg) == signature(b, cfg)))
        errors.append(abs(est - jaccard(a, b)))
    assert max(errors) < 0.12 and np.mean(errors) < 0.05


def _records(texts: list[str], seqs: list[int], cfg: DedupConfig):
    import hashlib

    out = []
    for t, s in zip(texts, seqs):
        rec = np.zeros(1, dtype=record_dtype(cfg))[0]
        rec["seq"], rec["sha1"] = s, hashlib.sha1(t.encode()).digest()
        rec["sig"] = signature(t, cfg)
        out.append(rec)
    return out


def shares_band(a, b, cfg: DedupConfig) -> bool:
    n, r = bands(cfg.threshold, cfg.num_perm)
    return any(list(a[i * r:(i + 1) * r]) == list(b[i * r:(i + 1) * r]) for i in range(n))


def slow_rule(texts: list[str], seqs: list[int], cfg: DedupConfig) -> dict[int, str]:
    """The rule, pair by pair in collection order: the same text as any earlier document, or a
    shared band and an estimated Jaccard of at least the threshold with an earlier kept one."""
    order = sorted(range(len(texts)), key=lambda i: seqs[i])
    kept, seen, dropped = [], set(), {}
    for i in order:
        if texts[i] in seen:
            dropped[i] = "exact_duplicate"
            continue
        seen.add(texts[i])
        si = signature(texts[i], cfg)
        if any(np.mean(si == signature(texts[j], cfg)) >= cfg.threshold and shares_band(si, signature(texts[j], cfg), cfg)
               for j in kept):
            dropped[i] = "near_duplicate"
            continue
        kept.append(i)
    return dropped


def test_resolve_keeps_the_earliest_copy_and_confirms_candidates():
    rng = random.Random(1)
    cfg = DedupConfig()
    a = doc(rng)
    near = edit(rng, a, 2)  # Jaccard ~0.97
    chain = edit(rng, near, 12)  # near `near`, further from `a`
    far = edit(rng, a, 150)  # a band match is possible, the whole signature says no
    texts = [near, a, a, chain, far]
    seqs = [5, 1, 9, 7, 3]  # `a` (seq 1) is the earliest: it stays although listed second
    got = dict(resolve(_records(texts, seqs, cfg), list(range(len(texts))), cfg.threshold,
                           *bands(cfg.threshold, cfg.num_perm)))
    assert got == slow_rule(texts, seqs, cfg)
    assert got[0] == "near_duplicate" and got[2] == "exact_duplicate" and 1 not in got and 4 not in got


def test_resolve_matches_the_slow_rule_on_random_clusters():
    cfg = DedupConfig()
    for seed in range(6):
        rng = random.Random(seed)
        roots = [doc(rng, 120) for _ in range(3)]
        texts = [edit(rng, rng.choice(roots), rng.choice([0, 1, 3, 8, 25])) for _ in range(12)]
        seqs = rng.sample(range(100), len(texts))
        got = dict(resolve(_records(texts, seqs, cfg), list(range(len(texts))), cfg.threshold,
                           *bands(cfg.threshold, cfg.num_perm)))
        assert got == slow_rule(texts, seqs, cfg), seed


def _corpus(folder: Path, rng: random.Random) -> dict[str, str]:
    """JSONL files with planted copies; returns url → the url of the earlier document it copies."""
    folder.mkdir(parents=True, exist_ok=True)
    planted, texts = {}, []
    for f in range(3):
        with open(folder / f"f{f}.jsonl", "w") as out:
            for i in range(40):
                url = f"https://x.test/{f}/{i}"
                if texts and i % 7 == 3:
                    src_url, src = rng.choice(texts)
                    text = src if i % 2 else edit(rng, src, 1)
                    assert jaccard(src, text) >= 0.9
                    planted[url] = src_url
                else:
                    text = doc(rng, rng.randint(150, 250))
                    texts.append((url, text))
                out.write(json.dumps({"url": url, "text": text}) + "\n")
    return planted


def _urls(corpus: Path) -> list[str]:
    return [u for p in sorted(corpus.glob("part-*.parquet")) for u in pq.read_table(p).column("url").to_pylist()]


def test_the_stage_drops_the_planted_copies_and_the_bytes_do_not_depend_on_workers(tmp_path):
    """Four steps on the local executor: every planted copy dropped (it comes later in collection
    order), nothing else; the same parts with 1 and 2 workers, and with a rerun that resumes."""
    from palm.data.scrape import ScrapeConfig, scrape

    planted = _corpus(tmp_path / "src", random.Random(3))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        (out / "raw").mkdir(parents=True)
        (out / "corpus").mkdir()
        cfg = ScrapeConfig(source="files", files_path=str(tmp_path / "src"), tasks=3, workers=workers)
        stats = scrape(cfg, out / "raw", out / "corpus", work=out / "work", progress=False)
        outs.append(out / "corpus")
    urls = _urls(outs[0])
    assert not set(urls) & set(planted) and len(urls) == 120 - len(planted)
    assert stats["dropped"]["exact_duplicate"] + stats["dropped"]["near_duplicate"] == len(planted)
    for p in sorted(outs[0].glob("part-*.parquet")):
        assert p.read_bytes() == (outs[1] / p.name).read_bytes()
    assert not (tmp_path / "w1" / "work").exists()  # removed on success
