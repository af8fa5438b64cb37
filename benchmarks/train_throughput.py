"""Training throughput: this PaLM (megatron-core layers, schedule, DDP, optimizer) against
``palm-rlhf-pytorch``'s ``PaLM`` (the optional benchmark extra), one process, same run.

Config: d=256, 4 layers, 4 heads of 64, vocab 8192, seq 256, batch 8. Each "step" is a full
training step (forward, backward, AdamW update) on the same random tokens. Variants run in
interleaved repetitions (A B C ... A B C ...) so drift of the machine hits all alike; a
variant's tokens/s is its median over repetitions.

1. Loss agreement: the reference is given this model's initial weights (xPos turned off and the
   logit scale 1/sqrt(d) patched in, so the two compute the same function) and both train a few
   steps with the same AdamW settings; the losses are printed side by side and must agree.
2. fp32 against fp32, then each one's best CPU setting against the other's: here bf16 params
   with fp32 main weights (megatron mixed precision); for the reference the best of fp32, its
   ``flash_attn`` (SDPA) path, and bf16 autocast.
3. A profile of this model's step (top ops) and MFU against a measured matmul peak.

bf16 variants run only where the dtype probe (``palm.train.metrics.bf16_is_fast``, the same one
``dtype: auto`` uses) shows bf16 matmul native; on an AVX2-only CPU they are skipped, and the
benchmark says so (there they would take tens of minutes on torch's slow bf16 path).

The last line is ``ratio <best-against-best>``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from palm_rlhf_ref import port_weights, reference_palm  # noqa: E402

from palm.model import parallel  # noqa: E402
from palm.model.network import ModelConfig  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402
from palm.train.metrics import bf16_is_fast, matmul_peak_flops  # noqa: E402
from palm.train.pretrain import lm_forward_step  # noqa: E402

CFG = ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, ffn_mult=4.0,
                  seq_len=256)
BATCH = 8
OPTIM = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0, clip_grad=0.0)


# --- the two models -------------------------------------------------------------------------------

class Ours:
    def __init__(self, dtype: torch.dtype):
        # no z-loss: the reference has none, so both optimise the same loss
        self.engine = Engine(CFG, OPTIM, forward_step=lm_forward_step(0.0), train_steps=1000,
                             micro_batch_size=BATCH, num_microbatches=1, dtype=dtype, seed=0)

    def step(self, tokens: torch.Tensor) -> float:  # tokens [b, s+1], as the reference takes them
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(BATCH, CFG.seq_len)}
        return self.engine.train_step([batch])["loss"]


class Reference:
    def __init__(self, flash: bool = False, autocast: bool = False, port_from: Engine | None = None):
        self.model = reference_palm(CFG, flash=flash)
        if port_from is not None:  # same function as ours: our weights, plain RoPE, 1/sqrt(d) logits
            port_weights(self.model, dict(port_from.named_parameters()), CFG)
        self.autocast = autocast
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2),
                                     eps=OPTIM.eps, weight_decay=0.0)

    def step(self, tokens: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = self.model(tokens, return_loss=True)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


# --- measurement ----------------------------------------------------------------------------------

def tokens_per_s(model, batches: list[torch.Tensor], steps: int) -> float:
    t = time.perf_counter()
    for i in range(steps):
        model.step(batches[i % len(batches)])
    return steps * BATCH * CFG.seq_len / (time.perf_counter() - t)


def profile(model, tokens: torch.Tensor, top: int = 8) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    model.step(tokens)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        model.step(tokens)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per repetition")
    ap.add_argument("--agree-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parallel.init_distributed()
    batches = [torch.cat([b[0]["tokens"], b[0]["labels"][:, -1:]], dim=1)
               for b in random_batches(CFG, steps=4, num_microbatches=1, micro_batch_size=BATCH, seed=1)]
    native_bf16 = bf16_is_fast()

    print(f"config: d={CFG.d_model} layers={CFG.n_layers} heads={CFG.n_heads}x{CFG.head_dim} "
          f"vocab={CFG.vocab_size} seq={CFG.seq_len} batch={BATCH} params={CFG.num_params() / 1e6:.2f}M "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")

    # 1. the two compute the same function and train alike
    ours = Ours(torch.float32)
    ref = Reference(port_from=ours.engine)
    la = [ours.step(batches[i]) for i in range(args.agree_steps)]
    lb = [ref.step(batches[i]) for i in range(args.agree_steps)]
    print("loss agreement (same weights, same batches, AdamW):")
    for i, (a, b) in enumerate(zip(la, lb)):
        print(f"  step {i}: ours {a:.6f}  palm-rlhf-pytorch {b:.6f}  |diff| {abs(a - b):.2e}")
    agree = all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(la, lb))
    print(f"  agree within 1e-3 relative: {agree}")
    del ours, ref

    # 2. interleaved throughput
    variants = {"ours fp32": Ours(torch.float32), "ref fp32": Reference(),
                "ref fp32 flash_attn": Reference(flash=True)}
    if native_bf16:
        variants["ours bf16 (megatron mixed precision)"] = Ours(torch.bfloat16)
        variants["ref bf16 autocast flash_attn"] = Reference(flash=True, autocast=True)
    else:
        print("skipped: the bf16 variants (the dtype probe shows no native bf16 matmul on this CPU: "
              "torch's slow path would take tens of minutes; dtype: auto trains in fp32 here)")
    for v in variants.values():  # warm up
        v.step(batches[0])
        v.step(batches[1])
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, v in variants.items():
            results[name].append(tokens_per_s(v, batches, args.steps))
    med = {k: statistics.median(v) for k, v in results.items()}
    print("tokens/s (median of interleaved repetitions):")
    for k, v in med.items():
        print(f"  {k:40s} {v:9.0f}   reps: {', '.join(f'{x:.0f}' for x in results[k])}")
    ours_best = max((k for k in med if k.startswith("ours")), key=med.get)
    ref_best = max((k for k in med if k.startswith("ref")), key=med.get)

    # 3. MFU and profile
    flops = CFG.flops_per_token()
    peak32 = matmul_peak_flops(torch.float32)
    peak16 = matmul_peak_flops(torch.bfloat16) if native_bf16 else float("nan")
    print(f"measured matmul peak: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s; "
          f"model {flops / 1e6:.1f} MFLOP/token")
    for k in med:
        peak = peak16 if "bf16" in k else peak32
        print(f"  MFU {k:40s} {med[k] * flops / peak:6.1%}")
    if not args.no_profile:
        print(f"profile of one step, {ours_best}:")
        print(profile(variants[ours_best], batches[0]))
    print(f"fp32 vs fp32: {med['ours fp32'] / med['ref fp32']:.2f}x")
    print(f"best vs best: {ours_best} vs {ref_best}")
    parallel.teardown()
    print(f"ratio {med[ours_best] / med[ref_best]:.3f}")


if __name__ == "__main__":
    main()
