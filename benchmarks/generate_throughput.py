"""Generation throughput: this PaLM's KV-cached ``palm.decode.generate.generate`` against
``palm-rlhf-pytorch``'s ``PaLM.generate`` (the optional benchmark extra), one process, same run.

Config: d=256, 4 layers, 4 heads of 64, vocab 8192, prompts of 16 tokens, 256 new tokens, greedy
on both sides, fp32. The reference is given this model's weights (:func:`palm_rlhf_ref.port_weights`:
xPos off, the 1/sqrt(d) logit scale patched in), so both compute the same function and their
greedy tokens are compared as a check that the work is the same.

1. batch 1: one prompt.
2. batched: the same 16 prompts in one batch on both sides (their ``generate`` takes a batch of
   equal-length prompts; aggregate tokens/s = 16 x new tokens / wall time).

Theirs has no KV cache: each new token recomputes the whole sequence (and the logits of every
position), so its cost per token grows with the length and its run dominates this benchmark
(2-5 minutes measured on 2 shared cores). Ours is timed as the median of ``--reps`` runs, half
of them before theirs and half after (a shared host's speed drifts over the minute theirs takes:
both sides are then timed over the same stretch), theirs once per case unless ``--ref-reps``
says otherwise; ``--ref-new-tokens`` measures theirs over fewer tokens (cheaper per token for
them, as sequences stay shorter) and the output says so. Also printed: ours on 16 prompts of
lengths 1..16 (left-padded), which theirs cannot batch.

Also printed: the decoding plan that ``palm.decode.decoder.Decoder.plan`` measured for each case and how
long that took (once per process and size class, like the warm-up of theirs: outside the timed
runs), and the
batch-1 floor of any fp32 decoder at this size, measured on this machine: every weight matrix
times one row (in the fastest of the decoder's weight layouts), in a decoding step's
order with the output layer last (a step at batch 1 reads all 23.6 MB of fp32 weights, whatever
else it does), and the ratio against theirs that a decoder costing nothing else would reach.

The last line is ``ratio <batched ours / batched theirs>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from palm_rlhf_ref import port_weights, reference_palm  # noqa: E402

from palm.decode import layouts
from palm.decode.decoder import Decoder  # noqa: E402
from palm.decode.generate import generate  # noqa: E402
from palm.model import parallel  # noqa: E402
from palm.model.network import ModelConfig, PaLM  # noqa: E402

PROMPT, NEW, BATCH = 16, 256, 16
CFG = ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, ffn_mult=4.0,
                  seq_len=PROMPT + NEW)


def ours(model: PaLM, prompts: list[torch.Tensor], new: int) -> tuple[float, torch.Tensor]:
    """(seconds, response tokens ``[b, new]``) of one greedy generation."""
    t = time.perf_counter()
    out = generate(model, prompts, new)
    return time.perf_counter() - t, out.response


def theirs(ref: torch.nn.Module, prompts: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    # temperature 0 with no filter: their gumbel sampling reduces to argmax (greedy)
    out = ref.generate(prompts.shape[1] + new, prompt=prompts, temperature=0.0, filter_logits_fn=None)
    return time.perf_counter() - t, out


@torch.no_grad()
def weights_floor(model: PaLM, reps: int = 200) -> tuple[float, int]:
    """(seconds per token of the matrix-vector products alone, the median of ``reps`` steps, in
    the fastest of the layouts the decoder may hold its weights in (``layouts.LAYOUTS``); the
    bytes they read): each layer's weights, then the tied output layer, each times one row."""
    mats = [p.detach() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n]
    mats.append(model.shared_embedding_or_output_weight().detach())
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in mats}
    best = []
    for layout in layouts.LAYOUTS:
        held = [layouts.DecodeWeight(w, layout, 1) for w in mats]
        times = []
        with layouts.decode_threads(layouts.DecodePlan(torch.float32, layout)):
            for _ in range(reps + 20):
                t = time.perf_counter()
                for w, h in zip(mats, held):
                    h(rows[w.shape[1]])
                times.append(time.perf_counter() - t)
        best.append(statistics.median(times[20:]))
    return min(best), sum(w.numel() * w.element_size() for w in mats)


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=NEW)
    ap.add_argument("--reps", type=int, default=6,
                    help="timed runs of ours per case, half before theirs and half after (median; one lasts "
                         "1-2 s where one of theirs lasts minutes, and a shared host's speed drifts by up to "
                         "40 %% from second to second)")
    ap.add_argument("--ref-reps", type=int, default=1, help="timed runs of theirs per case (median)")
    ap.add_argument("--ref-new-tokens", type=int, default=0,
                    help="measure theirs over this many new tokens (0: as many as ours)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new, ref_new = args.new_tokens, args.ref_new_tokens or args.new_tokens
    parallel.init_distributed()
    torch.manual_seed(0)
    model = PaLM(CFG, seed=0).eval()
    ref = reference_palm(CFG)
    port_weights(ref, dict(model.named_parameters()), CFG)
    ref.eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, CFG.vocab_size, (BATCH, PROMPT), generator=g)
    ragged = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in range(1, 1 + BATCH)]  # fits: max PROMPT

    print(f"config: d={CFG.d_model} layers={CFG.n_layers} heads={CFG.n_heads}x{CFG.head_dim} "
          f"vocab={CFG.vocab_size} params={CFG.num_params() / 1e6:.2f}M prompt={PROMPT} new={new} "
          f"greedy fp32 threads={torch.get_num_threads()} torch={torch.__version__}; {load()}")
    if ref_new != new:
        print(f"NOTE: palm-rlhf-pytorch is measured over {ref_new} new tokens, ours over {new} "
              f"(theirs costs more per token the longer the sequence: this favours theirs)")

    results, ref_speed = {}, {}
    for name, b in (("batch 1", 1), (f"batched {BATCH}", BATCH)):
        rows = [p for p in prompts[:b]]
        t = time.perf_counter()
        plan = Decoder.plan(model, b, PROMPT + new)  # measured once per process and size class
        planned = time.perf_counter() - t
        ours(model, rows, 8)  # warm-ups at this batch size (first-call allocations), both sides
        theirs(ref, prompts[:b], 2)
        runs = [ours(model, rows, new) for _ in range(args.reps // 2)]
        ref_runs = [theirs(ref, prompts[:b], ref_new) for _ in range(args.ref_reps)]
        runs += [ours(model, rows, new) for _ in range(args.reps - args.reps // 2)]
        ours_tps = b * new / statistics.median(t for t, _ in runs)
        ref_tps = b * ref_new / statistics.median(t for t, _ in ref_runs)
        k = min(new, ref_new)
        same = (runs[0][1][:, :k] == ref_runs[0][1][:, :k]).float().mean().item()
        results[name], ref_speed[name] = ours_tps / ref_tps, ref_tps
        print(f"{name:11s} decoding plan measured here: {plan} (in {planned:.2f} s)")
        print(f"{name:11s} ours {ours_tps:8.1f} tok/s (reps before and after theirs: "
              f"{', '.join(f'{b * new / t:.0f}' for t, _ in runs)})"
              f"   palm-rlhf-pytorch {ref_tps:7.1f} tok/s ({', '.join(f'{t:.1f}' for t, _ in ref_runs)} s)"
              f"   {results[name]:6.1f}x   greedy tokens identical: {same:.1%}   {load()}")
    floor, read = weights_floor(model)
    print(f"batch 1 floor (fp32 weights streamed once per token, nothing else): {floor * 1e3:.2f} ms a token, "
          f"{read / 1e6:.1f} MB at {read / 1e9 / floor:.1f} GB/s, at most {1 / floor:.0f} tok/s = "
          f"{1 / floor / ref_speed['batch 1']:.1f}x theirs")
    t, _ = ours(model, ragged, new)
    print(f"ours, {BATCH} prompts of lengths 1..{BATCH} (left-padded, no reference): "
          f"{BATCH * new / t:.1f} tok/s")
    parallel.teardown()
    print(f"ratio {results[f'batched {BATCH}']:.3f}")


if __name__ == "__main__":
    main()
