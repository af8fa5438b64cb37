"""Throughput, MFU, the training dtype, and the loss curve file.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s, where
model FLOPs per token are 6 x (weights used per token) + attention (``ModelConfig.
flops_per_token``) and the peak is *measured* here: the best of a few large matmuls in the
training dtype with all threads, since CPUs rarely reach a datasheet number. The measurement is
bounded in time (about a second), whatever the machine.

``dtype: auto`` picks bf16 only where the hardware runs it natively: CUDA with bf16 support, or a
CPU on which a short probe shows bf16 matmul at least as fast as fp32. CPUs without AVX512_BF16 /
AMX (AVX2 only: e.g. many AMD server CPUs, most hosted CI runners, many laptops) run torch's
bf16 matmul on a slow path, dozens of times slower than fp32; there ``auto`` means fp32 (numbers:
benchmarks/records/code-notes-2026-12-06.md#metrics).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Iterable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    a @ b
    if a.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5,
                      threads: int | None = None, device: str | torch.device = "cpu",
                      budget_s: float = 1.0) -> float:
    """FLOP/s of the best of up to ``repeats`` ``n x n x n`` matmuls (2 n^3 FLOPs each).

    Bounded: the size starts small and doubles up to ``n`` only while one matmul takes under a
    tenth of ``budget_s``; repeats stop once ``budget_s`` is spent (so a slow bf16 path costs about
    ``budget_s``, not minutes)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        size, spent = 256, 0.0
        while True:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            took = _matmul_seconds(a, b)  # also the warm-up of this size
            spent += took
            if size >= n or took > budget_s / 10 or spent > budget_s / 2:
                break
            size *= 2
        best = took
        for _ in range(repeats):
            if spent > budget_s:
                break
            took = _matmul_seconds(a, b)
            spent += took
            best = min(best, took)
        return 2.0 * size**3 / best
    finally:
        torch.set_num_threads(saved)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The training dtype for ``name`` (``auto``, ``bf16`` or ``fp32``) on this machine."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if bf16_is_fast() else torch.float32


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):  # x86, ARM
            return set(line.split(":", 1)[1].split())
    return None


X86_BF16 = {"avx512_bf16", "amx_bf16"}  # x86 instructions that run bf16 matmul natively


def bf16_is_fast(n: int = 256, repeats: int = 3) -> bool:
    """Whether bf16 matmul is at least as fast as fp32 on this CPU. A bounded probe: a 256^3
    matmul, so even on the slow path the whole probe stays around 0.1 s.

    It times one thread (the kernels' speed, not how a loaded machine schedules threads: with two
    threads a descheduled one stalls the other, and under load fp32 once lost to bf16 on an
    AVX2-only CPU), fp32 best of more repeats (each is short), and on x86 it only says yes where
    the CPU has a native bf16 instruction set (``X86_BF16``). Numbers:
    benchmarks/records/code-notes-2026-12-06.md#bf16-is-fast.
    """
    flags = cpu_flags()
    if flags is not None and "sse2" in flags and not flags & X86_BF16:
        return False  # x86 without native bf16: the probe can only be fooled, never right

    def best(dtype: torch.dtype, times: int) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # kernel selection / JIT, untimed
        return min(_matmul_seconds(a, b) for _ in range(times))

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best(torch.bfloat16, repeats) <= best(torch.float32, 4 * repeats)
    finally:
        torch.set_num_threads(saved)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


class Curve:
    """``curve.csv``: one row per log interval (rank 0 writes it). A resumed run starts from the
    rows its checkpoint kept, so the file reads as one run, also when DVC deleted it."""

    def __init__(self, path: Path, columns: Iterable[str], rows: Iterable[dict[str, Any]] = ()):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: _fmt(row.get(k)) for k in self.columns})

    def text(self) -> str:
        return self.path.read_text()


def read_curve(text: str) -> list[dict[str, str]]:
    """Rows of a ``curve.csv`` text (as strings, the way the file holds them)."""
    return list(csv.DictReader(io.StringIO(text)))


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
