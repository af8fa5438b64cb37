"""Exported weights: plain safetensors + ``config.json``, written from a whole model and loaded into
a model or one chunk of it at the current TP layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from megatron.core import parallel_state

from palm.core.errors import UserError


def export_safetensors(model: torch.nn.Module, out_dir: Path, config: dict[str, Any]) -> None:
    """Write a whole (TP=1, PP=1) model as ``model.safetensors`` + ``config.json``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().float().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_safetensors(model: torch.nn.Module, path: Path, new: Iterable[str] = ()) -> None:
    """Load exported full weights into a model or one chunk of it at the current TP layout.
    ``new`` names parameters the export need not hold (e.g. a reward head on a language model's
    export): absent, they keep their initial values, as LoRA adapters do (an export has none); any
    other absent weight is an error. Read one tensor at a time: the peak is the model and its
    largest tensor, not the model twice (a PPO worker loads four models)."""
    from safetensors import safe_open

    from palm.model.lora import is_adapter

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    new = set(new)
    with torch.no_grad(), safe_open(str(path), framework="pt") as full:
        keys = set(full.keys())
        for name, p in model.named_parameters():
            key = "embedding.weight" if name == "output_embedding.weight" else name
            if key not in keys and (key in new or is_adapter(key)):
                continue
            if key not in keys:
                raise UserError(f"{path}: weight {key!r} missing; not a palm export of this model")
            t = full.get_tensor(key)
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                t = t.chunk(tp, dim=p.partition_dim)[rank]
            if t.shape != p.shape:
                raise UserError(f"{path}: weight {key!r} has shape {tuple(t.shape)}, the model "
                                f"expects {tuple(p.shape)} (different config.json?)")
            p.copy_(t)


def load_exported(model_dir: Path, *, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The whole model of an export (``model.safetensors`` + ``config.json``) at the current TP
    layout, and its config. Process groups must exist (``palm.model.parallel.init_distributed()``)."""
    from palm.core.config import from_dict
    from palm.model import parallel
    from palm.model.megatron_compat import device
    from palm.model.network import ModelConfig, PaLM

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
        cfg = from_dict(ModelConfig, config["model"], "model")
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{model_dir}: not a palm export (config.json: {type(err).__name__}: {err})")
    model = PaLM(cfg, parallel.megatron_config(cfg, dtype=dtype))
    load_safetensors(model, model_dir / "model.safetensors")
    return model.to(device()), config
