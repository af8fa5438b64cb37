"""DVC stage `prefs`: preference pairs (a prompt, a chosen and a rejected reply) for the reward
model, tokenized in the project's chat template (``palm/data/chat.py``)."""

from __future__ import annotations

import sys

from palm.data.chat import ChatDataConfig
from palm.model import ModelConfig
from palm.stage import StageContext, run_stage
from stages.sft_data import add_args, build


def body(cfg: ChatDataConfig, ctx: StageContext) -> dict:
    return build("prefs", cfg, ctx)


def main(argv: list[str] | None = None) -> int:
    return run_stage("prefs", ChatDataConfig, body, add_args, argv, sections={"model": ModelConfig})


if __name__ == "__main__":
    sys.exit(main())
