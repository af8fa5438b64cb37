"""What the training stages (pretrain, sft, reward, ppo) do around their launch, on the stage side:
resolve the dtype and measure the matmul peak, and export the final checkpoint."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from palm.core.io import atomic_dir
from palm.ops.stage import StageContext


def training_start(stage: str, cfg: Any, ctx: StageContext) -> tuple[str, float]:
    """The dtype ``cfg.dtype`` resolves to here (printed, and tagged on the MLflow run) and the
    measured matmul peak in that dtype (for MFU)."""
    from palm.model.megatron_compat import device
    from palm.train.metrics import dtype_name, matmul_peak_flops, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, device())
    peak = matmul_peak_flops(dtype, device=device())
    print(f"{stage}: dtype {dtype_name(dtype)} ({stage}.dtype: {cfg.dtype}); measured {dtype_name(dtype)} "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s", file=sys.stderr)
    ctx.tracker.set_tags({"dtype": dtype_name(dtype)})
    return dtype_name(dtype), peak


@contextlib.contextmanager
def exported(ctx: StageContext, result: dict[str, Any], tokenizer: Path, extra: dict[str, Any],
             chunk: Any = None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Export the final checkpoint of a training launch (``result["checkpoint"]``) into ``--out``
    with ``extra`` in its ``config.json`` and a copy of ``tokenizer``; the body may add files and
    rewrite the config (it gets the folder and the config). The folder appears only complete,
    after the body: nothing half-written is left if anything fails. Then ``curve.csv`` goes to
    the MLflow run (its rows went there as metrics while training: :meth:`Tracker.follow`).
    ``chunk``: the model class to load the checkpoint into (default ``PaLM``)."""
    from palm.model.network import PaLM
    from palm.train.loop import export

    with atomic_dir(ctx.path("out")) as out:
        config = export(Path(result["checkpoint"]), out, extra, chunk=chunk or PaLM)
        shutil.copy2(tokenizer, out / "tokenizer.json")
        yield out, config
    ctx.tracker.log_artifact(ctx.reports / "curve.csv")
