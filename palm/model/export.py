"""Exported models (``models/<stage>/``): find one, check it, load it in this process.

An export is a folder of three files, written by every training stage the same way:

* ``model.safetensors``: the full (TP=1, PP=1) weights;
* ``config.json``: the architecture (``model``), the sha256 of the tokenizer it was trained with
  (``tokenizer_sha256``), and ``kind``: ``sft``, ``reward``, ``ppo`` or ``dpo`` (the pretrain export has
  none); a reward export also holds ``reward: {mean, std}``, the scale of its scores;
* ``tokenizer.json``: that tokenizer.

:func:`read_export` checks a folder (present, complete, readable, its tokenizer the one the
weights were trained with) and refuses anything else with one :class:`~palm.core.errors.UserError`
line; :func:`load_model` builds the model (``PaLM``, or ``RewardModel`` for a reward export) in
the process groups of :func:`palm.model.parallel.process_groups` (or of a
:class:`palm.model.parallel.GroupHold`). :func:`resolve` turns a model reference into a
folder: a path, or a registry URI (``models:/palm-chat@champion``) downloaded to a cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

from palm.core.config import from_dict
from palm.core.errors import UserError

# torch, megatron and the model are imported where a model is built, so that checking a folder
# (and refusing a bad one) answers at once, e.g. `palm chat wrong/path`

FILES = ("config.json", "model.safetensors", "tokenizer.json")
KINDS = ("pretrain", "sft", "reward", "ppo", "dpo")


@dataclasses.dataclass(frozen=True)
class Export:
    """A checked export folder (nothing loaded yet but its config)."""

    path: Path
    kind: str  # one of KINDS ("pretrain" when config.json names none)
    model: "ModelConfig"
    config: dict[str, Any]  # the whole config.json
    tokenizer_sha256: str

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def is_reward(self) -> bool:
        return self.kind == "reward"


def resolve(ref: str | Path) -> Path:
    """The folder a model reference names: a path (relative to the working directory), or a
    registry URI ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (e.g.
    ``models:/palm-chat@champion``), downloaded once into a cache folder
    (:func:`palm.ops.registry.resolve`; the registry: ``MLFLOW_TRACKING_URI``, default the project's
    ``mlflow.db``)."""
    from palm.ops import registry

    if registry.is_uri(ref):
        return registry.resolve(str(ref))
    return Path(ref).expanduser()


def read_export(ref: str | Path, kinds: Iterable[str] | None = None) -> Export:
    """Check the export ``ref`` names; ``kinds``: the kinds accepted (default: any)."""
    from palm.core.tokenizer import sha256_file

    path = resolve(ref)
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder (an export: {', '.join(FILES)})")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path}: not a complete model export: {', '.join(missing)} missing "
                        f"(an export holds {', '.join(FILES)})")
    try:
        config = json.loads((path / "config.json").read_text())
        sha = config["tokenizer_sha256"]
        if not isinstance(sha, str) or not isinstance(config["model"], dict):
            raise TypeError("tokenizer_sha256 is not a string or model not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}/config.json: not a palm model export ({type(err).__name__}: {err})") from None
    actual = sha256_file(path / "tokenizer.json")
    if actual != sha:
        raise UserError(f"{path}/tokenizer.json: sha256 {actual[:12]}… is not the tokenizer the model was "
                        f"trained with ({sha[:12]}… in config.json); export the model again with its own tokenizer")
    kind = config.get("kind", "pretrain")
    if kind not in KINDS:
        raise UserError(f"{path}/config.json: unknown model kind {kind!r} (one of {', '.join(KINDS)})")
    kinds = tuple(kinds) if kinds is not None else KINDS
    if kind not in kinds:
        raise UserError(f"{path}: a {kind} model, expected {' or '.join(kinds)}")
    if kind == "reward":
        stats = config.get("reward")
        if not (isinstance(stats, dict) and isinstance(stats.get("mean"), (int, float))
                and isinstance(stats.get("std"), (int, float)) and stats["std"] > 0):
            raise UserError(f"{path}/config.json: a reward export without its reward scale (reward: mean, std > 0); "
                            "rerun the reward stage (dvc repro reward)")
    from palm.model.network import ModelConfig  # (torch and megatron: only for a folder that passed the checks)

    try:
        model = from_dict(ModelConfig, config["model"], "model")
    except UserError as err:
        raise UserError(f"{path}/config.json: not a palm model export ({err})") from None
    return Export(path=path, kind=kind, model=model, config=config, tokenizer_sha256=sha)


def same_tokenizer(exports: Iterable[Export]) -> None:
    """Refuse models trained with different tokenizers (their token ids mean different things)."""
    exports = list(exports)
    first = exports[0]
    for other in exports[1:]:
        if other.tokenizer_sha256 != first.tokenizer_sha256:
            raise UserError(f"{other.path} was trained with tokenizer sha256 {other.tokenizer_sha256[:12]}… but "
                            f"{first.path} with {first.tokenizer_sha256[:12]}…; the models must share one tokenizer "
                            "(rerun the stages from the same tokenizer)")


def load_tokenizer(export: Export):
    """The export's own tokenizer (its sha256 already checked by :func:`read_export`)."""
    from palm.core.tokenizer import load_tokenizer as load

    return load(export.tokenizer_path)


def load_model(export: Export, dtype: "torch.dtype | None" = None) -> "PaLM":
    """The whole model of ``export`` in eval mode on this process's device (inside
    :func:`palm.model.parallel.process_groups`, or while a :class:`palm.model.parallel.GroupHold` is
    held): a ``PaLM``, or a ``RewardModel`` (scalar per position) for a reward export."""
    import torch
    from safetensors import SafetensorError

    from palm.model import parallel
    from palm.model.megatron_compat import device
    from palm.model.network import PaLM
    from palm.model.weights import load_safetensors

    dtype = dtype or torch.float32
    if export.is_reward:
        from palm.model.reward import RewardModel as chunk
    else:
        chunk = PaLM
    model = chunk(export.model, parallel.megatron_config(export.model, dtype=dtype))
    try:
        load_safetensors(model, export.path / "model.safetensors")
    except (OSError, SafetensorError) as err:
        raise UserError(f"{export.path}/model.safetensors: unreadable ({type(err).__name__}: {err}); "
                        "export the model again") from None
    return model.to(device()).eval()
