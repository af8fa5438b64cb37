"""PPO throughput: one PPO iteration of ``palm.train.rlhf`` (rollouts for 16 prompts x 64 new
tokens, then the update) against ``palm-rlhf-pytorch``'s ``RLHFTrainer`` doing the same amount of
work (the optional benchmark extra), one process, same run.

Config: d=256, 4 layers, 4 heads of 64, vocab 8192, prompts of 16 random tokens, 64 new tokens
sampled at temperature 1 (no stop token, so every response is 64 tokens on both sides), fp32.

- ours: :func:`palm.train.rlhf.iteration` with 16 prompts, one PPO epoch over one mini-batch of
  16 (one optimizer step of the actor and one of the critic). It does more than theirs: the
  frozen reference model's forward (the KL penalty), GAE and whitening. That forward is also
  timed alone on a batch of the iteration's shape, and the ratio without it is printed too (the
  same work as theirs, up to GAE and whitening, which cost little).
- theirs: ``RLHFTrainer.train(num_episodes=1, max_timesteps=16, update_timesteps=16)``: 16
  rollouts (one prompt at a time, as it samples; no KV cache) scored by their reward model, then
  ``learn`` over one mini-batch of 16 with one epoch; full fine-tuning (LoRA off) so both sides
  update every weight of the actor and the critic. No reference model (it has none).

Ours is timed as the median of ``--reps`` iterations after a warm-up (a few seconds each), theirs
once after a warm-up (half a minute or more on 2 cores). ``--profile`` also profiles one
iteration of ours and prints its matmuls: the FLOPs counted from the shapes, their share of the
operators' time and their rate, by shape (where the time goes, against the hardware's peak).
Without the extra installed, the reference is skipped with a message and only ours is reported.
The last line is ``ratio <theirs seconds / ours seconds>`` (the whole iteration, reference forward included).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm.core.config import to_dict  # noqa: E402
from palm.model import parallel  # noqa: E402
from palm.model.network import ModelConfig, PaLM  # noqa: E402
from palm.train.engine import Engine, OptimConfig  # noqa: E402
from palm.train.rlhf import KLConfig, PPOConfig, build_roles, iteration  # noqa: E402
from palm.train.rlhf.steps import reference_step, reward_model_scorer  # noqa: E402

PROMPTS, PROMPT, NEW = 16, 16, 64
CFG = ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, ffn_mult=4.0, seq_len=PROMPT + NEW)
PPO = PPOConfig(train_steps=1, micro_batch_size=PROMPTS, prompts_per_rollout=PROMPTS, max_new_tokens=NEW,
                ppo_epochs=1, dtype="fp32", kl=KLConfig(coef=0.05), kl_bound=10.0,
                optim=OptimConfig(lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0),
                critic_optim=OptimConfig(lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0))


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_flops(name: str, shapes: list) -> int:
    """Multiply-adds x 2 of one ``mm`` / ``bmm`` / ``baddbmm`` call from the profiler's input shapes."""
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2 * m * k * n
    a, w = shapes[:2] if name == "aten::bmm" else shapes[1:3]  # baddbmm: (self, batch1, batch2, ...)
    (b, m, k), (_, _, n) = a, w
    return 2 * b * m * k * n


def matmul_profile(run: Callable[[], object]) -> None:
    """Profile one call of ``run`` and print how much of it is matmuls: the FLOPs (every GEMM,
    counted from its shapes), their time and rate, and the busiest shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6  # every operator's own time
    rows = [(e.self_cpu_time_total / 1e6, e.count * matmul_flops(e.key, e.input_shapes), e.count, e.input_shapes)
            for e in events if e.key in ("aten::mm", "aten::bmm", "aten::baddbmm") and e.input_shapes]
    seconds, flops = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"profile of one iteration of ours (operators {total:.2f} s under the profiler): matmuls "
          f"{flops / 1e9:.1f} GFLOP in {seconds:.3f} s ({seconds / total:.0%} of the operators' time, "
          f"{flops / seconds / 1e9:.0f} GFLOP/s on average); the busiest shapes:")
    for sec, fl, count, shapes in sorted(rows, key=lambda r: -r[0])[:8]:
        print(f"  {sec * 1e3:7.1f} ms {fl / sec / 1e9:6.1f} GFLOP/s  {count:4d} x {shapes}")


def ours(prompts: torch.Tensor, reps: int, profile: bool = False) -> tuple[float, float]:
    from palm.model.weights import export_safetensors
    from palm.train.finetune import load_parent
    from palm.model.reward import RewardModel

    with tempfile.TemporaryDirectory() as tmp:
        policy, reward = Path(tmp) / "policy", Path(tmp) / "reward"
        for folder, net in ((policy, PaLM(CFG, seed=0)), (reward, RewardModel(CFG, seed=1))):
            export_safetensors(net, folder, {"model": to_dict(CFG)})
        scoring = Engine(CFG, None, chunk=RewardModel, micro_batch_size=PROMPTS)
        load_parent(scoring, reward)
        roles = build_roles(PPO, CFG, policy=policy, critic_from=reward,
                            scorer=reward_model_scorer(scoring, 0.0, 1.0, PROMPTS))
    rows = [p.tolist() for p in prompts]

    def once(seed: int) -> tuple[float, dict]:
        t = time.perf_counter()
        stats, _ = iteration(roles, PPO, rows, kl_coef=0.05, end_id=-1,  # no stop token: 64 tokens each
                             generator=torch.Generator().manual_seed(seed), shuffle_seed=lambda e: seed)
        return time.perf_counter() - t, stats

    def reference_forward() -> float:  # the work theirs lacks, on a batch of the iteration's shape
        g = torch.Generator().manual_seed(2)
        batch = {"tokens": torch.randint(1, CFG.vocab_size, (PROMPTS, PROMPT + NEW - 1), generator=g),
                 "labels": torch.randint(1, CFG.vocab_size, (PROMPTS, PROMPT + NEW - 1), generator=g),
                 "index": (PROMPT - 1 + torch.arange(NEW)).expand(PROMPTS, -1).contiguous()}
        t = time.perf_counter()
        roles.reference.forward([batch], reference_step)
        return time.perf_counter() - t

    once(0)  # warm-up
    reference_forward()
    if profile:
        matmul_profile(lambda: once(99))
    runs = sorted((once(1 + i) for i in range(reps)), key=lambda r: r[0])
    seconds, stats = runs[len(runs) // 2]
    ref = sorted(reference_forward() for _ in range(reps))[reps // 2]
    print(f"ours: {seconds:.2f} s, the median of {', '.join(f'{t:.2f}' for t, _ in runs)} "
          f"(rollout {stats['rollout_s']:.2f} s at {stats['generate_tokens_per_s']:.0f} "
          f"tok/s, update {stats['update_s']:.2f} s, {stats['updates']:.0f} optimizer step per role; "
          f"mean response {stats['response_length']:.0f} tokens; of it the reference model's forward "
          f"{ref:.3f} s, median of {reps})   {load()}")
    return seconds, ref


def theirs(prompts: torch.Tensor) -> float | None:
    try:
        from palm_rlhf_pytorch import PaLM as TheirPaLM
        from palm_rlhf_pytorch import RewardModel, RLHFTrainer
    except ImportError as err:
        print(f"palm-rlhf-pytorch not installed ({err}); skipping the reference "
              "(pip install -r requirements-bench.txt -c requirements.lock)")
        return None
    torch.manual_seed(0)
    palm = TheirPaLM(num_tokens=CFG.vocab_size, dim=CFG.d_model, depth=CFG.n_layers, dim_head=CFG.head_dim,
                     heads=CFG.n_heads, ff_mult=int(CFG.ffn_mult))
    reward_model = RewardModel(palm, num_binned_output=5)
    # token 0 is their padding value: keep it out of the prompts (ours are the same prompts)
    trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompts, actor_lora=False,
                          critic_lora=False, minibatch_size=PROMPTS, epochs=1)

    def once(steps: int) -> float:
        t = time.perf_counter()
        trainer.train(num_episodes=1, max_timesteps=steps, update_timesteps=steps, max_batch_size=PROMPTS,
                      max_seq_len=PROMPT + NEW, eos_token=None)
        return time.perf_counter() - t

    once(2)  # warm-up
    seconds = once(PROMPTS)
    print(f"palm-rlhf-pytorch RLHFTrainer: {seconds:.2f} s ({PROMPTS} rollouts of {NEW} tokens one at a time, "
          f"no KV cache, then one epoch of learn over one mini-batch of {PROMPTS})   {load()}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--reps", type=int, default=3, help="timed iterations of ours (median)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one iteration of ours: matmul FLOPs, time and rate by shape")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parallel.init_distributed()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, CFG.vocab_size, (PROMPTS, PROMPT), generator=g)
    print(f"config: d={CFG.d_model} layers={CFG.n_layers} heads={CFG.n_heads}x{CFG.head_dim} vocab={CFG.vocab_size} "
          f"params={CFG.num_params() / 1e6:.2f}M; {PROMPTS} prompts of {PROMPT} tokens x {NEW} new tokens, "
          f"temperature 1, fp32, threads={torch.get_num_threads()} torch={torch.__version__}; {load()}")
    mine, reference = ours(prompts, args.reps, args.profile)
    parallel.teardown()
    ref = theirs(prompts)
    if ref is None:
        print(f"ours alone: {mine:.2f} s per PPO iteration")
        print("ratio nan")
        return
    print(f"the same work as theirs (ours less its reference model's forward, {mine - reference:.2f} s): "
          f"{ref / (mine - reference):.3f}x")
    print(f"ratio {ref / mine:.3f}")


if __name__ == "__main__":
    main()
