"""The training engine: megatron-core's schedules, DDP, optimizer and LR schedule around PaLM.

One :class:`Engine` per process. It builds this rank's model chunks (:mod:`palm.parallel`),
wraps them in megatron ``DistributedDataParallel``, makes an AdamW ``get_megatron_optimizer``
(fp32 main weights when the params are bf16) with gradient clipping, an
``OptimizerParamScheduler`` (linear warmup, cosine decay), and runs one optimizer step over
``num_microbatches`` micro-batches with ``get_forward_backward_func()`` — no pipelining, 1F1B, or
interleaved 1F1B when there are virtual stages — and ``finalize_model_grads`` (DP all-reduce,
tied-embedding all-reduce between the first and last stage). Every megatron call runs inside
:func:`palm.megatron_compat.cpu_compat`, so the same code trains on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from palm import parallel
from palm.config import check
from palm.megatron_compat import cpu_compat, device
from palm.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay (the optimizer part of ``pretrain``)."""

    lr: float = 3e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 3e-4  # the cosine decays to this at the last step
    warmup_steps: int = 20  # linear warmup from 0
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip (0 disables it)

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        check(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        check(self.clip_grad >= 0, "clip_grad", f"must be >= 0, got {self.clip_grad}")


Batch = tuple[torch.Tensor, torch.Tensor]  # tokens [b, s+1] int64, loss mask [b, s] float


class Engine:
    """Model chunks, optimizer and schedule of this rank; process groups must already exist."""

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, *, train_steps: int,
                 micro_batch_size: int, num_microbatches: int, seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        self.cfg, self.optim = cfg, optim
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.seq_len = seq_len or cfg.seq_len
        self.chunks = parallel.build_chunks(cfg, dtype=dtype, seed=seed)
        self.model = parallel.wrap_ddp(self.chunks)
        self.config = self.chunks[0].config
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
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(train_steps, optim.warmup_steps + 1),
            lr_decay_style="cosine", start_wd=optim.weight_decay, end_wd=optim.weight_decay,
            wd_incr_steps=max(train_steps, 1), wd_incr_style="constant")
        self.step = 0  # optimizer steps taken

    # -- one step ---------------------------------------------------------------------------------

    def _run(self, microbatches: Sequence[Batch], forward_only: bool) -> torch.Tensor:
        """The schedule over ``microbatches``; returns their mean loss, the same on every rank."""
        if not forward_only:
            check(len(microbatches) == self.num_microbatches, "num_microbatches",
                  f"got {len(microbatches)} micro-batches, expected {self.num_microbatches}")
        iters: Any = [iter(microbatches) for _ in self.model]
        with cpu_compat():
            losses = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                model=self.model, num_microbatches=len(microbatches), seq_length=self.seq_len,
                micro_batch_size=self.micro_batch_size, forward_only=forward_only)
        loss = torch.zeros((), dtype=torch.float64, device=device())  # NCCL reduces device tensors
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            loss += sum(float(x["loss"]) for x in losses) / len(losses)
        return _mean_over_dp(_sum_over_pp(loss))

    def train_step(self, microbatches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (gradient accumulation)."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run(microbatches, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        with cpu_compat():
            ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return {"loss": float(loss), "lr": float(lr),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": float(not ok)}

    @torch.no_grad()
    def eval_loss(self, microbatches: Sequence[Batch]) -> float:
        """Mean loss over ``microbatches`` without a backward pass."""
        for m in self.model:
            m.eval()
        loss = self._run(microbatches, forward_only=True)
        for m in self.model:
            m.train()
        return float(loss)

    # -- inspection (tests, export) ----------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under their global names (``layers.<i>.…`` is global)."""
        seen = set()
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield name, p


def _forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    tokens, mask = (t.to(device(), non_blocking=True) for t in next(data_iterator))
    per_token = model(tokens[:, :-1], labels=tokens[:, 1:])  # [b, s] on the last stage

    def loss_func(output: torch.Tensor):
        loss = (output * mask).sum() / mask.sum().clamp(min=1)
        # the schedule divides the returned loss in place: log a copy (DESIGN §3)
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_func


def _sum_over_pp(x: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(x, group=parallel_state.get_pipeline_model_parallel_group())
    return x


def _mean_over_dp(x: torch.Tensor) -> torch.Tensor:
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        torch.distributed.all_reduce(x, group=parallel_state.get_data_parallel_group())
        x /= dp
    return x


def random_batches(cfg: ModelConfig, *, steps: int, num_microbatches: int, micro_batch_size: int,
                   seed: int, seq_len: int | None = None) -> list[list[Batch]]:
    """Deterministic synthetic micro-batches ``[step][micro]`` (tests and benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    s = seq_len or cfg.seq_len
    out = []
    for _ in range(steps):
        step = []
        for _ in range(num_microbatches):
            tokens = torch.randint(0, cfg.vocab_size, (micro_batch_size, s + 1), generator=g)
            step.append((tokens, torch.ones(micro_batch_size, s)))
        out.append(step)
    return out
