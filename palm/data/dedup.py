"""Deduplication on datatrove's MinHash stages: exact (SHA-1 of the normalised text) and near
duplicates (MinHash over word shingles, Broder 1997; LSH banding, Indyk & Motwani 1998).

    signature (tasks ranks)  ──► buckets (one rank per band)  ──► cluster (1 rank)  ──► filter (tasks ranks)
    datatrove stage 1, plus      datatrove stage 2: pairs of        candidates confirmed,    datatrove stage 4:
    one record per document      documents equal in a band          earliest copy kept       drops the .remove ids

The rule is the one the stage had on datasketch, with the same MinHash values and bands, so the
same corpus comes out: "a document is dropped when an earlier-collected document has the same
text, or an earlier kept one shares a band with it and has an estimated Jaccard similarity of at
least ``threshold``". Two things differ from datatrove's stage 3 for that:
- a band match is only a candidate; it is confirmed on the whole signature (datatrove drops on
  any band match, which costs precision below the threshold);
- within a cluster the earliest document in collection order (its ``seq``) is kept, not the root
  that union-by-size leaves.

Memory: stage 1 holds one document; stage 2 one signature per input file; the cluster step holds
the nodes of the duplicate pairs and one cluster's signatures at a time: it grows with the number
of duplicates, not of documents.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer
from datasketch import MinHash

from palm.core.config import check
from palm.data.steps import DROP


@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate removal settings."""

    threshold: float = 0.8  # estimated Jaccard similarity above which a later document is dropped
    num_perm: int = 128  # MinHash permutations (the bands use rows x bands of them, at most this)
    shingle_words: int = 5  # words per shingle
    seed: int = 1  # MinHash seed (signatures are only comparable with the same seed)

    def __post_init__(self) -> None:
        check(0.0 < self.threshold <= 1.0, "threshold", "must be in (0, 1]")
        check(16 <= self.num_perm <= 1024, "num_perm", "must be between 16 and 1024")
        check(self.shingle_words >= 1, "shingle_words", "must be >= 1")


def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` that minimise the equally weighted
    probabilities of missing a pair above ``threshold`` and of proposing one below it, the
    candidate probability being ``1 - (1 - s^rows)^bands`` (Leskovec et al., MMDS ch. 3.4)."""
    s_lo = np.linspace(0.0, threshold, 201)
    s_hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
            err = np.trapezoid(p(s_lo), s_lo) + np.trapezoid(1 - p(s_hi), s_hi)
            if err < best_err:
                best, best_err = (b, r), err
    return best


class WhitespaceWords(WordTokenizer):
    """The word tokenizer datatrove's stage 1 is given: its default for English (NLTK) is not
    installed and downloads a model; the shingles are :func:`signature`'s own anyway."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


SCHEME = "affine32"  # datasketch's hashing: the values the corpus was deduplicated with before datatrove


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    """datatrove's settings for the band files: ``bands`` bands of ``rows`` 32-bit values (the hash
    function named is never used: the values come from :meth:`DedupSignature.get_shingles`)."""
    b, r = bands(cfg.threshold, cfg.num_perm)
    return MinhashConfig(n_grams=cfg.shingle_words, num_buckets=b, hashes_per_bucket=r, seed=cfg.seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


def signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of the lower-cased word shingles of ``text``, as
    datasketch computes it."""
    words = text.lower().split()
    k = cfg.shingle_words
    shingles = {" ".join(words[i : i + k]) for i in range(max(1, len(words) - k + 1))}
    mh = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
    mh.update_batch([s.encode("utf-8") for s in shingles])
    return mh.hashvalues.astype(np.uint32)


def record_dtype(cfg: DedupConfig) -> np.dtype:
    """One fixed-size record per document, in rank order: the cluster step reads any of them by index."""
    return np.dtype([("seq", "<i8"), ("sha1", "S20"), ("sig", "<u4", (cfg.num_perm,))])


class DedupSignature(MinhashDedupSignature):
    """datatrove's stage 1 (sorted band files under ``<folder>/sigs``) plus ``<folder>/records``:
    each document's collection order, SHA-1 and whole signature, in rank order.

    The MinHash values are :func:`signature`'s (datasketch's, on the words as written): they come
    through ``get_shingles``, which datatrove's loop calls first, and ``get_signature`` cuts the
    first ``bands x rows`` of them into the bands, as datasketch's LSH does."""

    name = "🎯 MinHash signature + record"

    def __init__(self, folder: str, cfg: DedupConfig):
        super().__init__(output_folder=f"{folder}/sigs", config=minhash_config(cfg), language=WhitespaceWords())
        self.cfg = cfg
        self.records = Path(folder) / "records"
        self.dtype = record_dtype(cfg)
        self._last: np.ndarray | None = None

    def get_shingles(self, text: str) -> np.ndarray:
        return signature(text, self.cfg)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        self._last = shingles
        r = self.config.hashes_per_bucket
        return [shingles[i * r:(i + 1) * r].tolist() for i in range(self.config.num_buckets)]

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.records.mkdir(parents=True, exist_ok=True)
        path = self.records / f"{rank:05d}.rec"
        with open(path, "wb") as out:
            def tee(docs):
                # the parent computes a document's signature between our yield and our next resume
                pending = None
                for doc in docs:
                    if pending is not None:
                        self._record(out, pending)
                    pending = doc
                    yield doc
                if pending is not None:
                    self._record(out, pending)

            super().run(tee(data), rank, world_size)

    def _record(self, out, doc) -> None:
        rec = np.zeros(1, dtype=self.dtype)
        rec["seq"] = doc.metadata["seq"]
        rec["sha1"] = bytes.fromhex(doc.metadata["sha1"])
        rec["sig"] = self._last
        out.write(rec.tobytes())


class DedupCluster(PipelineStep):
    """Stage 3, one rank: candidate pairs from the band files → clusters (union-find) → in each
    cluster, in collection order, drop a document whose text an earlier one had
    (``exact_duplicate``) or whose estimated Jaccard similarity with an earlier kept one reaches
    the threshold (``near_duplicate``). Writes ``<folder>/remove/<rank:06d>.remove`` (sorted
    uint32 document indices, for datatrove's stage 4) for every one of ``tasks`` ranks, and
    a ``dropped_<reason>`` counter per drop."""

    type = "🫂 - DEDUP"
    name = "🎯 cluster, earliest copy kept"

    def __init__(self, folder: str, cfg: DedupConfig, tasks: int):
        super().__init__()
        self.folder, self.cfg, self.tasks = Path(folder), cfg, tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def find(x):
            root = x
            while parent.get(root, root) != root:
                root = parent[root]
            while x != root:  # path compression
                parent[x], x = root, parent[x]
            return root

        with self.track_time():
            for dups in sorted((self.folder / "buckets").glob("*.dups")):
                with open(dups, "rb") as f:
                    for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=1024):
                        a, b = find((f1, d1)), find((f2, d2))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
                            parent.setdefault(min(a, b), min(a, b))
            clusters: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
            for node in list(parent):
                clusters[find(node)].append(node)
            parent.clear()
            removed: dict[int, list[int]] = defaultdict(list)
            with _Records(self.folder / "records", record_dtype(self.cfg)) as records:
                b, r = bands(self.cfg.threshold, self.cfg.num_perm)
                for nodes in clusters.values():
                    for node, reason in resolve([records.read(*n) for n in nodes], nodes, self.cfg.threshold, b, r):
                        removed[node[0]].append(node[1])
                        self.stat_update(DROP + reason)  # counted with the filters' drops (step_counts)
            out = self.folder / "remove"
            out.mkdir(parents=True, exist_ok=True)
            for r in range(self.tasks):  # every rank gets a file: stage 4 warns about a missing one
                (out / f"{r:06d}.remove").write_bytes(np.asarray(sorted(removed.get(r, [])), dtype="<u4").tobytes())
        return iter(())


def resolve(records: list, nodes: list, threshold: float, n_bands: int, rows: int) -> list[tuple[object, str]]:
    """The documents of one cluster that are dropped, with the reason, by the rule of datasketch's
    LSH: in collection order (``seq``), a document is an ``exact_duplicate`` when an earlier one
    had its SHA-1, a ``near_duplicate`` when it shares a band with an earlier kept one whose
    whole-signature Jaccard estimate reaches ``threshold``."""
    order = sorted(range(len(nodes)), key=lambda i: int(records[i]["seq"]))
    seen: set[bytes] = set()
    kept: list[np.ndarray] = []
    dropped = []
    width = n_bands * rows
    for i in order:
        rec = records[i]
        sha1 = bytes(rec["sha1"])
        if sha1 in seen:
            dropped.append((nodes[i], "exact_duplicate"))
            continue
        seen.add(sha1)
        sig = rec["sig"]
        if kept:
            others = np.stack(kept)
            same = others == sig
            banded = same[:, :width].reshape(len(kept), n_bands, rows).all(axis=2).any(axis=1)
            if (banded & (same.mean(axis=1) >= threshold)).any():
                dropped.append((nodes[i], "near_duplicate"))
                continue
        kept.append(sig)
    return dropped


class _Records:
    """Random access to the per-rank record files (one open file per rank seen)."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder, self.dtype, self.files = folder, dtype, {}

    def read(self, rank: int, index: int):
        f = self.files.get(rank)
        if f is None:
            f = self.files[rank] = open(self.folder / f"{rank:05d}.rec", "rb")
        f.seek(index * self.dtype.itemsize)
        return np.frombuffer(f.read(self.dtype.itemsize), dtype=self.dtype)[0]

    def __enter__(self) -> "_Records":
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()


def unpack_removed(path: Path) -> list[int]:
    """The document indices a ``.remove`` file lists (tests and tools)."""
    data = Path(path).read_bytes()
    return list(struct.unpack(f"<{len(data) // 4}I", data))
