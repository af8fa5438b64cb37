"""Pretraining data: the ``tokenize`` stage's shards through megatron-core's ``GPTDataset``.

``data/tokens/{train,valid}.{bin,idx}`` are megatron indexed datasets; ``meta.json`` beside them
names the tokenizer (sha256) they were made with. :func:`check_shards` refuses missing shards and
shards made by another tokenizer; :func:`build_datasets` builds shuffled fixed-length samples
(``seq_len + 1`` tokens each, documents concatenated across EOD) with
``BlendedMegatronDatasetBuilder``. :class:`Batches` turns sample indices into micro-batches: step
``t`` of DP rank ``r`` reads global samples ``[t*G + r*m*b, t*G + (r+1)*m*b)`` with
``G = dp*m*b``, so the data position of a resumed run is just its step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from palm.core.errors import UserError
from palm.data.tokenize import META, read_meta

SPLITS = ("train", "valid")


class TokenizerInfo:
    """What ``GPTDataset`` asks of a tokenizer: vocabulary size, EOD id and a cache identity."""

    def __init__(self, vocab_size: int, eod: int, sha256: str):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1  # pretraining samples are never padded
        self.unique_identifiers = {"class": "palm-tokenizer", "sha256": sha256}


def check_shards(tokens_dir: Path, tokenizer_sha256: str | None = None) -> dict[str, Any]:
    """``meta.json`` of the shards, after checking they exist and match the tokenizer."""
    tokens_dir = Path(tokens_dir)
    meta = read_meta(tokens_dir)
    missing = [k for k in ("tokenizer_sha256", "vocab_size", "eod_id") if k not in meta]
    if missing:
        raise UserError(f"{tokens_dir / META}: missing {', '.join(missing)}; rerun the tokenize stage")
    for split in SPLITS:
        for ext in ("bin", "idx"):
            path = tokens_dir / f"{split}.{ext}"
            if not path.is_file() or path.stat().st_size == 0:
                raise UserError(f"{path}: token shard missing or empty; run the tokenize stage "
                                "(dvc repro tokenize)")
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise UserError(
            f"{tokens_dir}: token shards were made by tokenizer sha256 "
            f"{meta['tokenizer_sha256'][:12]}… but the tokenizer given has {tokenizer_sha256[:12]}…; "
            "re-tokenize with this tokenizer (dvc repro tokenize)")
    return meta


def build_datasets(tokens_dir: Path, meta: dict[str, Any], *, seq_len: int, train_samples: int,
                   valid_samples: int, seed: int, cache_dir: Path) -> tuple[Any, Any]:
    """Train and valid ``GPTDataset`` of ``seq_len``-token samples (megatron's builder)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokens_dir = Path(tokens_dir)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len,
        blend_per_split=[([str(tokens_dir / s)], None) for s in SPLITS] + [None],
        tokenizer=TokenizerInfo(meta["vocab_size"], meta["eod_id"], meta["tokenizer_sha256"]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=str(cache_dir), mmap_bin_files=True)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    except (AssertionError, ValueError, OSError, IndexError) as err:
        raise UserError(f"{tokens_dir}: cannot read the token shards ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                        "rerun the tokenize stage")
    return train, valid


class Batches:
    """Micro-batches of one DP rank for a given optimizer step (deterministic in the step)."""

    def __init__(self, dataset: Any, *, micro_batch_size: int, num_microbatches: int,
                 dp_rank: int, dp_size: int):
        self.dataset, self.b, self.m = dataset, micro_batch_size, num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def global_batch(self) -> int:
        return self.dp_size * self.m * self.b

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """``{"tokens", "labels", "loss_mask"}`` micro-batches, each ``[b, s]``."""
        start = step * self.global_batch + self.dp_rank * self.m * self.b
        out = []
        for j in range(self.m):
            samples = [self.dataset[(start + j * self.b + i) % len(self.dataset)] for i in range(self.b)]
            out.append({key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels")}
                       | {"loss_mask": torch.stack([s["loss_mask"] for s in samples]).float()})
        return out


def unigram_loss(tokens_dir: Path, meta: dict[str, Any]) -> float:
    """Cross entropy (nats/token) of the valid split under the train split's unigram
    distribution (add-one smoothed): the baseline a language model has to beat."""
    vocab = int(meta["vocab_size"])

    def counts(split: str) -> np.ndarray:  # a .bin shard is the documents' tokens back to back
        tokens = np.memmap(Path(tokens_dir) / f"{split}.bin", dtype=np.dtype(meta.get("dtype", "uint16")), mode="r")
        return np.bincount(tokens, minlength=vocab)[:vocab].astype(np.float64)

    train, valid = counts("train"), counts("valid")
    p = (train + 1.0) / (train.sum() + vocab)
    return float(-(valid * np.log(p)).sum() / max(valid.sum(), 1.0))
