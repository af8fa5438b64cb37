"""Throughput, MFU and the loss curve file.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s, where
model FLOPs per token are 6 x (weights used per token) + attention (``ModelConfig.
flops_per_token``) and the peak is *measured* here: the best of a few large matmuls in the
training dtype with all threads, since CPUs rarely reach a datasheet number.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch

CURVE_COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5,
                      threads: int | None = None, device: str | torch.device = "cpu") -> float:
    """FLOP/s of the best of ``repeats`` ``n x n x n`` matmuls (2 n^3 FLOPs each)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm up
        best = float("inf")
        for _ in range(repeats):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return 2.0 * n**3 / best
    finally:
        torch.set_num_threads(saved)


class Curve:
    """``curve.csv``: one row per log interval (rank 0 writes it). A resumed run keeps the rows up
    to its checkpoint's step and appends after them, so the file reads as one run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CURVE_COLUMNS).writerow(
                {k: _fmt(row.get(k)) for k in CURVE_COLUMNS})


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
