"""Parallel-layout runs for tests/test_parallel_numerics.py (launched by torchrun, or in-process).

Each layout trains the same tiny PaLM from the same initial weights on the same micro-batches and
saves, per rank, its losses, its parameters after training and its gradients of the first step
(full tensors: TP shards are gathered; each pipeline stage saves the blocks it holds).
Usage: ``torchrun --standalone --nproc-per-node N parity_worker.py OUT LAYOUT [LAYOUT ...]`` where
LAYOUT is ``tp,pp,dp,vpp`` (``tp,pp,dp,vpp,mask``: random loss masks that differ between
micro-batches and DP ranks), ``decode,tp`` (KV-cache and hidden-state checks), ``fwd,tp,pp``
(``Engine.forward``'s per-token log-probs), ``reward,tp,pp`` (the reward model: PaLM + scalar
head, pairwise loss on variable-length right-padded pairs) or ``naive`` (the masked reference computed directly:
one process, one backward of the per-token mean over all valid tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from megatron.core import parallel_state as ps  # noqa: E402
from helpers import full  # noqa: E402

from palm.decode import layouts
from palm.decode.cache import new_cache
from palm.model import parallel  # noqa: E402
from palm.model.network import ModelConfig  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402
from palm.train.pretrain import lm_forward_step  # noqa: E402

CFG = ModelConfig(vocab_size=250, d_model=64, n_layers=4, n_heads=4, head_dim=16, seq_len=32)
OPTIM = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, clip_grad=1.0)
MUON = OptimConfig(name="muon", schedule="wsd", lr=3e-3, min_lr=3e-4, warmup_steps=1, clip_grad=1.0)
STEPS, MICRO, MBS = 3, 4, 2  # optimizer steps, micro-batches per step (all DP ranks), batch size
Z_LOSS = 1e-4
MASK_KEEP = 0.5  # masked layouts: micro-batch j keeps about 0.25 .. 0.75 of its tokens


def batches_for(masked: bool, steps: int = STEPS):
    return random_batches(CFG, steps=steps, num_microbatches=MICRO, micro_batch_size=MBS, seed=3,
                          mask_keep=MASK_KEEP if masked else None)


def run_layout(out: Path, tp: int, pp: int, dp: int, vpp: int, masked: bool = False, muon: bool = False) -> None:
    parallel.init_distributed(tp, pp, dp, vpp)
    micro = MICRO // dp
    eng = Engine(CFG, MUON if muon else OPTIM, forward_step=lm_forward_step(Z_LOSS), train_steps=STEPS,
                 micro_batch_size=MBS, num_microbatches=micro, seed=7)
    r = ps.get_data_parallel_rank()
    losses, grads = [], {}
    for i, step in enumerate(batches_for(masked)):
        losses.append(eng.train_step(step[r * micro:(r + 1) * micro])["loss"])
        if i == 0:
            grads = {n: full(p.main_grad, p) for n, p in eng.named_parameters()}
    weights = {n: full(p, p) for n, p in eng.named_parameters()}
    save_layout(out, f"{tp},{pp},{dp},{vpp}" + (",mask" if masked else "") + (",muon" if muon else ""),
                losses, grads, weights)
    ps.destroy_model_parallel()


def save_layout(out: Path, name: str, losses, grads, weights) -> None:
    rank = torch.distributed.get_rank()
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save({"losses": losses, "grads": grads, "weights": weights}, out / f"{name}.rank{rank}.pt")
    if rank == 0:
        (out / f"{name}.done").write_text(json.dumps(losses))


def run_naive(out: Path) -> None:
    """The masked reference without the engine: the first step's loss and gradients of the
    per-token mean over every valid token of all micro-batches, in one plain backward."""
    from palm.model.network import PaLM

    parallel.init_distributed()
    model = PaLM(CFG, seed=7)
    step = batches_for(True)[0]
    total = torch.zeros(())
    count = sum(b["loss_mask"].sum() for b in step)
    for b in step:
        nll, logz = model(b["tokens"], labels=b["labels"])
        total = total + ((nll + Z_LOSS * logz.square()) * b["loss_mask"]).sum()
    loss = total / count
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    torch.save({"loss": loss.item(), "grads": grads}, out / "naive.pt")
    ps.destroy_model_parallel()


def run_forward(out: Path, tp: int, pp: int) -> None:
    """``Engine.forward``: per-token log-probs of the labels from the last stage, on every rank."""
    parallel.init_distributed(tp, pp, torch.distributed.get_world_size() // (tp * pp))
    eng = Engine(CFG, None, micro_batch_size=MBS, num_microbatches=MICRO, seed=7)

    def logprobs(batch, model):
        return model(batch["tokens"], labels=batch["labels"]), lambda out: {"logprobs": -out[0]}

    got = eng.forward(batches_for(False)[0], logprobs)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1 or torch.distributed.get_rank() == 0:
        torch.save(torch.cat([d["logprobs"] for d in got]), out / f"fwd.{tp},{pp}.rank{torch.distributed.get_rank()}.pt")
    ps.destroy_model_parallel()


def reward_batches(steps: int = STEPS):
    """Pairs of random prompts and replies of different lengths, ``MBS`` pairs per micro-batch."""
    from palm.train.reward import pair_batch

    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    length = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    return [[pair_batch([{"prompt_ids": ids(length(2, 12)), "chosen_ids": ids(length(1, 20)),
                          "rejected_ids": ids(length(1, 20))} for _ in range(MBS)], CFG.seq_len)
             for _ in range(MICRO)] for _ in range(steps)]


def run_reward(out: Path, tp: int, pp: int) -> None:
    """The reward model trained 3 steps; its per-sequence rewards on the first step's batches."""
    from palm.train.reward import reward_forward_step
    from palm.model.reward import RewardModel, read_rewards

    parallel.init_distributed(tp, pp, torch.distributed.get_world_size() // (tp * pp))
    eng = Engine(CFG, OPTIM, forward_step=reward_forward_step(0.1), chunk=RewardModel, train_steps=STEPS,
                 micro_batch_size=2 * MBS, num_microbatches=MICRO, seed=7)
    batches = reward_batches()

    def rewards(batch, model):
        return model(batch["tokens"]), lambda values: {"reward": read_rewards(values, batch["last"])}

    before = torch.cat([d["reward"] for d in eng.forward(batches[0], rewards)])
    losses, grads = [], {}
    for i, step in enumerate(batches):
        stats = eng.train_step(step)
        losses.append(stats["loss"])
        if i == 0:
            grads = {n: full(p.main_grad, p) for n, p in eng.named_parameters()}
            accuracy = stats["accuracy"]
    weights = {n: full(p, p) for n, p in eng.named_parameters()}
    weights["rewards_before"] = before  # not a parameter: compared the same way
    save_layout(out, f"reward.{tp},{pp}", losses + [accuracy], grads, weights)
    ps.destroy_model_parallel()


def run_decode(out: Path, tp: int) -> None:
    """KV-cached decoding (the model's own path and the fused :class:`Decoder`) against full
    recomputation, generation of a left-padded batch (greedy cached and uncached, and sampled
    with its log-probs against one full forward pass per row), and hidden states, at TP=``tp``."""
    from palm.decode.decoder import Decoder
    from palm.decode.generate import generate
    from palm.model.network import PaLM
    from palm.model.parallel import gather_vocab

    parallel.init_distributed(tp, 1, torch.distributed.get_world_size() // tp)
    model = PaLM(CFG, seed=7).eval()
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, CFG.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        full_logits = gather_vocab(model(seq))  # [b, s, V]
        cache = new_cache(model, 2)
        steps = [model(seq[:, :12], cache=cache)]  # a prompt of 12, then one token at a time
        for i in range(12, 20):
            steps.append(model(seq[:, i:i + 1], cache=cache))
        inc_logits = gather_vocab(torch.cat(steps, dim=1))
        decoder = Decoder(model, new_cache(model, 2))  # the same, through the fused decoding pass
        fused = [decoder(seq[:, :12])] + [decoder(seq[:, i:i + 1]) for i in range(12, 20)]
        fused_logits = gather_vocab(torch.stack(fused, dim=1))  # [b, 9, V]: positions 11..19
        by_layout = {}  # every way the decoder may hold its weights (the plan's choice differs per CPU)
        for layout in layouts.LAYOUTS[1:]:
            plan = layouts.DecodePlan(torch.float32, layout)
            decoder = Decoder(model, new_cache(model, 2), plan)
            with layouts.decode_threads(plan):
                steps = [decoder(seq[:, :12])] + [decoder(seq[:, i:i + 1]) for i in range(12, 20)]
            by_layout[layout] = gather_vocab(torch.stack(steps, dim=1))
        hidden = model.hidden_states(seq)
    prompts = [seq[0, :6], seq[1, :3]]  # different lengths: row 1 is left-padded by 3
    cached = generate(model, prompts, 10)
    uncached = generate(model, prompts, 10, use_cache=False)
    gs = torch.Generator().manual_seed(9)
    sampled = generate(model, prompts, 10, temperature=1.0, top_k=20, top_p=0.9, generator=gs)
    full_raw = []  # the raw log-probs of the sampled tokens from one forward pass per row, unpadded
    with torch.no_grad():
        for r in range(2):
            row = sampled.tokens[r, sampled.pad[r]:]
            lp = gather_vocab(model(row[None]))[0, :, :CFG.vocab_size].float().log_softmax(-1)
            start = sampled.prompt_len - int(sampled.pad[r])  # the first response token's index in row
            full_raw.append(lp[start - 1:-1].gather(-1, row[start:, None]).squeeze(-1))
    rank = torch.distributed.get_rank()
    torch.save({"cached": cached.tokens, "sampled": sampled.tokens}, out / f"decode.tp{tp}.tokens.rank{rank}.pt")
    if rank == 0:
        torch.save({"full": full_logits, "incremental": inc_logits, "fused": fused_logits, "hidden": hidden,
                    "layouts": by_layout,
                    "cached": cached.tokens, "uncached": uncached.tokens, "sampled": sampled.tokens,
                    "sampled_raw": sampled.raw_logprobs, "sampled_logp": sampled.logprobs,
                    "full_raw": torch.stack(full_raw)},
                   out / f"decode.tp{tp}.pt")
    ps.destroy_model_parallel()


def run_bf16_checkpoint(out: Path, tp: int, pp: int) -> None:
    """bf16 params with fp32 main weights, then a checkpoint save and load (compat coverage)."""
    from palm.train import checkpoint

    parallel.init_distributed(tp, pp, torch.distributed.get_world_size() // (tp * pp))
    eng = Engine(CFG, OPTIM, forward_step=lm_forward_step(Z_LOSS), train_steps=STEPS,
                 micro_batch_size=MBS, num_microbatches=MICRO, dtype=torch.bfloat16, seed=7)
    batches = batches_for(False, steps=2)
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
        if layout.startswith("fwd"):
            _, tp, pp = layout.split(",")
            run_forward(out, int(tp), int(pp))
            torch.distributed.barrier()
            continue
        if layout.startswith("reward"):
            _, tp, pp = layout.split(",")
            run_reward(out, int(tp), int(pp))
            torch.distributed.barrier()
            continue
        if layout == "naive":
            run_naive(out)
            continue
        tp, pp, dp, vpp, *flags = layout.split(",")
        run_layout(out, int(tp), int(pp), int(dp), int(vpp), masked="mask" in flags, muon="muon" in flags)
        torch.distributed.barrier()
    from palm.model.megatron_compat import CALL_SITES

    (out / f"sites.rank{torch.distributed.get_rank()}.json").write_text(json.dumps(sorted(CALL_SITES)))
    parallel.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
