"""Tiny token shards for the pretrain tests: megatron ``IndexedDatasetBuilder`` + ``meta.json``.

The documents follow simple rules (counting runs in a small vocabulary), so a few training steps
already beat the unigram baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VOCAB, EOD = 64, 0
SHA = "ab" * 32  # the tokenizer sha256 the shards claim


def make_shards(out: Path, *, docs: int = 120, seed: int = 0, sha: str = SHA) -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", docs), ("valid", max(4, docs // 10))):
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=np.uint16)
        for _ in range(n):
            start, step = int(rng.integers(1, VOCAB)), int(rng.integers(1, 4))
            length = int(rng.integers(40, 120))
            ids = [1 + (start + i * step) % (VOCAB - 1) for i in range(length)] + [EOD]
            builder.add_document(torch.from_numpy(np.asarray(ids, dtype=np.uint16)), [len(ids)])
        builder.finalize(str(out / f"{split}.idx"))
    (out / "meta.json").write_text(json.dumps(
        {"tokenizer_sha256": sha, "vocab_size": VOCAB, "eod_id": EOD, "dtype": "uint16"}))
    return out
