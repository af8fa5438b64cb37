"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a fine-tuning stage
trains ``W + (alpha / r) B A`` with ``W`` frozen, ``A [r, in]`` and ``B [out, r]``.

The adapters hang on the block's linears (``network.py`` stays the model alone): each targeted
linear gets a child :class:`Adapter` (``layers.<i>.attn.q.lora.a`` / ``.b``) and a forward hook
that adds the adapter's output to the layer's. Base parameter names do not change, so parent
exports, checkpoints and the parallel plan read them as before. ``B`` starts at zero: the model
starts equal to its parent. ``A`` is drawn whole from a seed per layer and linear
(:func:`palm.model.parallel.init_seed`), then split, so its start does not depend on the TP layout.

Tensor parallel, adapters split like the layers they wrap (the table of :mod:`palm.model.parallel`):

===========================  ======================  ===================================================
linear                       A / B                   the adapter's output
===========================  ======================  ===================================================
column (q, gate, up)         A whole, B rows split   ``copy_to(x A^T) B_local^T``: backward sums A's
                                                     gradient over TP (each rank has its B rows' part)
row (out, down)              A columns split, B      ``reduce_from(x_local A_local^T) B^T``: the partial
                             whole                   products summed over TP, as the layer's own are
replicated (kv)              both whole              ``x A^T B^T`` (Attention's copy_to after kv sums
                                                     its gradient over TP)
===========================  ======================  ===================================================

Split adapters carry megatron's TP attributes, so the gradient norm, checkpoint sharding and
:func:`palm.model.weights.load_safetensors` treat them as they treat the layers' weights.

PPO's and DPO's reference is the base with the adapters off (:func:`adapters_off`,
:class:`AdaptersOff`): one copy of the frozen weights instead of two; PPO's reward model shares
its LoRA critic's frozen base the same way (:func:`share_frozen`). The export is plain weights
(:func:`merge` folds ``scale B A`` into ``W``). Decoding reads each linear's weight with the
adapter folded in (:func:`weight`), so sampled rollouts come from the adapted policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from palm.core.config import check
from palm.model import parallel

TARGETS = ("q", "kv", "out", "gate", "up", "down")  # the block's linears (network.py: Attention, SwiGLU)
MARK = ".lora."  # in the name of every adapter parameter


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The ``lora`` field of a fine-tuning section (sft, reward, ppo, dpo); null: full fine-tuning."""

    rank: int = 8  # r, the adapters' inner width
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank (Hu et al. §4.1)
    dropout: float = 0.0  # dropout on each adapter's input while training (0: none)
    targets: tuple[str, ...] = TARGETS  # which of each block's linears get adapters

    def __post_init__(self) -> None:
        check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.targets) > 0, "targets", f"name at least one of {', '.join(TARGETS)}")
        for t in self.targets:
            check(t in TARGETS, "targets", f"unknown linear {t!r}; choose from {', '.join(TARGETS)}")
        check(len(set(self.targets)) == len(self.targets), "targets", f"lists a linear twice: {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    """Whether a parameter name is an adapter's (a parent export never holds one)."""
    return MARK in f".{name}"


def _kind(linear: torch.nn.Module) -> str:
    if isinstance(linear, ColumnParallelLinear):
        return "column"
    if isinstance(linear, RowParallelLinear):
        return "row"
    return "replicated"


class Adapter(torch.nn.Module):
    """``x -> scale * B A dropout(x)`` for one linear (its input: this rank's part for a row-parallel
    one), added to the linear's output by :func:`_add`. ``enabled`` False: the linear alone."""

    def __init__(self, kind: str, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float):
        super().__init__()
        self.kind, self.scale, self.p, self.enabled = kind, scale, dropout, True
        self.a = torch.nn.Parameter(a)  # [r, in] (row: [r, in/tp])
        self.b = torch.nn.Parameter(b)  # [out, r] (column: [out/tp, r])
        if kind == "row":
            set_tensor_model_parallel_attributes(self.a, True, 1, 1)
        elif kind == "column":
            set_tensor_model_parallel_attributes(self.b, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p and self.training:
            x = F.dropout(x, self.p)
        t = F.linear(x, self.a)  # [..., r]
        if torch.is_grad_enabled():
            if self.kind == "column":  # identity forward; backward sums A's input gradient over TP
                t = copy_to_tensor_model_parallel_region(t)
            elif self.kind == "row":  # this rank's part of A x, summed over TP (in place: t is fresh)
                t = reduce_from_tensor_model_parallel_region(t)
        elif self.kind == "row":
            t = parallel.tp_sum(t)
        return F.linear(t, self.b) * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * B A`` in fp32, shaped like this rank's shard of the linear's weight."""
        return (self.b.detach().float() @ self.a.detach().float()) * self.scale


def _add(linear: torch.nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the linear's output plus its adapter's (megatron's layers return ``(y, bias)``)."""
    adapter = linear.lora
    if not adapter.enabled:
        return output
    if isinstance(output, tuple):
        return (output[0] + adapter(args[0]), *output[1:])
    return output + adapter(args[0])


def _targets(chunk: torch.nn.Module, targets: Iterable[str]) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(name, linear)`` of each targeted linear of a chunk: ``layers.<i>.<attn|mlp>.<target>``."""
    targets = set(targets)
    for name, module in chunk.named_modules():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[-1] in targets:
            yield name, module


def apply(chunks: Sequence[torch.nn.Module], cfg: LoRAConfig, seed: int, trainable: Iterable[str] = ()) -> None:
    """Add adapters to the targeted linears of every chunk (before DDP and the optimizer) and freeze
    every other parameter except those whose name matches a pattern of ``trainable`` (fnmatch, e.g.
    the reward model's head). ``seed``: the adapters' ``A`` (``B`` is zero: the model is unchanged)."""
    tp, rank = parallel.tp_size(), (parallel_state.get_tensor_model_parallel_rank() if parallel.tp_size() > 1 else 0)
    trainable = tuple(trainable)
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in trainable))
        for name, linear in list(_targets(chunk, cfg.targets)):
            kind, w = _kind(linear), linear.weight
            d_in = w.shape[1] * (tp if kind == "row" else 1)
            d_out = w.shape[0] * (tp if kind == "column" else 1)
            g = torch.Generator().manual_seed(parallel.init_seed(seed, f"lora/{name}"))
            bound = 1.0 / math.sqrt(d_in)  # kaiming-uniform(a=sqrt(5)), as PEFT and the paper's code
            a = torch.empty(cfg.rank, d_in).uniform_(-bound, bound, generator=g)
            b = torch.zeros(d_out, cfg.rank)
            if kind == "row":
                a = a.chunk(tp, dim=1)[rank]
            elif kind == "column":
                b = b.chunk(tp, dim=0)[rank]
            as_w = dict(dtype=w.dtype, device=w.device)
            linear.lora = Adapter(kind, a.contiguous().to(**as_w), b.contiguous().to(**as_w), cfg.scale, cfg.dropout)
            linear._lora_hook = linear.register_forward_hook(_add)


def adapters(modules: Iterable[torch.nn.Module]) -> list[Adapter]:
    return [m for module in modules for m in module.modules() if isinstance(m, Adapter)]


@contextlib.contextmanager
def adapters_off(chunks: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside, the model computes its base alone (PPO's and DPO's reference); the adapters come back
    on leaving, also when the body raises."""
    found = adapters(chunks)
    was = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a, on in zip(found, was):
            a.enabled = on


class AdaptersOff:
    """An engine seen with its adapters off: the same ``forward(micro_batches, step)`` and
    ``evaluate`` as :class:`palm.train.engine.Engine`, computed by the frozen base. PPO's and DPO's
    reference with LoRA, with no second copy of the policy."""

    def __init__(self, engine: Any):
        self.engine = engine

    def forward(self, microbatches: Sequence[Any], step: Any) -> list[dict[str, torch.Tensor]]:
        with adapters_off(self.engine.chunks):
            return self.engine.forward(microbatches, step)

    def evaluate(self, microbatches: Sequence[Any], step: Any = None) -> dict[str, float]:
        with adapters_off(self.engine.chunks):
            return self.engine.evaluate(microbatches, step)


def share_frozen(chunks: Iterable[torch.nn.Module], source: Iterable[torch.nn.Module]) -> int:
    """Point every parameter of ``chunks`` at the storage of the same-named frozen parameter of
    ``source`` when both hold the same values (e.g. PPO's reward model and its LoRA critic, both
    loaded from the reward export: the critic's base never changes). Returns how many were shared."""
    frozen = {n: p for c in source for n, p in c.named_parameters() if not p.requires_grad}
    shared = 0
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                q = frozen.get(name)
                if q is not None and q is not p and q.shape == p.shape and q.dtype == p.dtype and torch.equal(p, q):
                    p.data = q.data
                    shared += 1
    return shared


def weight(linear: torch.nn.Module) -> torch.Tensor:
    """A linear's weight with its enabled adapter folded in (this rank's shard), for code that reads
    weights rather than calling the layer (the decoder's fused matmuls)."""
    adapter = getattr(linear, "lora", None)
    if adapter is None or not adapter.enabled:
        return linear.weight
    return (linear.weight.float() + adapter.delta()).to(linear.weight.dtype)


def merge(module: torch.nn.Module) -> torch.nn.Module:
    """Fold ``scale * B A`` into every adapted linear's weight and drop the adapters (the export);
    returns ``module``, now a plain model."""
    with torch.no_grad():
        for linear in [m for m in module.modules() if isinstance(getattr(m, "lora", None), Adapter)]:
            linear.weight.copy_((linear.weight.float() + linear.lora.delta()).to(linear.weight.dtype))
            linear._lora_hook.remove()
            del linear.lora, linear._lora_hook
    return module
