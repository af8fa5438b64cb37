"""How a process runs on its machine: torch threads, subnormal floats, freed memory, and which
node of a multi-node stage it is. Training workers, decoding and evaluation all set these."""

from __future__ import annotations

import os

import torch

NODE_RANK_ENV = "PALM_NODE_RANK"


class OtherNodeDone(Exception):
    """A launch on node ``PALM_NODE_RANK > 0`` ended well: node 0 has the result."""


def is_other_node() -> bool:
    """Whether this process runs a stage on a node other than node 0 (it tracks and writes nothing)."""
    return os.environ.get(NODE_RANK_ENV, "0") not in ("", "0")


def default_threads(processes: int = 1) -> int:
    """Torch threads per process when a config says 0: ``OMP_NUM_THREADS`` where the environment
    sets it (e.g. a test suite running several files at once: two OpenMP pools spinning on the
    same cores slow each other down), else the cores shared out between the ``processes``
    (numbers: benchmarks/records/code-notes-2026-12-06.md#default-threads)."""
    try:
        forced = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        forced = 0
    return forced if forced >= 1 else max(1, (os.cpu_count() or 1) // processes)


def flush_denormals() -> None:
    """Compute with subnormal floats (below 2^-126 = 1.2e-38, fp32 and bf16 alike) as zero on
    this CPU (x86 FTZ/DAZ), in this thread and the threads it starts later (its OpenMP pool).

    Why: after a few dozen steps of real training, gradients, Adam's second moments and the
    far tails of softmaxes hold subnormal values, and every x86 floating-point operation on one
    takes a microcode path of ~100 cycles: without this the default pretrain slows down by about
    a quarter from step 40 on, which a benchmark loop on random batches
    (``benchmarks/output_layer.py``) never shows. The values lost are 38 orders of magnitude
    below the weights. A no-op where the CPU has no such mode (numbers:
    benchmarks/records/code-notes-2026-12-06.md#flush-denormals)."""
    torch.set_flush_denormal(True)


MALLOC_KEEP_BYTES = 1 << 30  # keep_freed_memory: allocations below this come from the heap, reused


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS (glibc
    ``malloc``: blocks below ``MALLOC_KEEP_BYTES`` come from the heap rather than ``mmap``, and
    the heap is not trimmed). Returns whether the setting took (False off glibc: a no-op).

    Why: glibc serves a large block (from 128 KiB, or the size of the last such block freed)
    with a fresh ``mmap`` and unmaps it on free, so every out-of-place op on a big activation
    page-faults in and zeroes its whole output, 4 KiB at a time (PPO's entropy, the log-softmax,
    the fp32 copy of bf16 logit tiles are such ops); with this every stage of the default DAG
    runs faster, its metrics identical. The allocators PyTorch's CPU tuning guide recommends
    (jemalloc, tcmalloc) keep freed memory too. The cost: a process's resident memory stays near
    its peak until it exits (GPU memory is not affected). Not understood: with a gloo group up, a
    freed block is sometimes still placed afresh (numbers and that observation:
    benchmarks/records/code-notes-2026-12-06.md#keep-freed-memory)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)
                and libc.mallopt(m_trim_threshold, 2 ** 31 - 1))  # (an int: the largest)
