"""Checkpoints: megatron ``dist_checkpointing`` for training state, safetensors for export.

A training checkpoint is ``<root>/step_<NNNNNNN>/``: megatron's sharded files (model and
optimizer, keyed by global parameter name, so they load at any TP/PP layout) plus common state
(scheduler, step, RNG), with ``palm.json`` beside them (model config, tokenizer sha256, step).
Extra small files (the loop keeps ``curve.csv`` there, so any resume can rebuild the reports) sit
beside them. It is written to a temporary folder, every file flushed to disk (fsync), then renamed;
``<root>/latest`` names the newest. Resuming walks :func:`candidates` newest first, so an
unreadable newest checkpoint falls back to the previous one. The export is ``model.safetensors``
(full, unsharded weights) + ``config.json``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint
from torch.distributed.checkpoint.api import CheckpointException

from palm.core.config import to_dict
from palm.core.errors import UserError
from palm.model.megatron_compat import cpu_compat

META = "palm.json"
_TP_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def model_sharded_state_dict(chunks: list[torch.nn.Module], prefix: str = "") -> dict[str, Any]:
    """Sharded state of this rank's chunks, keyed by global parameter name (after ``prefix``, which
    tells apart several models saved in one checkpoint, e.g. PPO's ``critic.``).

    TP layers shard along their partition dim; other parameters (LoRA's adapters) by their own TP
    attributes (``tensor_model_parallel``, ``partition_dim``), else replicated. The last stage's
    copy of the tied embedding is stored under the embedding's key as a replica (never written,
    loaded from the embedding), as megatron's GPTModel does.
    """
    metadata = ensure_metadata_has_dp_cp_group(None)
    out: dict[str, Any] = {}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            full = f"{prefix}{name}." if name else prefix
            if isinstance(module, _TP_LAYERS):  # its own tensors: a child (an adapter) is visited itself
                out.update({k: v for k, v in module.sharded_state_dict(prefix=full, metadata=metadata).items()
                            if "." not in k[len(full):]})
            else:
                own = {k: v for k, v in module.state_dict(keep_vars=True).items() if "." not in k}
                split = {k: v.partition_dim for k, v in own.items() if getattr(v, "tensor_model_parallel", False)}
                out.update(make_sharded_tensors_for_checkpoint(
                    own, full, split, (), dp_cp_group=metadata["dp_cp_group"],
                    tp_group=parallel_state.get_tensor_model_parallel_group()))
    if f"{prefix}output_embedding.weight" in out:
        out[f"{prefix}output_embedding.weight"] = make_tp_sharded_tensor_for_checkpoint(
            tensor=out[f"{prefix}output_embedding.weight"].data, key=f"{prefix}embedding.weight",
            replica_id=(1, 0, parallel_state.get_data_parallel_rank()), allow_shape_mismatch=True)
    return out


def _training_state(engine: Any, prefix: str = "", loading: bool = False) -> dict[str, Any]:
    """An engine's model and optimizer (sharded) and its scheduler, for one checkpoint."""
    model_sd = model_sharded_state_dict(engine.chunks, prefix)
    return {"model": model_sd, "optimizer": engine.optimizer.sharded_state_dict(model_sd, is_loading=loading),
            "scheduler": engine.scheduler.state_dict()}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine: Any, root: Path, *, step: int, meta: dict[str, Any],
         files: dict[str, str] | None = None, keep: int = 2, others: dict[str, Any] | None = None) -> Path:
    """Write this step's checkpoint of ``engine`` (all ranks call it; rank 0 writes ``meta`` and
    ``files``, name -> text); returns its folder. Only the ``keep`` newest checkpoints are kept.
    ``others`` (name -> engine) go into the same checkpoint under ``name`` (their parameters keyed
    ``<name>.…``), e.g. PPO's critic beside its actor; ``engine`` alone loads as usual (export).
    An engine with LoRA adapters records their config in ``meta["lora"]`` (the export merges them)."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    state = {**_training_state(engine), "step": engine.step, "rng": _rng_state()}  # meta holds the loop's step
    for name, other in (others or {}).items():
        state[name] = {**_training_state(other, f"{name}."), "step": other.step}
    _in_process_results_queue()
    with cpu_compat():
        dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if rank0:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        adapters = {"lora": to_dict(engine.lora)} if getattr(engine, "lora", None) is not None else {}
        (tmp / META).write_text(json.dumps({**meta, **adapters, "step": step}, indent=2, sort_keys=True))
        _fsync_tree(tmp)  # complete on disk before it is named complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        with latest_tmp.open("w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        for old in sorted(root.glob("step_*"))[:-keep]:  # names sort by step (zero-padded)
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def _in_process_results_queue() -> None:
    """megatron's torch_dist writer hands its write results back through a queue that it makes, on
    first use, with a *spawned* ``multiprocessing.Manager``: a fresh Python process that imports
    torch to unpickle the results (seconds of every training process's first save; numbers:
    benchmarks/records/code-notes-2026-12-06.md#results-queue) and that outlives a SIGKILLed
    worker. That queue is for async saves, whose writes finish in another process. Ours are
    synchronous (``dist_checkpointing.save``): the writer's forked write processes report to it
    through their own queue, and this process puts the gathered results into the results queue and
    reads them back itself, so a plain in-process queue does the same."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb+") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        _fsync_dir(d)


def candidates(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, the one ``latest`` names first, then the others newest
    first (what a resume tries, in order)."""
    root = Path(root)
    pointer = root / "latest"
    first = [root / pointer.read_text().strip()] if pointer.is_file() else []
    rest = sorted((p for p in root.glob("step_*") if p not in first), reverse=True)
    return first + rest


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None (a corrupt pointer is an error)."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    check_checkpoint(path)
    return path


def check_checkpoint(path: Path) -> dict[str, Any]:
    """``palm.json`` of a checkpoint folder, after checking the folder looks complete."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: corrupt checkpoint ({META} unreadable: {type(err).__name__}); "
                        "delete it or point to another checkpoint")
    if not (path / "metadata.json").is_file() or not any(path.glob("*.distcp")):
        raise UserError(f"{path}: corrupt checkpoint (megatron metadata.json or .distcp shards "
                        "missing); delete it or point to another checkpoint")
    return meta


def _load(state: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        with cpu_compat():
            return dist_checkpointing.load(state, str(path))
    except UserError:
        raise
    # torch's CheckpointException (e.g. a torn shard) derives from BaseException, not Exception
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - a failure to read it means the folder is bad
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UserError(f"{path}: corrupt or incompatible checkpoint ({type(err).__name__}: {msg})")


def load(engine: Any, path: Path, others: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG of ``engine`` (and of the ``others`` saved
    with it, see :func:`save`) from ``path`` (any layout)."""
    meta = check_checkpoint(path)
    request = _training_state(engine, loading=True)
    for name, other in (others or {}).items():
        request[name] = _training_state(other, f"{name}.", loading=True)
    state = _load(request, path)
    for name, e in (("", engine), *(others or {}).items()):
        part = state[name] if name else state
        _load_chunks(e.chunks, part["model"], f"{name}." if name else "")
        e.optimizer.load_state_dict(part["optimizer"])
        e.scheduler.load_state_dict(part["scheduler"])
        e.step = int(part["step"])
    _set_rng_state(state["rng"])
    return meta


def load_model(chunks: list[torch.nn.Module], path: Path) -> dict[str, Any]:
    """Load only the weights of a checkpoint into ``chunks`` (any TP/PP layout)."""
    meta = check_checkpoint(path)
    state = _load({"model": model_sharded_state_dict(chunks)}, path)
    _load_chunks(chunks, state["model"])
    return meta


def _load_chunks(chunks: list[torch.nn.Module], loaded: dict[str, torch.Tensor], prefix: str = "") -> None:
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.copy_(loaded[prefix + name])
