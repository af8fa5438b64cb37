"""The parallel plan: the one place that says how PaLM is split over TP x PP x DP processes.

Tensor parallel (Megatron-LM, Shoeybi et al. 2019), per block:

=====================  =====================  ==============================================
weight                 kind                   why
=====================  =====================  ==============================================
embedding [V, d]       vocab-parallel rows    ``VocabParallelEmbedding``; the output layer is
                                              the same matrix, so logits are vocab-sharded
                                              and the loss is ``vocab_parallel_cross_entropy``
attn.q   [h*hd, d]     column-parallel        each rank owns ``h / tp`` query heads
attn.kv  [2*hd, d]     replicated             the single multi-query K/V head; its output
                                              goes through ``copy_to_tensor_model_parallel_
                                              region`` so its gradient is summed over TP
attn.out [d, h*hd]     row-parallel           all-reduce of the heads' contributions
mlp.gate, mlp.up       column-parallel        SwiGLU halves, split the same way
mlp.down               row-parallel           all-reduce
norm weights           replicated             inputs are full on every rank, so are grads
=====================  =====================  ==============================================

Pipeline parallel: ``n_layers`` blocks are cut into ``pp * virtual_stages`` equal chunks; chunk
``c`` of pipeline rank ``r`` holds blocks ``[(c*pp + r) * n, (c*pp + r + 1) * n)`` (megatron's
interleaved order). The first chunk holds the embedding, the last the final norm and the output
projection; when those are on different ranks the last one keeps a copy of the embedding marked
``.shared`` (so the gradient norm counts it once) whose gradient ``finalize_model_grads``
all-reduces with the original over the embedding group; both start from the same seed.

This module is the plan and the collectives the model needs; it imports nothing of the model.
Building this rank's chunks from the plan (:func:`chunk_layers`) and wrapping them in megatron
``DistributedDataParallel`` is the training engine's job (:mod:`palm.train.engine`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import math
import os
import socket
import threading
from typing import Any, Iterator

import numpy
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer import TransformerConfig

from palm.errors import UserError
from palm.megatron_compat import cpu_compat


# --- process groups ------------------------------------------------------------------------------

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


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                     virtual_stages: int = 1, timeout_s: int = 600) -> None:
    """Start torch.distributed (gloo on CPU, NCCL on GPU) and megatron's TP/PP/DP groups.

    Under ``torchrun`` the world comes from its environment; without it this is a one-process
    world. The world size must be ``tp * pp * dp``. Subnormal floats are flushed to zero from
    here on (:func:`flush_denormals`) and freed memory is reused (:func:`keep_freed_memory`):
    every process that trains, scores or decodes starts here.
    """
    flush_denormals()
    keep_freed_memory()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.distributed.init_process_group(
                backend, timeout=datetime.timedelta(seconds=timeout_s))
        else:
            torch.distributed.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                timeout=datetime.timedelta(seconds=timeout_s))
    world = torch.distributed.get_world_size()
    want = tensor_parallel * pipeline_parallel * data_parallel
    if world != want:
        raise UserError(
            f"world size {world} != tensor_parallel x pipeline_parallel x data_parallel = "
            f"{tensor_parallel} x {pipeline_parallel} x {data_parallel} = {want}")
    with cpu_compat():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1 else None)


def teardown() -> None:
    """Destroy megatron's groups and the default process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def process_groups(tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                   virtual_stages: int = 1, *, seed: int | None = None) -> Iterator[None]:
    """The body runs with the process groups of :func:`init_distributed` up; they are torn down
    after it, also when it raises. Groups that already exist (a caller made them: a torchrun
    worker, a test) are used as they are and left up. ``seed``: Python's, NumPy's and torch's
    global generators are seeded first (what every training worker starts with)."""
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    if parallel_state.model_parallel_is_initialized():
        yield
        return
    init_distributed(tensor_parallel, pipeline_parallel, data_parallel, virtual_stages)
    try:
        yield
    finally:
        teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_config(cfg: Any, *, tensor_parallel: int | None = None,
                    pipeline_parallel: int | None = None, virtual_stages: int = 1,
                    dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron's ``TransformerConfig`` for ``cfg`` (a ``ModelConfig``) at this TP/PP layout.

    ``dtype`` is the parameter dtype; bf16 params train with fp32 main weights in the optimizer.
    """
    tp = tensor_parallel or (parallel_state.get_tensor_model_parallel_world_size()
                             if parallel_state.model_parallel_is_initialized() else 1)
    pp = pipeline_parallel or (parallel_state.get_pipeline_model_parallel_world_size()
                               if parallel_state.model_parallel_is_initialized() else 1)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2.0 * cfg.n_layers)
    return TransformerConfig(
        num_layers=cfg.n_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
        kv_channels=cfg.head_dim, num_query_groups=1, ffn_hidden_size=cfg.ffn_dim,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1 else None,
        use_cpu_initialization=True, perform_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False, sequence_parallel=False,
        batch_p2p_comm=False,  # True gives wrong gradients with interleaved 1F1B (docs/megatron-cpu.md)
        # objectives return (loss summed over their tokens, token count): megatron divides the
        # gradients by the token count of the whole global batch (all micro-batches, all DP ranks)
        calculate_per_token_loss=True,
        init_method=lambda w: torch.nn.init.normal_(w, 0.0, std),
        output_layer_init_method=lambda w: torch.nn.init.normal_(w, 0.0, out_std),
    )


# --- the tensor-parallel layers (see the table above) --------------------------------------------

FEW_ROWS = 64  # plain_linear: from 2 up to this many rows, the weight-major GEMM (CPU)


def plain_linear(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` without autograd: ``[..., in]``, ``[out, in]`` -> ``[..., out]``.
    On CPU with a few rows (decoding a batch: one token per sequence) it is computed as
    ``(weight @ x^T)^T``: MKL streams the weights from memory faster that way round. Measured
    on a 2-core AVX2 CPU, generating 256 tokens for 16 prompts at the benchmark's size
    (interleaved A/B, 5 rounds): 1.1-1.2x the tokens/s of ``F.linear``, the same tokens; for one
    row (one prompt) no faster (0.95x, within noise), so one row keeps ``F.linear``.
    ``weight_t``: the weight's transpose ``[in, out]`` stored contiguous, for up to ``FEW_ROWS``
    rows, one included, the plain GEMM ``x @ weight_t`` instead (no transposed copy of the
    output; which is faster depends on the CPU's kernels: :meth:`palm.model.Decoder.plan`)."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda or rows > FEW_ROWS or (rows == 1 and weight_t is None):
        return torch.nn.functional.linear(x, weight)
    if weight_t is not None:
        return torch.mm(x.reshape(rows, -1), weight_t).view(*x.shape[:-1], -1)
    return torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], -1)


# How a decoding step multiplies its few rows by a weight on CPU (DecodePlan.layout):
#   weight      plain_linear from the weight itself (MKL)
#   transposed  plain_linear from a stored contiguous transpose (MKL)
#   packed      oneDNN's inner product from weights reordered once into its blocked layout
#               (mkldnn._reorder_linear_weight / _linear_pointwise: the ops PyTorch's compiler
#               uses for frozen linears); no packing of the weights at every call
#   openblas    numpy's BLAS (OpenBLAS in numpy's wheels) from a stored transpose, torch's own
#               ops on one thread meanwhile (decode_threads): two thread pools spinning on the
#               same cores ruin both (23 tok/s instead of 325 measured at batch 1)
LAYOUTS = ("weight", "transposed", "packed", "openblas")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How a decoding step multiplies a few rows by the weights: in which ``dtype`` (the
    model's, or fp32 from a copy of the weights) and which ``layout`` (:data:`LAYOUTS`)."""
    dtype: torch.dtype
    layout: str = "weight"

    def __post_init__(self) -> None:
        assert self.layout in LAYOUTS, self.layout
        assert self.layout != "openblas" or self.dtype == torch.float32, "numpy has no bf16 GEMM"


class DecodeWeight:
    """A weight ``[out, in]`` held in a plan's layout: ``self(x)`` is ``x @ weight.T`` without
    autograd, ``[..., in]`` -> ``[..., out]``, for any number of rows (the prompt pass too);
    ``rows``: the rows a step will bring (oneDNN's packing is chosen for it). On GPU: ``F.linear``.
    Raises ``RuntimeError`` where the CPU lacks the layout's kernels (oneDNN refuses bf16
    without AVX-512 or AVX-NE-CONVERT)."""

    def __init__(self, weight: torch.Tensor, layout: str, rows: int):
        self.weight, self.layout = weight, layout
        self.t = weight.t().contiguous() if layout in ("transposed", "openblas") and not weight.is_cuda else None
        self.packed = None
        if layout == "packed" and not weight.is_cuda:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.array = self.t.numpy() if layout == "openblas" and self.t is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if self.array is not None:
            rows = x.numel() // x.shape[-1]
            out = numpy.matmul(x.detach().reshape(rows, -1).numpy(), self.array)
            return torch.from_numpy(out).view(*x.shape[:-1], -1)
        return plain_linear(x, self.weight, self.t)


_DECODE_THREADS = threading.RLock()


@functools.cache
def _blas_threads() -> Any:
    import threadpoolctl  # scans the loaded libraries once (a few ms)
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


@contextlib.contextmanager
def decode_threads(plan: DecodePlan):
    """Around decoding with ``plan``: for the ``openblas`` layout, torch's ops on one thread and
    numpy's BLAS on as many as torch had (restored after; one such decoding at a time per
    process); otherwise nothing."""
    if plan.layout != "openblas":
        yield
        return
    with _DECODE_THREADS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _blas_threads().limit(limits=threads):
                yield
        finally:
            torch.set_num_threads(threads)


def tp_size() -> int:
    """This process's tensor-parallel world size (1 before the process groups exist)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_agree(plan: DecodePlan) -> DecodePlan:
    """The plan of the tensor-parallel group's first rank on every rank of the group (a probe
    may measure differently on each, and the ranks' partial sums must share a dtype)."""
    if tp_size() == 1:
        return plan
    codes = (torch.bfloat16, torch.float32, torch.float16)
    box = torch.tensor([codes.index(plan.dtype), LAYOUTS.index(plan.layout)])
    torch.distributed.broadcast(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                group=parallel_state.get_tensor_model_parallel_group())
    return DecodePlan(codes[int(box[0])], LAYOUTS[int(box[1])])


class ColumnLinear(ColumnParallelLinear):
    """megatron's column-parallel linear (this rank's output columns, no gather). Without autograd
    (decoding) it is the plain matmul of this rank's shard: megatron's autograd wrapper costs
    ~70 us a call on CPU, more than the matmul itself when decoding one token per row."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if torch.is_grad_enabled() or args or kwargs:
            return super().forward(x, *args, **kwargs)
        return plain_linear(x, self.weight), None


class RowLinear(RowParallelLinear):
    """megatron's row-parallel linear (input split over TP, output all-reduced); without autograd
    a plain matmul and the same all-reduce, for the reason given in :class:`ColumnLinear`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if torch.is_grad_enabled() or args or kwargs:
            return super().forward(x, *args, **kwargs)
        return tp_sum(plain_linear(x, self.weight)), None


def tp_sum(partial: torch.Tensor) -> torch.Tensor:
    """The sum over the TP ranks of each rank's partial output of a row-parallel matmul, in place
    and without autograd (decoding): the identity at TP=1."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(partial, group=parallel_state.get_tensor_model_parallel_group())
    return partial


class VocabEmbedding(VocabParallelEmbedding):
    """megatron's vocab-parallel embedding (this rank's rows, the others' tokens zero, summed over
    TP); without autograd at TP=1 the plain lookup, for the reason given in :class:`ColumnLinear`
    (its identity all-reduce is an autograd function call)."""

    def forward(self, tokens: torch.Tensor, *args: Any, **kwargs: Any):
        if torch.is_grad_enabled() or args or kwargs or self.num_embeddings_per_partition != self.num_embeddings:
            return super().forward(tokens, *args, **kwargs)
        return torch.nn.functional.embedding(tokens, self.weight)


def column_linear(mcfg: TransformerConfig, d_in: int, d_out: int) -> ColumnLinear:
    return ColumnLinear(d_in, d_out, config=mcfg, init_method=mcfg.init_method,
                        bias=False, gather_output=False)


def row_linear(mcfg: TransformerConfig, d_in: int, d_out: int) -> RowLinear:
    return RowLinear(d_in, d_out, config=mcfg, init_method=mcfg.output_layer_init_method,
                     bias=False, input_is_parallel=True, skip_bias_add=True)


class ReplicatedLinear(torch.nn.Module):
    """A bias-free linear kept whole on every TP rank (same init everywhere: same seed)."""

    def __init__(self, mcfg: TransformerConfig, d_in: int, d_out: int):
        super().__init__()
        master = torch.empty(d_out, d_in, dtype=torch.float32)
        mcfg.init_method(master)
        self.weight = torch.nn.Parameter(master.to(mcfg.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return torch.nn.functional.linear(x, self.weight)
        return plain_linear(x, self.weight)


def replicated_linear(mcfg: TransformerConfig, d_in: int, d_out: int) -> ReplicatedLinear:
    return ReplicatedLinear(mcfg, d_in, d_out)


def vocab_embedding(mcfg: TransformerConfig, vocab: int, d: int) -> VocabEmbedding:
    """Token embedding, N(0, 1) as in PaLM §2 (no norm is applied to the embeddings)."""
    return VocabEmbedding(vocab, d, init_method=lambda w: torch.nn.init.normal_(w, 0.0, 1.0),
                                  config=mcfg)


def tie_output(mcfg: TransformerConfig, vocab: int, d: int) -> VocabEmbedding:
    """The last pipeline stage's copy of the embedding (same seed, so the same values).

    ``shared``: the gradient norm counts it once; ``finalize_model_grads`` all-reduces its gradient
    with the first stage's over the embedding group, so the two stay equal.
    """
    copy = vocab_embedding(mcfg, vocab, d)
    copy.weight.shared = True
    copy.weight.shared_embedding = True
    return copy


def init_seed(seed: int, name: str) -> int:
    """A seed per weight group, so a weight's initial value never depends on the layout."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:7], "little")


# --- pipeline stages ----------------------------------------------------------------------------

def chunk_layers(n_layers: int, pp: int, pp_rank: int, virtual_stages: int = 1) -> list[list[int]]:
    """Global block indices of each model chunk on pipeline rank ``pp_rank``."""
    per = n_layers // (pp * virtual_stages)
    return [list(range((c * pp + pp_rank) * per, (c * pp + pp_rank + 1) * per))
            for c in range(virtual_stages)]


# --- tensor-parallel collectives over the vocabulary shards --------------------------------------

def vocab_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log Z over the full vocabulary from this rank's shard: ``[..., V_local]`` -> ``[...]``.

    Each rank reduces its shard with the fused ``torch.logsumexp``; the per-token results (small)
    are combined across TP ranks, with the gradient flowing back through each shard's own softmax.
    """
    lse = torch.logsumexp(logits, dim=-1)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        top = lse.detach().clone()
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
        # megatron all-reduces in place; exp's backward needs its own output untouched: clone
        lse = reduce_from_tensor_model_parallel_region((lse - top).exp().clone()).log() + top
    return lse


def vocab_columns(v_local: int, device: torch.device) -> torch.Tensor:
    """The full-vocabulary ids ``[V_local]`` of this rank's shard's columns."""
    return torch.arange(v_local, device=device) + parallel_state.get_tensor_model_parallel_rank() * v_local


def vocab_local(ids: torch.Tensor, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as indices into this rank's vocabulary shard of ``v_local`` columns (clamped
    into it) and whether this rank owns each id."""
    local = ids - parallel_state.get_tensor_model_parallel_rank() * v_local
    mine = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), mine


def vocab_pick(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits[..., ids]`` over the full vocabulary from this rank's shard: ``[..., V_local]``,
    ``[...]`` -> ``[...]``. The rank that owns an id contributes its logit, the others zero."""
    local, mine = vocab_local(ids, logits.shape[-1])
    picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    return vocab_sum(picked * mine)  # a multiply, not masked_fill: the gradient reaches only the owner


def vocab_sum(partial: torch.Tensor) -> torch.Tensor:
    """The sum over the vocabulary shards (TP ranks) of each rank's per-token partial ``[...]``;
    backward: each rank's own gradient (the identity)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return reduce_from_tensor_model_parallel_region(partial.clone())  # in place: clone
    return partial


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """All vocabulary shards of ``[..., V_local]`` logits on every TP rank (inference only)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)
