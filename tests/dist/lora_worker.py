"""LoRA at TP=1 and TP=2 for tests/test_lora.py (launched in-process for TP=1, by torchrun for TP=2).

Usage: ``[torchrun --standalone --nproc-per-node 2] lora_worker.py OUT TP``. At TP=``tp`` a tiny
PaLM with adapters on every targeted linear (``B`` drawn whole from one seed, then split, so both
layouts start from the same nonzero adapters) trains 3 steps; saved: the losses, the first step's
gradients and the weights after (TP shards gathered), the logits of the no-grad decoding path and
greedy generation (the adapters must be in both), the per-token log-probs of the engine with its
adapters off and of the plain base model, and a checkpoint written at TP=2 read back at TP=1.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from megatron.core import parallel_state as ps  # noqa: E402

from palm.model import lora, parallel  # noqa: E402
from helpers import full  # noqa: E402
from palm.model.network import ModelConfig  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402
from palm.train.pretrain import lm_forward_step  # noqa: E402

CFG = ModelConfig(vocab_size=250, d_model=64, n_layers=2, n_heads=4, head_dim=16, seq_len=32)
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
OPTIM = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, clip_grad=1.0)
STEPS, MICRO, MBS = 3, 2, 2


def nonzero_b(chunks: list[torch.nn.Module]) -> None:
    """Every adapter's ``B`` drawn whole from a seed per name and split like the layer: with ``B = 0``
    the first step's ``A`` gradients would be zero and prove nothing."""
    tp, rank = parallel.tp_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                if name.endswith(".lora.b"):
                    shape = list(p.shape)
                    split = getattr(p, "tensor_model_parallel", False)
                    if split:
                        shape[p.partition_dim] *= tp
                    g = torch.Generator().manual_seed(parallel.init_seed(99, name))
                    b = torch.randn(shape, generator=g) * 0.1
                    p.copy_(b.chunk(tp, dim=p.partition_dim)[rank] if split else b)


def logprobs(batch, model):
    return model(batch["tokens"], labels=batch["labels"]), lambda out: {"logp": -out[0]}


def main(out: Path, tp: int) -> None:
    from palm.decode.cache import new_cache
    from palm.decode.decoder import Decoder
    from palm.decode.generate import generate
    from palm.train import checkpoint

    torch.manual_seed(0)  # every rank's generators alike, as a training worker's (the checkpoint's RNG state)
    random.seed(0)
    np.random.seed(0)
    parallel.init_distributed(tp)
    rank = torch.distributed.get_rank()
    eng = Engine(CFG, OPTIM, forward_step=lm_forward_step(0.0), train_steps=STEPS, micro_batch_size=MBS,
                 num_microbatches=MICRO, seed=7, lora=LORA)
    nonzero_b(eng.chunks)
    batches = random_batches(CFG, steps=STEPS, num_microbatches=MICRO, micro_batch_size=MBS, seed=3)
    off = torch.cat([d["logp"] for d in lora.AdaptersOff(eng).forward(batches[0], logprobs)])
    on = torch.cat([d["logp"] for d in eng.forward(batches[0], logprobs)])
    base = Engine(CFG, None, micro_batch_size=MBS, num_microbatches=MICRO, seed=7)  # the same seed: the parent
    plain = torch.cat([d["logp"] for d in base.forward(batches[0], logprobs)])
    model = eng.chunks[0]
    seq = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.eval()
        nograd = parallel.gather_vocab(model(seq))  # the layers' plain-matmul path
        decoder = Decoder(model, new_cache(model, 2))
        fused = parallel.gather_vocab(decoder(seq))  # the fused decoder: the last position
        with lora.adapters_off([model]):
            nograd_off = parallel.gather_vocab(model(seq))
        model.train()
    greedy = generate(model, [seq[0, :5], seq[1, :3]], 8).tokens
    losses, grads = [], {}
    for i, step in enumerate(batches):
        losses.append(eng.train_step(step)["loss"])
        if i == 0:
            grads = {n: full(p.main_grad, p) for n, p in eng.named_parameters() if p.requires_grad}
    weights = {n: full(p, p) for n, p in eng.named_parameters()}
    if tp > 1:
        checkpoint.save(eng, out / "ckpt", step=STEPS, meta={})
    if rank == 0:
        torch.save({"losses": losses, "grads": grads, "weights": weights, "off": off, "on": on, "plain": plain,
                    "nograd": nograd, "nograd_off": nograd_off, "fused": fused, "greedy": greedy,
                    "trainable": sorted(n for n, p in eng.named_parameters() if p.requires_grad)},
                   out / f"tp{tp}.pt")
    ps.destroy_model_parallel()
    if tp == 1 and (out / "ckpt").is_dir():  # the TP=2 checkpoint, read at TP=1
        parallel.init_distributed(1)
        fresh = Engine(CFG, OPTIM, forward_step=lm_forward_step(0.0), train_steps=STEPS, micro_batch_size=MBS,
                       num_microbatches=MICRO, seed=8, lora=LORA)
        checkpoint.load(fresh, checkpoint.latest(out / "ckpt"))
        torch.save({n: p.detach().clone() for n, p in fresh.named_parameters()}, out / "resharded.pt")
        ps.destroy_model_parallel()
    parallel.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
