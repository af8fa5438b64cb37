"""Muon for the hidden matrices, AdamW for the rest: the optimizer of the ``muon`` recipe.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is
scalable for LLM training") takes SGD-momentum's update of a weight matrix and replaces it by the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations. Embeddings, norms
and heads keep AdamW, as in nanochat and the modded-nanogpt speedruns.

:class:`MuonAdamW` is one ``torch.optim.Optimizer`` over megatron's parameter groups, so megatron's
mixed precision (fp32 main weights), gradient clipping, checkpointing and LR schedule drive it as
they drive AdamW. Why not ``torch.optim.Muon`` itself: it always orthogonalises in bf16 (dozens of
times slower than fp32 on AVX2-only CPUs: benchmarks/records/code-notes-2026-12-06.md#metrics) and
sees one shard of a tensor-parallel matrix. Here the update of a TP-sharded matrix is gathered over
the TP group, orthogonalised whole and sliced back, so every layout takes the step one process
takes (orthogonalising each shard alone would be a different, layout-dependent optimizer). With
bf16 iterations it is step for step torch's Muon (tests/test_optim.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim.adam import adam as adam_step

# Quintic Newton-Schulz coefficients (Jordan 2024): the slope at zero is maximised, so five steps
# push every singular value into about [0.7, 1.2] rather than to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalize(g: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """About ``U V^T`` of each ``g = U S V^T`` (``[m, n]`` or a stack ``[k, m, n]``), by quintic
    Newton-Schulz in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = g.size(-2) > g.size(-1)
    if wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # spectral norm <= Frobenius <= 1
    mul = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        poly = mul(gram, gram, gram, beta=b, alpha=c)
        x = mul(x, poly, x, beta=a)
    return x.mT if wide else x


def rms_matched(lr: float, shape: tuple[int, int]) -> float:
    """The step size that gives Muon's update AdamW's typical RMS (Liu et al. 2025, eq. 4), so one
    learning rate and schedule serve both halves."""
    return lr * 0.2 * math.sqrt(max(shape))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the parameters ``is_matrix`` picks, fused AdamW for the others, in the same groups.

    ``tp_group``: the tensor-parallel group (None or size 1: nothing to gather). A parameter with
    megatron's ``tensor_model_parallel`` attribute is a shard along ``partition_dim``.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, is_matrix: Callable[[torch.Tensor], bool],
                 betas: tuple[float, float], eps: float, momentum: float, lr_mult: float,
                 ns_dtype: torch.dtype, tp_group: Any = None):
        super().__init__(list(param_groups), {"betas": betas, "eps": eps})
        self.is_matrix, self.momentum, self.lr_mult = is_matrix, momentum, lr_mult
        self.ns_dtype, self.tp_group = ns_dtype, tp_group
        self.tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        for group in self.param_groups:
            for p in group["params"]:
                if is_matrix(p) and p.ndim != 2:
                    raise ValueError(f"Muon needs 2-D matrices, got a parameter of shape {tuple(p.shape)}")

    def init_state(self, *_: Any) -> None:
        """Empty state for every parameter (megatron loads a checkpoint into this template)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                if self.is_matrix(p):
                    state["momentum_buffer"] = torch.zeros_like(p)
                else:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)

    def _full(self, update: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """The whole matrix of a TP shard (and the dimension it was split on)."""
        if self.tp == 1 or not getattr(p, "tensor_model_parallel", False):
            return update, None
        dim = p.partition_dim
        parts = [torch.empty_like(update) for _ in range(self.tp)]
        torch.distributed.all_gather(parts, update.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim), dim

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "MuonAdamW takes no closure"
        self.init_state()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            adam: dict[str, list[torch.Tensor]] = {"p": [], "g": [], "m": [], "v": [], "s": []}
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor, int | None]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not self.is_matrix(p):
                    for key, value in zip("pgmvs", (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                                    state["step"])):
                        adam[key].append(value)
                    continue
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - self.momentum)
                update = p.grad.lerp(buf, self.momentum)  # Nesterov
                full, dim = self._full(update, p)
                by_shape.setdefault(tuple(full.shape), []).append((p, full, dim))
            # matrices of one shape are orthogonalised as one stack: a few batched matmuls run
            # nearer the matmul peak than many small ones (numbers:
            # benchmarks/records/code-notes-2026-12-06.md#muon-stack)
            for shape, items in by_shape.items():
                fulls = [full for _, full, _ in items]
                orthos = (orthogonalize(torch.stack(fulls), self.ns_dtype).unbind(0) if len(fulls) > 1
                          else [orthogonalize(fulls[0], self.ns_dtype)])
                for (p, _, dim), ortho in zip(items, orthos):
                    if dim is not None:
                        ortho = ortho.chunk(self.tp, dim=dim)[torch.distributed.get_rank(self.tp_group)]
                    p.mul_(1 - lr * wd)
                    p.add_(ortho.to(p.dtype), alpha=-rms_matched(lr, shape) * self.lr_mult)
            if adam["p"]:
                beta1, beta2 = group["betas"]
                adam_step(
                    adam["p"], adam["g"], adam["m"], adam["v"], [], adam["s"], fused=True,
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                    weight_decay=wd, eps=group["eps"], maximize=False)
