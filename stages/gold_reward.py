"""DVC stage `gold_reward`: the gold judge of ``evaluate`` (Gao et al. 2022's proxy/gold set-up):
a reward model trained from the SFT export on ``prefs``' gold split (``prefs.gold_fraction`` of
the prompts), which neither the proxy reward model nor PPO ever sees; validated on the same held-out
pairs as the proxy (palm/train/reward.py).

Exports into ``--out`` like the reward stage, with ``"split": "gold"`` and the reward mean and std
over the gold sequences, which evaluate normalises the gold scores with.
"""

from __future__ import annotations

import sys

from palm.ops.stage import StageContext, run_stage
from palm.train.reward import RewardConfig, train_and_export


def add_args(p):
    p.add_argument("--data", required=True, help="preference pairs of the prefs stage ({train,valid,gold}.parquet + meta.json)")
    p.add_argument("--parent", required=True, help="the model to start from (models/sft: model.safetensors + config.json)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="the gold reward model: model.safetensors + config.json + tokenizer.json")


def body(cfg: RewardConfig, ctx: StageContext) -> dict:
    return train_and_export(cfg, ctx, split="gold", stage="gold_reward")


def main(argv: list[str] | None = None) -> int:
    return run_stage("gold_reward", RewardConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
