"""Deduplication: exact (SHA-1 of the normalised text) and near-duplicate (MinHash LSH over word
shingles, Broder 1997). Signatures are computed per document in the workers; the LSH index is
the one global step of the scrape stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from datasketch import MinHash, MinHashLSH

from palm.core.config import check

SCHEME = "affine32"  # datasketch's hashing scheme; signatures are comparable only within one


@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate removal settings."""

    threshold: float = 0.8  # estimated Jaccard similarity above which a later document is dropped
    num_perm: int = 128  # MinHash permutations (signature length)
    shingle_words: int = 5  # words per shingle
    seed: int = 1  # MinHash seed (signatures are only comparable with the same seed)

    def __post_init__(self) -> None:
        check(0.0 < self.threshold <= 1.0, "threshold", "must be in (0, 1]")
        check(16 <= self.num_perm <= 1024, "num_perm", "must be between 16 and 1024")
        check(self.shingle_words >= 1, "shingle_words", "must be >= 1")


def signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """MinHash signature (uint64[num_perm]) of the word shingles of ``text``."""
    words = text.lower().split()
    k = cfg.shingle_words
    shingles = {" ".join(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}
    mh = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
    mh.update_batch([s.encode("utf-8") for s in shingles])
    return mh.hashvalues.astype(np.uint64)


def duplicates(items: Iterable[tuple[str, np.ndarray]], cfg: DedupConfig) -> tuple[list[str | None], int, int]:
    """For ``(sha1, signature)`` pairs in corpus order, the reason each is dropped (None = kept):
    ``"exact_duplicate"`` when an earlier document has the same SHA-1, ``"near_duplicate"`` when
    an earlier kept document's estimated Jaccard similarity is at least the threshold.
    Returns ``(reasons, n_exact, n_near)``."""
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    kept: dict[str, MinHash] = {}
    seen: set[str] = set()
    reasons: list[str | None] = []
    n_exact = n_near = 0
    for i, (sha1, sig) in enumerate(items):
        if sha1 in seen:
            reasons.append("exact_duplicate")
            n_exact += 1
            continue
        seen.add(sha1)
        mh = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashvalues=np.asarray(sig, dtype=np.uint64),
                     scheme=SCHEME)
        # LSH banding proposes candidates; confirm each with the signature's Jaccard estimate.
        if any(mh.jaccard(kept[key]) >= cfg.threshold for key in lsh.query(mh)):
            reasons.append("near_duplicate")
            n_near += 1
            continue
        lsh.insert(str(i), mh)
        kept[str(i)] = mh
        reasons.append(None)
    return reasons, n_exact, n_near
