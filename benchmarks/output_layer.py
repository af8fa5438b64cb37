"""The output layer's loss: :class:`palm.model.network.TileNLL` against plain autograd through
``vocab_logsumexp`` + ``vocab_pick`` (what the model did before), inside the whole default
training step (d=256, 4 layers, vocab 8192, seq 256, batch 8, fp32 unless --bf16), one process.

Two engines with the same weights train on the same batches in interleaved repetitions (A B A B
...), so drift of the machine hits both alike; each variant's step time is its median. The losses
of the two must agree (printed). The last line is ``ratio <autograd step / tile step>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm.model import network as palm_model  # noqa: E402
from palm.model import parallel
from palm.model.network import ModelConfig, PaLM  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402
from palm.train.pretrain import lm_forward_step  # noqa: E402

CFG = ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, ffn_mult=4.0, seq_len=256)
TILE = PaLM.token_nll


def autograd_nll(self: PaLM, x: torch.Tensor, labels: torch.Tensor):
    """The baseline: the same tiles, differentiated by autograd."""
    per = max(1, palm_model.LOSS_CHUNK_TOKENS // x.shape[1])
    nll, logz = [], []
    for xc, lc in zip(x.split(per), labels.split(per)):
        logits = self.logits(xc).float()
        lz = parallel.vocab_logsumexp(logits)
        nll.append(lz - parallel.vocab_pick(logits, lc))
        logz.append(lz)
    return torch.cat(nll), torch.cat(logz)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per repetition")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    parallel.init_distributed()
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.1, clip_grad=1.0)
    batches = random_batches(CFG, steps=4, num_microbatches=1, micro_batch_size=8, seed=1)
    variants = {name: (Engine(CFG, optim, forward_step=lm_forward_step(1e-4), train_steps=1000, micro_batch_size=8,
                              dtype=dtype, seed=0), fn)
                for name, fn in (("autograd", autograd_nll), ("tile", TILE))}
    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    for name, (engine, fn) in variants.items():  # warm-up
        PaLM.token_nll = fn
        losses[name].append(engine.train_step(batches[0])["loss"])
    for _ in range(args.reps):
        for name, (engine, fn) in variants.items():
            PaLM.token_nll = fn
            t = time.perf_counter()
            for i in range(args.steps):
                losses[name].append(engine.train_step(batches[(len(losses[name])) % 4])["loss"])
            times[name].append((time.perf_counter() - t) / args.steps)
    PaLM.token_nll = TILE
    print(f"threads={torch.get_num_threads()} dtype={dtype} torch={torch.__version__}")
    for name, t in times.items():
        print(f"{name:9s} step {statistics.median(t):.3f} s (median of {len(t)}: {', '.join(f'{x:.2f}' for x in t)})")
    diff = max(abs(a - b) for a, b in zip(losses["autograd"], losses["tile"]))
    print(f"largest loss difference over {len(losses['tile'])} steps: {diff:.2e}")
    print(f"ratio {statistics.median(times['autograd']) / statistics.median(times['tile']):.3f}")


if __name__ == "__main__":
    main()
