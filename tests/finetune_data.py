"""Inputs of the fine-tuning tests (SFT, reward): chat data made by the real data stages' library
from the pydoc-like test corpus and a tiny tokenizer, and a parent "export" of a tiny randomly
initialised PaLM in the exact format the pretrain stage writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from test_chat import make_tokenizer, pydoc_corpus

from palm.core.config import to_dict
from palm.core.tokenizer import sha256_file
from palm.data.chat import ChatDataConfig, build_chat_data
from palm.model.network import ModelConfig

MODEL = ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=2, head_dim=16, seq_len=128)


def chat_data(root: Path, *, seq_len: int = 128, path: str = "default", valid_fraction: float = 0.3) -> dict:
    """``root/{corpus,tokenizer,sft,prefs}``; returns the paths and the tokenizer's sha256."""
    corpus = pydoc_corpus(root / "corpus")
    tok = make_tokenizer(root / "tokenizer")
    out = {"corpus": corpus, "tokenizer": tok, "sha": sha256_file(tok / "tokenizer.json")}
    for kind in ("sft", "prefs"):
        folder = out[kind] = root / kind
        folder.mkdir(parents=True)
        build_chat_data(kind, ChatDataConfig(path=path, valid_fraction=valid_fraction, seed=5), corpus=corpus,
                        tokenizer=tok, seq_len=seq_len, out=folder)
    return out


def make_parent(out: Path, tokenizer: Path, model: ModelConfig = MODEL, seed: int = 11) -> Path:
    """A tiny PaLM export (model.safetensors, config.json, tokenizer.json) as pretrain writes it."""
    from palm.model import parallel
    from palm.model.network import PaLM
    from palm.model.weights import export_safetensors

    parallel.init_distributed()
    try:
        net = PaLM(model, seed=seed)
        export_safetensors(net, out, {"model": to_dict(model), "tokenizer_sha256": sha256_file(tokenizer / "tokenizer.json"),
                                      "step": 0, "format": "palm-rlhf/1"})
    finally:
        parallel.teardown()
    shutil.copy2(tokenizer / "tokenizer.json", out / "tokenizer.json")
    return out


def make_reward(out: Path, tokenizer: Path, model: ModelConfig = MODEL, seed: int = 13, mean: float = 0.0,
                std: float = 1.0) -> Path:
    """A tiny reward-model export (PaLM + scalar head, randomly initialised) as the reward stage
    writes it, with its reward mean and std in config.json."""
    from palm.model import parallel
    from palm.model.weights import export_safetensors
    from palm.model.reward import RewardModel

    parallel.init_distributed()
    try:
        net = RewardModel(model, seed=seed)
        export_safetensors(net, out, {"model": to_dict(model), "tokenizer_sha256": sha256_file(tokenizer / "tokenizer.json"),
                                      "step": 0, "format": "palm-rlhf/1", "kind": "reward",
                                      "reward": {"mean": mean, "std": std, "sequences": 0}})
    finally:
        parallel.teardown()
    shutil.copy2(tokenizer / "tokenizer.json", out / "tokenizer.json")
    return out
