"""The ``ppo`` section of params.yaml: PPO (or a critic-free estimator), its KL penalty and the
reward's terms."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from palm.core.config import check, to_dict
from palm.core.errors import ConfigError
from palm.decode.generate import SamplingConfig
from palm.model.network import ModelConfig
from palm.train.engine import OptimConfig
from palm.train.loop import TrainConfig, code_version

# the sources of the computation: with model, parallel and engine, a change restarts training
CODE = ("decode/generate.py", "decode/decoder.py", "decode/layouts.py", "decode/cache.py", "decode/native/decode.c",
        "model/reward.py", "train/finetune.py", "train/reward.py", "train/ppo.py", "train/rlhf/config.py",
        "train/rlhf/rollout.py", "train/rlhf/steps.py", "train/rlhf/rewards.py", "train/rlhf/probe.py", "data/rules.py", "train/rlhf/update.py", "train/rlhf/roles.py", "train/rlhf/__init__.py")


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """The KL penalty to the reference (SFT) policy."""

    coef: float = 0.2  # initial beta: -beta * KL in the reward (gae, rloo, reinforce++*) or + beta * KL in the loss (grpo, dr_grpo)
    estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimator in the reward (Schulman 2020)
    target: float | None = None  # adaptive beta steering the per-sequence KL towards this; null: fixed
    horizon: int = 10000  # the adaptive controller's time scale, in sequences (Ziegler et al. 2019)

    def __post_init__(self) -> None:
        check(self.coef >= 0, "coef", f"must be >= 0, got {self.coef}")
        check(self.target is None or self.target > 0, "target", f"must be > 0 or null, got {self.target}")
        check(self.horizon >= 1, "horizon", f"must be >= 1, got {self.horizon}")


ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline")
GROUPED = ("grpo", "dr_grpo", "rloo", "reinforce++_baseline")  # compare the samples of a prompt
TERMS = ("model", "rule", "python:<module>:<function>")


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One term of the reward, a sequence's score being the weighted sum of its terms
    (:mod:`palm.train.rlhf.rewards`): ``model`` (the reward model, normalised with the reward
    stage's mean/std), ``rule`` (the default data's graded verifiable check,
    :func:`palm.data.rules.graded`), or ``python:<module>:<function>`` (a function
    ``(prompt: str, reply: str) -> float`` imported by name)."""

    name: str  # model | rule | python:<module>:<function>
    weight: float = 1.0  # the term's factor in the sum (not 0)

    def __post_init__(self) -> None:
        parts = self.name.split(":")
        ok = self.name in ("model", "rule") or (
            len(parts) == 3 and parts[0] == "python" and all(p.strip() == p and p for p in parts[1:]))
        check(ok, "name", f"unknown reward term {self.name!r}; one of {', '.join(TERMS)}")
        check(self.weight != 0, "weight", f"must not be 0 (drop the term instead), got {self.weight}")

    @property
    def column(self) -> str:
        """The curve column of the term's mean: ``reward_model``, ``reward_rule``,
        ``reward_<module>_<function>``."""
        return "reward_" + "_".join(self.name.split(":")[1:] or [self.name]).replace(".", "_")


@dataclasses.dataclass(frozen=True)
class PPOConfig(TrainConfig):
    """The ``ppo`` section of params.yaml. Layout, dtype, seed and intervals are
    :class:`TrainConfig`'s, read as: ``train_steps`` PPO iterations (one rollout and its update
    each); a mini-batch (one optimizer step) is ``micro_batch_size x num_microbatches`` sequences
    per DP rank; ``optim`` is the actor's optimizer, ``critic_optim`` the critic's;
    ``optim.clip_grad`` / ``critic_optim.clip_grad`` clip each role's gradient norm. There is no
    validation during PPO (``eval_*`` are unused; held-out prompts are ``evaluate``'s) and
    ``pipeline_parallel`` must be 1."""

    train_steps: int = 30
    micro_batch_size: int = 8
    num_microbatches: int = 1
    log_interval: int = 1
    checkpoint_interval: int = 10
    prompts_per_rollout: int = 16  # prompts per iteration, all DP ranks together
    samples_per_prompt: int = 1  # responses per prompt (grpo, dr_grpo, rloo, reinforce++_baseline: the group, >= 2)
    max_new_tokens: int = 64  # response length cap; prompts + this must fit model.seq_len
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)  # the behaviour policy (1.0: the model itself)
    ppo_epochs: int = 2  # passes over each rollout
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.5  # weight of the value loss (the critic's objective)
    entropy_coef: float = 0.0  # entropy bonus weight in the policy loss
    kl: KLConfig = KLConfig()
    kl_bound: float = 0.05  # stop the update once a mini-batch's approx KL(old || new) exceeds this
    reward_clip: float = 5.0  # normalised scores are clipped to [-reward_clip, reward_clip]
    no_end_penalty: float = -1.0  # added to the score of a response that never produced <|end|>
    # gae: critic + GAE; the others have no critic (palm/train/ppo.py's table): grpo, dr_grpo
    # (no std, length-unbiased loss), rloo (leave-one-out), reinforce++ (+ _baseline: group mean)
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"] = "gae"
    whiten: bool = True  # whiten the advantages over the rollout (all DP ranks); dr_grpo: must be false
    reward: tuple[RewardTerm, ...] = (RewardTerm("model", 1.0),)  # the score: the weighted sum of these
    optim: OptimConfig = OptimConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=0.0)
    critic_optim: OptimConfig = OptimConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=0.0)
    # the over-optimisation probe (palm/train/rlhf/probe.py): every gold_interval iterations (and
    # before the first, and after the last) the policy answers gold_probe prompts set apart from
    # the train split, scored by the gold rule judge, the proxy reward and the KL; 0: no probe
    gold_interval: int = 5
    gold_probe: int = 32  # probe prompts, set apart from the train split (PPO never samples them)
    # the exported policy: the last iteration's, or the one with the best probe gold score
    select: Literal["last", "best_gold"] = "last"
    sample_interval: int = 5  # iterations between logged sample responses (samples.jsonl, MLflow)
    samples_logged: int = 4  # responses logged each time (rank 0's first rows)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.pipeline_parallel == 1, "pipeline_parallel",
              "ppo supports tensor_parallel and data_parallel only (generation needs the whole model "
              f"per process); got pipeline_parallel={self.pipeline_parallel}")
        for name in ("prompts_per_rollout", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                     "sample_interval"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.gold_interval >= 0, "gold_interval", f"must be >= 0 (0: no probe), got {self.gold_interval}")
        check(self.gold_probe >= 1, "gold_probe", f"must be >= 1, got {self.gold_probe}")
        check(self.select == "last" or self.gold_interval > 0, "select",
              "best_gold needs the probe: set ppo.gold_interval > 0")
        check(self.samples_logged >= 0, "samples_logged", f"must be >= 0, got {self.samples_logged}")
        check(self.kl_bound > 0, "kl_bound", f"must be > 0 (the approx KL at which an update stops), got {self.kl_bound}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        for name in ("clip", "value_clip", "vf_coef", "reward_clip"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        check(self.advantage not in GROUPED or self.samples_per_prompt >= 2, "samples_per_prompt",
              f"advantage: {self.advantage} compares the samples of a prompt: needs >= 2, got {self.samples_per_prompt}")
        check(self.advantage != "dr_grpo" or not self.whiten, "whiten",
              "advantage: dr_grpo removes the division by a standard deviation, which whitening puts back: "
              "set ppo.whiten: false")
        check(len(self.reward) >= 1, "reward", "needs at least one term, e.g. [{name: model, weight: 1.0}]")
        names = [t.name for t in self.reward]
        check(len(set(names)) == len(names), "reward", f"a term is listed twice: {names} (one entry per term)")
        check(self.prompts_per_rollout % self.data_parallel == 0, "prompts_per_rollout",
              f"must be divisible by data_parallel={self.data_parallel}, got {self.prompts_per_rollout}")
        check(self.rollout_per_rank % self.mini_batch == 0, "micro_batch_size",
              f"a rollout of {self.rollout_per_rank} sequences per DP rank (prompts_per_rollout / data_parallel "
              f"x samples_per_prompt) must split into mini-batches of micro_batch_size x num_microbatches = "
              f"{self.mini_batch}")

    @property
    def uses_reward_model(self) -> bool:
        return any(t.name == "model" for t in self.reward)

    @property
    def rollout_per_rank(self) -> int:
        return self.prompts_per_rollout // self.data_parallel * self.samples_per_prompt

    @property
    def mini_batch(self) -> int:
        return self.micro_batch_size * self.num_microbatches

    def run_identity(self, model: ModelConfig, critic: ModelConfig | None, dtype: str, tokenizer_sha256: str,
                     data_sha256: str, policy_sha256: str, reward_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: not the layout, not the intervals."""
        skip = {"tensor_parallel", "pipeline_parallel", "data_parallel", "virtual_stages", "threads", "log_interval",
                "checkpoint_interval", "eval_interval", "eval_batches", "sample_interval", "samples_logged"}
        return {"model": to_dict(model), "critic": to_dict(critic) if critic else None, "dtype": dtype,
                "ppo": {k: v for k, v in to_dict(self).items() if k not in skip},
                "tokenizer_sha256": tokenizer_sha256, "data_sha256": data_sha256, "policy_sha256": policy_sha256,
                "reward_sha256": reward_sha256, "code": code_version(*CODE)}


def check_context(cfg: PPOConfig, model: ModelConfig) -> None:
    if cfg.max_new_tokens >= model.seq_len:
        raise ConfigError("ppo.max_new_tokens", f"{cfg.max_new_tokens} new tokens leave no room for a prompt in "
                          f"the model's context (model.seq_len={model.seq_len}); use at most {model.seq_len - 1}, "
                          "better far less")
