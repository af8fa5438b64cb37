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

import atexit
import contextlib
import datetime
import hashlib
import math
import os
import socket
import threading
import weakref
from typing import Any, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer import TransformerConfig

from palm.core.errors import UserError
from palm.core.process import flush_denormals, keep_freed_memory
from palm.model.megatron_compat import cpu_compat

# --- process groups ------------------------------------------------------------------------------

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
    """Destroy megatron's groups and the default process group (safe to call twice), whoever holds
    them: the holds (:class:`GroupHold`) taken before it count no more."""
    global _holds, _epoch
    with _lock:
        _holds, _epoch = 0, _epoch + 1
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# the groups that GroupHold started: how many holds are on them (0: none started by it, or a
# caller's own groups), and how many teardowns there have been (a hold taken before the last one
# counts no more)
_lock = threading.RLock()  # re-entrant: the collector may drop a hold inside a locked body
_holds = 0
_epoch = 0


def _take(tensor_parallel: int, pipeline_parallel: int, data_parallel: int, virtual_stages: int) -> int | None:
    """One more hold on the groups, started if none are up; the epoch it counts in, or None for a
    caller's own groups (used as they are, not ours to end)."""
    global _holds
    with _lock:
        if _holds == 0 and parallel_state.model_parallel_is_initialized():
            return None
        _holds += 1  # first: a hold the collector drops meanwhile cannot take the count to 0
        if _holds == 1:
            try:
                init_distributed(tensor_parallel, pipeline_parallel, data_parallel, virtual_stages)
            except BaseException:
                _holds = 0
                raise
        return _epoch


def _let_go(epoch: int | None) -> None:
    """One hold less (a caller's groups or a hold from before a teardown: nothing); the last one
    tears the groups down."""
    global _holds
    with _lock:
        if epoch is None or epoch != _epoch or _holds == 0:
            return
        _holds -= 1
        if _holds == 0:
            teardown()


@atexit.register
def _at_exit() -> None:
    """Groups still held at exit are torn down here, while every module is whole (the holds'
    finalizers do nothing at exit: during interpreter shutdown ``teardown`` may already be gone).
    The process is ending: a failure here is not worth a traceback."""
    if _holds:
        with contextlib.suppress(Exception):
            teardown()


class GroupHold:
    """A share of this process's groups, for as long as its owner lives: a model loaded for
    inference keeps one (the served model, :mod:`palm.apps.serving`).

    The first hold starts the groups (:func:`init_distributed`: a one-process world, TP = PP = DP
    = 1 unless told otherwise), later ones share them, and they are torn down when the last hold
    is released: by :meth:`release` (once; a second call does nothing) or by the hold being
    dropped with its owner. So models loaded, swapped and dropped in any order leave the others
    working. Groups up before the first hold (a caller's own: a torchrun worker's, a
    :func:`process_groups` block's, a test's) are used as they are and left to their maker, as
    :func:`process_groups` leaves them. Nothing is released one by one at interpreter exit:
    :func:`_at_exit` tears down once."""

    def __init__(self, tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                 virtual_stages: int = 1):
        epoch = _take(tensor_parallel, pipeline_parallel, data_parallel, virtual_stages)
        self.release = weakref.finalize(self, _let_go, epoch)
        self.release.atexit = False


@contextlib.contextmanager
def process_groups(tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                   virtual_stages: int = 1, *, seed: int | None = None) -> Iterator[None]:
    """The body runs with the process groups of :func:`init_distributed` up; they are torn down
    after it, also when it raises. Groups that already exist (a caller made them: a torchrun
    worker, a test, the holds of loaded models: :class:`GroupHold`) are used as they are and left up;
    a hold taken inside the block uses the block's groups, which end with it. ``seed``: Python's,
    NumPy's and torch's global generators are seeded first (what every training worker starts
    with)."""
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
    ``(weight @ x^T)^T``: MKL streams the weights from memory faster that way round; for one
    row (one prompt) it is no faster, so one row keeps ``F.linear`` (numbers:
    benchmarks/records/code-notes-2026-12-06.md#plain-linear).
    ``weight_t``: the weight's transpose ``[in, out]`` stored contiguous, for up to ``FEW_ROWS``
    rows, one included, the plain GEMM ``x @ weight_t`` instead (no transposed copy of the
    output; which is faster depends on the CPU's kernels: :meth:`palm.decode.decoder.Decoder.plan`)."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda or rows > FEW_ROWS or (rows == 1 and weight_t is None):
        return torch.nn.functional.linear(x, weight)
    if weight_t is not None:
        return torch.mm(x.reshape(rows, -1), weight_t).view(*x.shape[:-1], -1)
    return torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], -1)


def tp_size() -> int:
    """This process's tensor-parallel world size (1 before the process groups exist)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


class ColumnLinear(ColumnParallelLinear):
    """megatron's column-parallel linear (this rank's output columns, no gather). Without autograd
    (decoding) it is the plain matmul of this rank's shard: megatron's autograd wrapper costs
    more than the matmul itself when decoding one token per row on CPU (numbers:
    benchmarks/records/code-notes-2026-12-06.md#column-linear)."""

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
