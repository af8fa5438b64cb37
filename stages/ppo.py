"""DVC stage `ppo`: RLHF of the SFT policy against ``ppo.reward`` (the reward model, the rule
check, user functions) with PPO (or a critic-free estimator), on the train split's prompts, with
TP x DP torchrun processes (``palm.train.rlhf``).

Checks before anything starts (one line each): the policy, the reward model and the prompts
share one tokenizer, the reward export carries the reward stage's mean/std (both only with a
``model`` term), every ``python:`` term's function imports, the responses fit the context, and
some prompt is left to start from. Resumes from ``--checkpoints`` (kept across reruns); ends by
exporting the policy as ``models/sft`` is (safetensors + config.json with ``"kind": "ppo"``, the
reward's terms under ``"reward"`` as ``[{"name", "weight"}]`` + tokenizer.json) into ``--out``,
atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

from palm.core.errors import UserError
from palm.ops.stage import StageContext, run_stage
from palm.train.rlhf import PPOConfig, launch, load_prompts
from palm.train.stage import exported, training_start


def add_args(p):
    p.add_argument("--data", required=True, help="chat data whose train split holds the prompts (data/sft or data/prefs)")
    p.add_argument("--policy", required=True, help="the policy to start from and the KL reference (models/sft)")
    p.add_argument("--reward", required=True, help="the reward model, also the critic's start (models/reward); "
                   "read only with a `model` term in ppo.reward")
    p.add_argument("--checkpoints", required=True, help="PPO checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="exported policy: model.safetensors + config.json + tokenizer.json")


def prepare(cfg: PPOConfig, data: Path, policy: Path, reward: Path):
    """The policy's architecture and config and the prompts, after every check (one-line errors)."""
    from palm.data.chat import read_chat_meta
    from palm.train.finetune import check_tokenizer, read_parent
    from palm.train.rlhf.rewards import load_function

    model, config = read_parent(policy, "sft")
    for term in cfg.reward:  # a user's reward function that does not import fails now, not in a worker
        if term.name.startswith("python:"):
            load_function(term.name)
    model.check_parallel(cfg.tensor_parallel, 1, section="ppo")
    meta = read_chat_meta(data, "sft_data")
    check_tokenizer(data, meta, policy, config, "sft_data" if meta.get("kind") != "prefs" else "prefs")
    prompts = load_prompts(data, config["tokenizer_sha256"], cfg, model)
    if not cfg.uses_reward_model:
        return model, config, prompts
    critic, reward_config = read_parent(reward, "reward")
    if reward_config["tokenizer_sha256"] != config["tokenizer_sha256"]:
        raise UserError(f"the reward model {reward} was trained with tokenizer sha256 "
                        f"{reward_config['tokenizer_sha256'][:12]}… but the policy {policy} with "
                        f"{config['tokenizer_sha256'][:12]}…; both must come from the same tokenizer "
                        "(dvc repro reward)")
    stats = reward_config.get("reward")
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), (int, float)) for k in ("mean", "std")):
        raise UserError(f"{reward}/config.json has no reward mean/std: not a reward model export; "
                        "run the reward stage (dvc repro reward)")
    critic.check_parallel(cfg.tensor_parallel, 1, section="ppo")
    return model, config, prompts


def body(cfg: PPOConfig, ctx: StageContext) -> dict:
    policy, reward = ctx.path("policy"), ctx.path("reward")
    model, config, _ = prepare(cfg, ctx.path("data"), policy, reward)
    dtype, _ = training_start("ppo", cfg, ctx)
    checkpoints = ctx.path("checkpoints")
    with ctx.tracker.follow(ctx.reports / "curve.csv", [ctx.reports / "samples.jsonl"]):
        result = launch(model, cfg, data=ctx.path("data"), policy=policy, reward=reward,
                        tokenizer_sha256=config["tokenizer_sha256"], checkpoints=checkpoints, reports=ctx.reports,
                        run_dir=checkpoints / "run", dtype=dtype)
    chosen = result
    if cfg.select == "best_gold" and result.get("best_checkpoint"):  # the probe's best policy, not the last
        chosen = {**result, "checkpoint": result["best_checkpoint"]}
        print(f"ppo: exporting the policy of iteration {result['gold_best_iteration']} (best probe gold score "
              f"{result['gold_best']:.3f}; ppo.select: best_gold)", file=sys.stderr)
    with exported(ctx, chosen, policy / "tokenizer.json", {
            "kind": "ppo", "parent": str(ctx.args.policy),
            "reward_model": str(ctx.args.reward) if cfg.uses_reward_model else None,
            # which judges the policy trained against (evaluate reads this key)
            "reward": [{"name": t.name, "weight": t.weight} for t in cfg.reward],
            "advantage": cfg.advantage, "select": cfg.select,
            "iteration": result.get("gold_best_iteration", result["iterations"]) if chosen is not result
            else result["iterations"],
            "metrics": {k: result[k] for k in ("reward", "initial_reward", "kl", "response_length")}}):
        pass
    return {k: v for k, v in result.items() if k not in ("checkpoint", "best_checkpoint")}


def main(argv: list[str] | None = None) -> int:
    return run_stage("ppo", PPOConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
