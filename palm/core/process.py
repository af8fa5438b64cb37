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
    sets it (e.g. a test suite running several files at once on 2 cores: two OpenMP pools of
    two threads each on 2 cores ran the e2e pretrain 2.5x slower than one process alone), else
    the cores shared out between the ``processes``."""
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
    takes a microcode path of ~100 cycles. Measured on the default pretrain (fp32, MKL, ATen and
    oneDNN held to AVX2 kernels, 2 cores): from step 40 on the stage fell from 3,900 to 2,900
    tokens/s and recovered only partly (3,006 and 3,345 tokens/s over the run, stage 211 and
    190 s); flushed, it held 3,700-4,000 (3,841 over the run, stage 166 s). A benchmark loop on
    random batches (``benchmarks/output_layer.py``) never makes such values, which is why the
    stage's step had been slower than the benchmark's. The values lost are 38 orders of
    magnitude below the weights. A no-op where the CPU has no such mode."""
    torch.set_flush_denormal(True)


MALLOC_KEEP_BYTES = 1 << 30  # keep_freed_memory: allocations below this come from the heap, reused


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS (glibc
    ``malloc``: blocks below ``MALLOC_KEEP_BYTES`` come from the heap rather than ``mmap``, and
    the heap is not trimmed). Returns whether the setting took (False off glibc: a no-op).

    Why: glibc serves a large block (from 128 KiB, or the size of the last such block freed)
    with a fresh ``mmap`` and unmaps it on free, so every out-of-place op on a big activation
    page-faults in and zeroes its whole output, 4 KiB at a time. Measured on 2 cores: ``exp`` of
    a ``[1024, 8192]`` fp32 tile 8.3-9.2 ms out of place against 0.7-0.8 ms in place, 1.5-2.6 ms
    out of place with this (PPO's entropy, the log-softmax, the fp32 copy of bf16 logit tiles are
    such ops). The default DAG from pretrain down (bf16, 2 cores with AMX, ``dvc repro -f``):
    242 -> 218 s, every stage 7-13 % faster (pretrain 74 -> 66 s, ppo 43 -> 39 s), its metrics
    identical. The allocators PyTorch's CPU tuning guide recommends (jemalloc, tcmalloc) keep
    freed memory too. The cost: a process's resident memory stays near its peak until it exits
    (GPU memory is not affected). Page faults per step in steady state (``ru_minflt``, 2 cores,
    gloo's groups up): the default pretrain step 1-2,051 with this against 1-40,292 without, a
    PPO iteration of ``benchmarks/ppo_throughput.py`` 4-5,636 against 15,333-28,360. Not
    understood: in a process with a gloo group, a lone 64 MiB block freed and made again is
    still placed afresh (the heap grows by it) 2 to 5 times in 8; never without the group,
    always by default. Calling this again after the group is made stops it for a bare gloo
    group, not after megatron's groups."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)
                and libc.mallopt(m_trim_threshold, 2 ** 31 - 1))  # (an int: the largest)
