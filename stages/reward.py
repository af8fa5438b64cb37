"""DVC stage `reward`: train the reward model (PaLM + a scalar head) on the preference pairs of
``prefs``' train split, starting from the SFT export, with TP x PP x DP torchrun processes: the
proxy that PPO maximises (palm/train/reward.py).

Ends by exporting the model (head included) into ``--out``, atomically, with the mean and
standard deviation of its rewards over the training sequences in ``config.json`` (PPO normalises
rewards with them), ``"kind": "reward"`` and ``"split": "train"``.
"""

from __future__ import annotations

import sys

from palm.ops.stage import StageContext, run_stage
from palm.train.reward import RewardConfig, train_and_export


def add_args(p):
    p.add_argument("--data", required=True, help="preference pairs of the prefs stage ({train,valid,gold}.parquet + meta.json)")
    p.add_argument("--parent", required=True, help="the model to start from (models/sft: model.safetensors + config.json)")
    p.add_argument("--checkpoints", required=True, help="training checkpoints (kept across runs for resume)")
    p.add_argument("--out", required=True, help="the reward model: model.safetensors + config.json + tokenizer.json")


def body(cfg: RewardConfig, ctx: StageContext) -> dict:
    return train_and_export(cfg, ctx, split="train", stage="reward")


def main(argv: list[str] | None = None) -> int:
    return run_stage("reward", RewardConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
