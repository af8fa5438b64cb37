"""The training engine: megatron-core's schedules, DDP, optimizer and LR schedule around any model
and any objective.

One :class:`Engine` per process. It builds this rank's model chunks from a chunk factory (PaLM by
default; a reward or value model is another factory) with the layer split of the parallel plan
(:func:`palm.model.parallel.chunk_layers`), wraps them in megatron ``DistributedDataParallel``, makes an
AdamW ``get_megatron_optimizer`` (fp32 main weights when the params are bf16) with gradient
clipping, whose AdamW the ``muon`` recipe swaps for :class:`palm.train.optim.MuonAdamW`, an
``OptimizerParamScheduler`` (linear warmup, then cosine or warmup-stable-decay), and runs one optimizer step
over ``num_microbatches`` micro-batches with ``get_forward_backward_func()`` — no pipelining,
1F1B, or interleaved 1F1B when there are virtual stages — and ``finalize_model_grads`` (DP
all-reduce, tied-embedding all-reduce between the first and last stage). Every megatron call runs
inside :func:`palm.model.megatron_compat.cpu_compat`, so the same code trains on CPU.

The objective is megatron's own seam (``pretrain_gpt.py``'s ``forward_step``): a
:data:`ForwardStep` ``(batch, model) -> (output, loss_func)`` where ``loss_func(output)`` returns
``(loss_sum, num_tokens, metrics)``. ``loss_sum`` is summed over the micro-batch's valid tokens
(or pairs, or any unit); megatron's per-token normalisation (``calculate_per_token_loss``) then
divides the gradients by the number of units of the whole global batch, so every valid token
weighs the same across micro-batches and data-parallel ranks however the masks differ. Each
metric is a ``[sum, count]`` pair; the engine adds ``loss`` itself and reports ``sum / count``
over all micro-batches and DP ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from palm.core.config import check
from palm.model import lora as lora_adapters
from palm.model import parallel
from palm.model.megatron_compat import cpu_compat, device
from palm.model.network import ModelConfig, PaLM

Batch = dict[str, torch.Tensor]  # one micro-batch: named tensors, first dim the batch
LossFunc = Callable[[Any], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Batch, torch.nn.Module], tuple[Any, LossFunc]]
OutputFunc = Callable[[Any], dict[str, torch.Tensor]]  # last stage's output -> per-token tensors


class ChunkFactory(Protocol):
    """Builds one pipeline chunk of a model (``palm.model.network.PaLM`` has this signature)."""

    def __call__(self, cfg: ModelConfig, mcfg: Any, *, pre_process: bool, post_process: bool,
                 layers: list[int], seed: int) -> torch.nn.Module: ...


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer part of a training section: AdamW, or Muon for the hidden matrices
    (:mod:`palm.train.optim`); linear warmup, then cosine decay or warmup-stable-decay."""

    name: str = "adamw"  # adamw | muon (Muon for the blocks' 2-D matrices, AdamW for the rest)
    schedule: str = "cosine"  # cosine (decay over every step after warmup) | wsd (hold lr, then decay)
    decay_fraction: float = 0.2  # wsd: the last fraction of train_steps decays linearly to min_lr
    lr: float = 3e-3  # peak learning rate, reached after warmup_steps (muon: its RMS-matched step too)
    min_lr: float = 3e-4  # the schedule decays to this at the last step
    warmup_steps: int = 20  # linear warmup from 0
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to norms
    beta1: float = 0.9  # Adam's first-moment decay (AdamW, and Muon's AdamW part)
    beta2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # added to Adam's denominator
    clip_grad: float = 1.0  # global gradient-norm clip (0 disables it)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the matrices' updates
    muon_lr_mult: float = 1.0  # muon: the matrices' step is this times the RMS-matched lr

    def __post_init__(self) -> None:
        check(self.name in ("adamw", "muon"), "name", f"must be adamw or muon, got {self.name!r}")
        check(self.schedule in ("cosine", "wsd"), "schedule", f"must be cosine or wsd, got {self.schedule!r}")
        check(0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        check(0 <= self.muon_momentum < 1, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        check(self.muon_lr_mult > 0, "muon_lr_mult", f"must be positive, got {self.muon_lr_mult}")
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        check(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        check(self.clip_grad >= 0, "clip_grad", f"must be >= 0, got {self.clip_grad}")


# --- this rank's model chunks --------------------------------------------------------------------

def build_chunks(cfg: ModelConfig, chunk: ChunkFactory = PaLM, *, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), from megatron's current groups."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    mcfg = parallel.megatron_config(cfg, virtual_stages=vpp, dtype=dtype)
    chunks = []
    for c, layers in enumerate(parallel.chunk_layers(cfg.n_layers, pp, rank, vpp)):
        module = chunk(cfg, mcfg, layers=layers, seed=seed, pre_process=(c == 0 and rank == 0),
                       post_process=(c == vpp - 1 and rank == pp - 1))
        chunks.append(module.to(device()))  # initialised on CPU (layout-independent), then moved
    return chunks


def wrap_ddp(chunks: list[torch.nn.Module], *, bucket_size: int | None = None) -> list[DistributedDataParallel]:
    """megatron DDP around each chunk: gradients accumulate in fp32 buffers, all-reduced over DP."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        bucket_size=bucket_size)
    with cpu_compat():
        return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                        disable_bucketing=i > 0)
                for i, c in enumerate(chunks)]


# --- the engine ----------------------------------------------------------------------------------

class Engine:
    """Model chunks, optimizer and schedule of this rank; process groups must already exist.

    ``optim=None`` makes a frozen engine (no DDP, no optimizer): forward passes only, e.g. the
    reference and reward models of PPO. ``lora``: adapters on the chunks (:mod:`palm.model.lora`)
    before DDP and the optimizer, so only they, and the parameters ``lora_trainable`` names, get
    gradients and optimizer state (where LoRA's memory saving comes from).
    """

    def __init__(self, cfg: ModelConfig, optim: OptimConfig | None, *, forward_step: ForwardStep | None = None,
                 chunk: ChunkFactory = PaLM, train_steps: int = 1, micro_batch_size: int,
                 num_microbatches: int = 1, seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 lora: lora_adapters.LoRAConfig | None = None, lora_trainable: Sequence[str] = ()):
        self.cfg, self.optim, self.forward_step, self.lora = cfg, optim, forward_step, lora
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.seq_len = seq_len or cfg.seq_len
        self.chunks = build_chunks(cfg, chunk, dtype=dtype, seed=seed)
        if lora is not None:
            lora_adapters.apply(self.chunks, lora, seed, trainable=lora_trainable)
        self.config = self.chunks[0].config
        self.step = 0  # optimizer steps taken
        if optim is None:
            self.model: list[torch.nn.Module] = self.chunks
            for c in self.chunks:
                c.requires_grad_(False).eval()
            return
        self.model = wrap_ddp(self.chunks)
        self.config.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        self.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        with cpu_compat():
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                                weight_decay=optim.weight_decay, adam_beta1=optim.beta1,
                                adam_beta2=optim.beta2, adam_eps=optim.eps,
                                clip_grad=optim.clip_grad, bf16=dtype == torch.bfloat16,
                                params_dtype=dtype, use_distributed_optimizer=False),
                self.model)
        # Without apex/TE megatron hands the params to torch's AdamW with its default, the
        # per-tensor loop (about ten kernels a tensor); torch's fused AdamW does each tensor in
        # one, CPU and CUDA alike, the same update to fp32 rounding: a faster optimizer step
        # (benchmarks/train_throughput.py measures the whole step; numbers:
        # benchmarks/records/code-notes-2026-12-06.md#engine-fused-adamw).
        for group in self.optimizer.param_groups:
            group.update(fused=True, foreach=False)
        if optim.name == "muon":
            _use_muon(self.optimizer, self.chunks, optim, dtype)
        decay_steps = max(train_steps, optim.warmup_steps + 1)
        wsd = {"lr_decay_style": "WSD", "lr_wsd_decay_style": "linear",
               "wsd_decay_steps": max(1, min(round(optim.decay_fraction * train_steps),
                                             decay_steps - optim.warmup_steps))}
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps, lr_decay_steps=decay_steps,
            start_wd=optim.weight_decay, end_wd=optim.weight_decay,
            wd_incr_steps=max(train_steps, 1), wd_incr_style="constant",
            **(wsd if optim.schedule == "wsd" else {"lr_decay_style": "cosine"}))

    # -- the schedule -----------------------------------------------------------------------------

    def _schedule(self, step: ForwardStep, microbatches: Sequence[Batch], forward_only: bool) -> list[dict]:
        """Run megatron's schedule; returns the last stage's metric dicts (empty elsewhere)."""

        def megatron_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
            batch = {k: v.to(device(), non_blocking=True) for k, v in next(data_iterator).items()}
            output, loss_func = step(batch, model)

            def with_loss(out: Any):
                loss_sum, num_tokens, metrics = loss_func(out)
                num_tokens = num_tokens.to(torch.int)  # megatron accumulates an int32 count
                # the schedule may scale the returned loss in place: report a copy
                report = {"loss": torch.stack([loss_sum.detach().clone().double(), num_tokens.double()]),
                          **metrics}
                return loss_sum, num_tokens, report

            return output, with_loss

        iters: Any = [iter(microbatches) for _ in self.model]
        with cpu_compat():
            return get_forward_backward_func()(
                forward_step_func=megatron_step, data_iterator=iters if len(iters) > 1 else iters[0],
                model=self.model, num_microbatches=len(microbatches), seq_length=self.seq_len,
                micro_batch_size=self.micro_batch_size, forward_only=forward_only)

    def train_step(self, microbatches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (gradient accumulation)."""
        assert self.optim is not None and self.forward_step is not None, "a frozen engine does not train"
        check(len(microbatches) == self.num_microbatches, "num_microbatches",
              f"got {len(microbatches)} micro-batches, expected {self.num_microbatches}")
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = _reduce(self._schedule(self.forward_step, microbatches, forward_only=False))
        lr = self.optimizer.param_groups[0]["lr"]
        with cpu_compat():
            ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return {**metrics, "lr": float(lr),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": float(not ok)}

    @torch.no_grad()
    def evaluate(self, microbatches: Sequence[Batch], step: ForwardStep | None = None) -> dict[str, float]:
        """The objective's metrics (``loss`` included) over ``microbatches``, without backward."""
        was_training = [m.training for m in self.model]
        for m in self.model:
            m.eval()
        try:
            return _reduce(self._schedule(step or self.forward_step, microbatches, forward_only=True))
        finally:
            for m, t in zip(self.model, was_training):
                m.train(t)

    @torch.no_grad()
    def forward(self, microbatches: Sequence[Batch], step: Callable[[Batch, torch.nn.Module], tuple[Any, OutputFunc]]
                ) -> list[dict[str, torch.Tensor]]:
        """Per-micro-batch tensors from the last pipeline stage, on every rank of this rank's
        pipeline: ``step(batch, model) -> (output, fn)`` with ``fn(output)`` a dict of tensors
        (e.g. per-token log-probs, values, rewards)."""
        def as_loss(batch: Batch, model: torch.nn.Module):
            output, fn = step(batch, model)
            zero = torch.zeros((), device=device())
            return output, lambda out: (zero, zero.to(torch.int), {"out": fn(out)})

        was_training = [m.training for m in self.model]
        for m in self.model:
            m.eval()
        try:
            store = self._schedule(as_loss, microbatches, forward_only=True)
        finally:
            for m, t in zip(self.model, was_training):
                m.train(t)
        outs = [{k: v.detach() for k, v in d["out"].items()} for d in store]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [outs if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None]
            torch.distributed.broadcast_object_list(
                box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
            outs = [{k: v.to(device()) for k, v in d.items()} for d in box[0]]
        return outs

    # -- inspection (tests, export) ----------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under their global names (``layers.<i>.…`` is global)."""
        seen = set()
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield name, p


def _use_muon(optimizer: Any, chunks: list[torch.nn.Module], optim: OptimConfig, dtype: torch.dtype) -> None:
    """Swap the AdamW inside megatron's optimizer(s) for :class:`palm.train.optim.MuonAdamW` over
    the same groups: megatron keeps the fp32 main weights, clipping and checkpoint layout.

    Muon takes the transformer blocks' 2-D weights; embeddings, norms, any head and LoRA's adapters
    (low-rank factors, not the hidden matrices Muon is made for) keep AdamW.
    Newton-Schulz runs in the parameters' dtype: bf16 only where training already is (hardware
    with native bf16), fp32 elsewhere."""
    from palm.train.optim import MuonAdamW

    hidden = {id(p) for c in chunks for name, p in c.named_parameters()
              if name.startswith("layers.") and p.ndim == 2 and not lora_adapters.is_adapter(name)}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        # the optimizer's own (fp32 main) copy of each model parameter, where it keeps one
        mains = {id(m): p for group_m, group_p in zip(getattr(opt, "fp32_from_float16_groups", []),
                                                      getattr(opt, "float16_groups", []))
                 for m, p in zip(group_m, group_p)}
        matrices = {id(m) for group in opt.optimizer.param_groups for m in group["params"]
                    if id(mains.get(id(m), m)) in hidden}
        opt.optimizer = MuonAdamW(
            opt.optimizer.param_groups, is_matrix=lambda p, ids=matrices: id(p) in ids,
            betas=(optim.beta1, optim.beta2), eps=optim.eps, momentum=optim.muon_momentum,
            lr_mult=optim.muon_lr_mult, ns_dtype=dtype,
            tp_group=parallel_state.get_tensor_model_parallel_group())
        opt.init_state_fn = lambda inner, config=None: inner.init_state()


def _reduce(store: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``sum / count`` of each ``[sum, count]`` metric over micro-batches and DP ranks, the same
    on every rank (the last pipeline stage computes it, the others receive it)."""
    keys = sorted(store[0]) if store else []
    totals = torch.stack([sum(d[k].double() for d in store) for k in keys]) if keys else None
    if totals is not None and parallel_state.get_data_parallel_world_size() > 1:
        totals = totals.to(device())
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    result = {k: float(t[0] / t[1]) if t[1] > 0 else float("nan")
              for k, t in zip(keys, totals.cpu())} if keys else {}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [result if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None]
        torch.distributed.broadcast_object_list(
            box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
        result = box[0]
    return result


def metric(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """A ``[sum, count]`` metric for a loss function's metrics dict."""
    count = count if isinstance(count, torch.Tensor) else torch.tensor(float(count), device=total.device)
    return torch.stack([total.detach().double(), count.detach().double()])


def random_batches(cfg: ModelConfig, *, steps: int, num_microbatches: int, micro_batch_size: int,
                   seed: int, seq_len: int | None = None, mask_keep: float | None = None) -> list[list[Batch]]:
    """Deterministic synthetic micro-batches ``[step][micro]`` (tests and benchmarks). With
    ``mask_keep`` the loss masks are random, keeping about that fraction of each row, and differ
    between micro-batches."""
    g = torch.Generator().manual_seed(seed)
    s = seq_len or cfg.seq_len
    out = []
    for _ in range(steps):
        step = []
        for j in range(num_microbatches):
            tokens = torch.randint(0, cfg.vocab_size, (micro_batch_size, s + 1), generator=g)
            if mask_keep is None:
                mask = torch.ones(micro_batch_size, s)
            else:  # a different keep rate per micro-batch, so token counts differ
                keep = mask_keep * (0.5 + j / max(1, num_microbatches - 1)) if num_microbatches > 1 else mask_keep
                mask = (torch.rand(micro_batch_size, s, generator=g) < min(keep, 1.0)).float()
            step.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        out.append(step)
    return out
