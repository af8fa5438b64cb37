"""Parallel-layout runs for tests/test_parallel_numerics.py (launched by torchrun, or in-process).

Each layout trains the same tiny PaLM from the same initial weights on the same micro-batches and
saves, per rank, its losses, its parameters after training and its gradients of the first step
(full tensors: TP shards are gathered; each pipeline stage saves the blocks it holds).
Usage: ``torchrun --standalone --nproc-per-node N parity_worker.py OUT LAYOUT [LAYOUT ...]`` where
LAYOUT is ``tp,pp,dp,vpp`` or ``decode,tp`` (KV-cache and hidden-state checks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core import parallel_state as ps  # noqa: E402

from palm import parallel  # noqa: E402
from palm.model import ModelConfig  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402

CFG = ModelConfig(vocab_size=250, d_model=64, n_layers=4, n_heads=4, head_dim=16, seq_len=32)
OPTIM = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, clip_grad=1.0)
STEPS, MICRO, MBS = 3, 4, 2  # optimizer steps, micro-batches per step (all DP ranks), batch size


def full(p: torch.Tensor, like: torch.nn.Parameter) -> torch.Tensor:
    """The whole tensor of a TP-sharded parameter (gathered along its partition dim)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(like, "tensor_model_parallel", False):
        return p.detach().float().clone()
    parts = [torch.empty_like(p) for _ in range(tp)]
    torch.distributed.all_gather(parts, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=like.partition_dim).float()


def run_layout(out: Path, tp: int, pp: int, dp: int, vpp: int, steps: int = STEPS) -> None:
    parallel.init_distributed(tp, pp, dp, vpp)
    micro = MICRO // dp
    eng = Engine(CFG, OPTIM, train_steps=STEPS, micro_batch_size=MBS, num_microbatches=micro, seed=7)
    batches = random_batches(CFG, steps=steps, num_microbatches=MICRO, micro_batch_size=MBS, seed=3)
    r = ps.get_data_parallel_rank()
    losses, grads = [], {}
    for i, step in enumerate(batches):
        losses.append(eng.train_step(step[r * micro:(r + 1) * micro])["loss"])
        if i == 0:
            grads = {n: full(p.main_grad, p) for n, p in eng.named_parameters()}
    weights = {n: full(p, p) for n, p in eng.named_parameters()}
    rank = torch.distributed.get_rank()
    name = f"{tp},{pp},{dp},{vpp}"
    if ps.get_tensor_model_parallel_rank() == 0 and r == 0:
        torch.save({"losses": losses, "grads": grads, "weights": weights},
                   out / f"{name}.rank{rank}.pt")
    if rank == 0:
        (out / f"{name}.done").write_text(json.dumps(losses))
    ps.destroy_model_parallel()


def run_decode(out: Path, tp: int) -> None:
    """KV-cached decoding against full recomputation, and hidden states, at TP=``tp``."""
    from palm.model import PaLM, gather_vocab

    parallel.init_distributed(tp, 1, torch.distributed.get_world_size() // tp)
    model = PaLM(CFG, seed=7).eval()
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, CFG.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        full_logits = gather_vocab(model(seq))  # [b, s, V]
        cache = model.new_cache(2)
        steps = [model(seq[:, :12], cache=cache)]  # a prompt of 12, then one token at a time
        cache.length = 12
        for i in range(12, 20):
            steps.append(model(seq[:, i:i + 1], cache=cache))
            cache.length += 1
        inc_logits = gather_vocab(torch.cat(steps, dim=1))
        hidden = model.hidden_states(seq)
    cached = model.generate(seq[:, :6], 10, use_cache=True)
    uncached = model.generate(seq[:, :6], 10, use_cache=False)
    gs = torch.Generator().manual_seed(9)
    sampled = model.generate(seq[:, :6], 10, temperature=1.0, top_k=20, generator=gs)
    if torch.distributed.get_rank() == 0:
        torch.save({"full": full_logits, "incremental": inc_logits, "hidden": hidden,
                    "cached": cached, "uncached": uncached, "sampled": sampled},
                   out / f"decode.tp{tp}.pt")
    ps.destroy_model_parallel()


def run_bf16_checkpoint(out: Path, tp: int, pp: int) -> None:
    """bf16 params with fp32 main weights, then a checkpoint save and load (compat coverage)."""
    from palm.train import checkpoint

    parallel.init_distributed(tp, pp, torch.distributed.get_world_size() // (tp * pp))
    eng = Engine(CFG, OPTIM, train_steps=STEPS, micro_batch_size=MBS, num_microbatches=MICRO,
                 dtype=torch.bfloat16, seed=7)
    batches = random_batches(CFG, steps=2, num_microbatches=MICRO, micro_batch_size=MBS, seed=3)
    losses = [eng.train_step(step)["loss"] for step in batches]
    path = checkpoint.save(eng, out / "ckpt", step=2, meta={})
    checkpoint.load(eng, path)
    if torch.distributed.get_rank() == 0:
        (out / "bf16.json").write_text(json.dumps(losses))
    ps.destroy_model_parallel()


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for layout in argv[1:]:
        if layout.startswith("bf16"):
            _, tp, pp = layout.split(",")
            run_bf16_checkpoint(out, int(tp), int(pp))
            torch.distributed.barrier()
            continue
        if layout.startswith("decode"):
            run_decode(out, int(layout.split(",")[1]))
            torch.distributed.barrier()
            continue
        tp, pp, dp, vpp = (int(x) for x in layout.split(","))
        run_layout(out, tp, pp, dp, vpp)
        torch.distributed.barrier()
    from palm.megatron_compat import CALL_SITES

    (out / f"sites.rank{torch.distributed.get_rank()}.json").write_text(json.dumps(sorted(CALL_SITES)))
    parallel.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
