"""RLHF with PPO (or a critic-free estimator) on the shared training engine: the library behind
the ``ppo`` stage.

Four roles, each an :class:`~palm.train.engine.Engine` at the run's TP x DP layout:

==========  ============================  =====================================================
role        from                          how it is used
==========  ============================  =====================================================
actor       ``models/sft`` (PaLM)         samples the rollouts (KV-cached :func:`generate`); an
                                          objective on the engine (clipped policy loss,
                                          entropy bonus; grpo, dr_grpo: + the KL term)
critic      ``models/reward``             value head per position (:class:`RewardModel`); an
            (RewardModel)                 objective on the engine (clipped value loss). Only
                                          with ``advantage: gae``; without a ``model`` reward
                                          term it starts from the policy with a fresh head
reference   ``models/sft`` (frozen)       per-token log-probs for the KL to the SFT policy
reward      ``ppo.reward``'s terms        the weighted sum of the reward model's score at each
                                          response's last token (its ``<|end|>`` when it ended),
                                          normalised with the reward stage's mean/std, the rule
                                          check and user functions
                                          (:mod:`~palm.train.rlhf.rewards`); any :data:`Scorer`
                                          fits; the reward model is loaded only for a ``model``
                                          term
==========  ============================  =====================================================

Frozen roles are ``Engine(optim=None)``: eval mode, no gradients, no optimizer state. Pipeline
parallelism is refused: decoding needs the whole model in every process (:mod:`palm.decode.generate`).

One iteration (:func:`iteration`: :func:`~palm.train.rlhf.rollout.rollout`, then
:func:`~palm.train.rlhf.update.update`): each DP rank takes its share of ``prompts_per_rollout``
prompts (a seeded order over the train split, :class:`~palm.train.finetune.EpochOrder`), repeats
each ``samples_per_prompt`` times and samples one response per row; the behaviour policy's
log-probs come with the tokens. The reference, the critic and the reward model score the same
sequences (prompt + response, right-padded, as in fine-tuning). The score is clipped to
``±reward_clip``; a response that never produced ``<|end|>`` gets ``no_end_penalty`` added.
``gae``: per-token reward ``-β·KL`` plus the score on the last token, GAE(γ, λ), advantages
whitened over the whole rollout (all DP ranks). ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce++``
and ``reinforce++_baseline`` have no critic: the score relative to the other samples of its
prompt, or the return of REINFORCE++, with the KL to the reference in the loss (grpo, dr_grpo) or
in the reward (the others); the table in :mod:`palm.train.ppo` gives each formula.
Then ``ppo_epochs`` passes over the rollout in shuffled mini-batches of ``micro_batch_size x
num_microbatches`` sequences per DP rank, one optimizer step of each trained role per mini-batch,
stopping the update as soon as a mini-batch's approximate KL(old || new) exceeds ``kl_bound``.

All PPO maths live in :mod:`palm.train.ppo`; what each role computes per token in
:mod:`~palm.train.rlhf.steps`. The training loop is the one every stage uses
(:func:`palm.train.loop.run`): :class:`PPO` is its objective, one iteration a step.

Randomness is a function of the iteration: each DP rank's rollout generator is seeded from
``(seed, iteration, dp rank)`` (TP ranks of one replica share it, so they sample the same tokens)
and the mini-batch order from ``(seed, iteration, epoch, dp rank)``; the checkpoint holds the
iteration, both trained roles with their optimizers, the KL coefficient and the logged samples, so a resumed run
repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from palm.core.config import from_dict, to_dict
from palm.model import lora
from palm.model.network import ModelConfig
from palm.model.reward import RewardModel
from palm.train import ppo
from palm.train.engine import Engine
from palm.train.launch import launch as _launch
from palm.train.loop import Objective, Progress, RunPaths, run, worker_groups
from palm.train.rlhf.config import KLConfig, PPOConfig, RewardTerm  # noqa: F401 (the section's types)
from palm.train.rlhf import rewards
from palm.train.rlhf.probe import COLUMNS as PROBE_COLUMNS
from palm.train.rlhf.probe import Probe, falling, split_probe
from palm.train.rlhf.roles import Roles, build_roles
from palm.train.rlhf.rollout import Rollouts, dp_sum, load_prompt_answers, load_prompts, rollout  # noqa: F401
from palm.train.rlhf.steps import reward_model_scorer
from palm.train.rlhf.update import update

ENTRY = "palm.train.rlhf:worker"


def iteration(roles: Roles, cfg: PPOConfig, prompts: list[list[int]], *, kl_coef: float, end_id: int,
              generator: torch.Generator, shuffle_seed: Callable[[int], int]) -> tuple[dict[str, float], dict]:
    """One rollout of ``prompts`` (this DP rank's rows) and the PPO update on it; returns the
    iteration's metrics (the same on every rank) and rank-local samples."""
    r = rollout(roles, cfg, prompts, kl_coef=kl_coef, end_id=end_id, generator=generator)
    t0 = time.perf_counter()
    window, stopped_early = update(roles, cfg, r.batch, len(prompts), shuffle_seed)
    t_update = time.perf_counter() - t0

    # the iteration's metrics, over all DP ranks
    seq = dp_sum(torch.stack([r.raw.sum(), r.score.sum(), r.kl.sum(), r.lengths.sum().double(),
                              r.stopped.sum().double(), torch.tensor(float(len(prompts))),
                              *(v.sum() for v in r.terms.values())]))
    b = seq[5]
    mean = lambda key: sum(w[key] for w in window) / len(window)  # noqa: E731
    out = {"reward": float(seq[0] / b), "score": float(seq[1] / b), "kl": float(seq[2] / b),
           "kl_coef": float(kl_coef), "response_length": float(seq[3] / b), "ended": float(seq[4] / b),
           "entropy": mean("entropy"), "clip_fraction": mean("clip_fraction"), "approx_kl": mean("approx_kl"),
           "policy_loss": mean("policy_loss"), "value_loss": mean("value_loss") if roles.critic else math.nan,
           "explained_variance": r.explained_variance, "updates": float(len(window)),
           "stopped_early": float(stopped_early), "grad_norm": mean("grad_norm"), "lr": window[-1]["lr"],
           "generate_tokens_per_s": float(dp_sum(r.lengths.sum().double()) / max(r.t_generate, 1e-9)),
           "rollout_s": r.t_generate + r.t_score, "update_s": t_update,
           **{k: float(total / b) for k, total in zip(r.terms, seq[6:])}}  # the reward's terms: reward_<term>
    samples = {"responses": r.responses, "prompts": prompts, "score": r.score.tolist(), "reward": r.raw.tolist(),
               "ended": r.stopped.tolist()}
    return out, samples


class PPO(Objective):
    """PPO as the training loop's objective: a step is one iteration (rollout and update). Beyond
    the actor (the checkpoint's engine) and the critic, a resumed run needs the adaptive KL
    coefficient, the first iteration's reward and the samples logged so far."""

    columns = ("reward", "score", "kl", "kl_coef", "response_length", "ended", "entropy", "clip_fraction",
               "approx_kl", "policy_loss", "value_loss", "explained_variance", "updates", "stopped_early",
               "grad_norm", "lr", "generate_tokens_per_s", "rollout_s", "update_s", *PROBE_COLUMNS)
    finite = ()
    shown = ("reward", "kl", "response_length")

    def __init__(self, cfg: PPOConfig, roles: Roles, prompts: list[list[int]], *, end_id: int, reports: Path,
                 identity: dict[str, Any] | None = None, decode: Callable[[list[int]], str] | None = None,
                 stage: str = "ppo", probe: Probe | None = None, text: Callable[..., str] | None = None,
                 best_root: Path | None = None):
        self.stage, self.cfg, self.identity = stage, cfg, identity or {}
        # the over-optimisation probe: its measurements so far ("iteration" 0 is the start) and
        # where the policy with the best gold score is kept (select: best_gold)
        self.probe, self.text, self.best_root = probe, text, best_root
        self.gold: list[dict[str, float]] = []
        self.roles, self.prompts, self.end_id, self.decode = roles, prompts, end_id, decode
        self.engine = roles.actor
        # the reward's per-term means (reward_model, reward_rule, ...), after the fixed columns
        self.columns = (*PPO.columns, *getattr(roles.scorer, "columns", ()))
        self.others = {"critic": roles.critic} if roles.critic is not None else {}
        self.kl_ctl = ppo.AdaptiveKL(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        self.source = Rollouts(prompts, cfg)
        self.first: float | None = None  # the first iteration's reward
        self.rank0 = torch.distributed.get_rank() == 0
        self.samples = Path(reports) / "samples.jsonl"  # sample responses every sample_interval iterations
        if self.rank0:
            self.samples.parent.mkdir(parents=True, exist_ok=True)
            self.samples.write_text("")

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        if self.probe is not None and not self.gold:  # the starting policy: the curve's KL = 0 point
            self._measure(0)
        stats, samples = iteration(
            self.roles, cfg, self.source.prompts_at(step), kl_coef=self.kl_ctl.coef, end_id=self.end_id,
            generator=self.source.generator(step),
            shuffle_seed=lambda epoch: int(np.random.SeedSequence(
                [cfg.seed, step, epoch, self.source.dp_rank, 1]).generate_state(1)[0]))
        self.kl_ctl.update(stats["kl"], cfg.prompts_per_rollout * cfg.samples_per_prompt)
        self.first = stats["reward"] if self.first is None else self.first
        done = step + 1
        if self.probe is not None and (done % cfg.gold_interval == 0 or done == cfg.train_steps):
            stats.update(self._measure(done))
        if self.rank0 and cfg.samples_logged and (done % cfg.sample_interval == 0 or done == cfg.train_steps):
            with self.samples.open("a") as f:  # the stage process logs it to MLflow (Tracker.follow)
                for i in range(min(cfg.samples_logged, len(samples["responses"]))):
                    f.write(json.dumps({"step": done, "prompt": self._text(samples["prompts"][i]),
                                        "response": self._text(samples["responses"][i]),
                                        "reward": samples["reward"][i], "score": samples["score"][i],
                                        "ended": samples["ended"][i]}) + "\n")
        return stats

    def _measure(self, done: int) -> dict[str, float]:
        """Probe the policy after ``done`` iterations; warn when gold falls while the proxy rises;
        keep the policy when its gold score is the best so far (``select: best_gold``)."""
        now = {"iteration": float(done), **self.probe.measure(self.roles, self.cfg, end_id=self.end_id,
                                                              decode=self.text)}
        warning = falling(self.gold, now)
        now["gold_warning"] = float(warning is not None)
        if warning and self.rank0:
            print(f"warning: {self.stage}: iteration {done}: {warning}", file=sys.stderr, flush=True)
        best = max(self.gold, key=lambda h: h["gold_score"]) if self.gold else None
        self.gold.append(now)
        if self.cfg.select == "best_gold" and self.best_root is not None and (
                best is None or now["gold_score"] > best["gold_score"]):
            from palm.train import checkpoint as ckpt

            ckpt.save(self.engine, self.best_root, step=done, meta={"run": self.identity, "loop": {"gold": now}})
        return {k: v for k, v in now.items() if k in PROBE_COLUMNS}

    def _text(self, ids: list[int]) -> str | list[int]:
        return self.decode(ids) if self.decode is not None else ids

    def state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_ctl.coef, "initial_reward": self.first, "gold": self.gold}

    def restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        self.kl_ctl = ppo.AdaptiveKL(state["kl_coef"], self.cfg.kl.target, self.cfg.kl.horizon)
        self.first = state["initial_reward"]
        self.gold = state.get("gold", [])
        kept = checkpoint / "samples.jsonl"
        if self.rank0:
            self.samples.write_text(kept.read_text() if kept.is_file() else "")

    def files(self) -> dict[str, str]:
        return {"samples.jsonl": self.samples.read_text()}

    def result(self, progress: Progress) -> dict[str, Any]:
        result = {**progress.last, "initial_reward": self.first, "iterations": progress.step,
                  "resumed": progress.resumed_from > 0, "ppo_seconds": progress.seconds,
                  "actor_steps": self.roles.actor.step, "kl_coef_final": self.kl_ctl.coef,
                  "train_prompts": len(self.prompts)}
        result = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
        if self.gold:
            best = max(self.gold, key=lambda h: h["gold_score"])
            result.update({"gold_initial": self.gold[0]["gold_score"], "gold_final": self.gold[-1]["gold_score"],
                           "proxy_initial": self.gold[0]["proxy_reward"], "probe_kl_initial": self.gold[0]["probe_kl"],
                           "gold_best": best["gold_score"], "gold_best_iteration": int(best["iteration"]),
                           "gold_warnings": int(sum(h["gold_warning"] for h in self.gold))})
            if self.cfg.select == "best_gold" and self.best_root is not None:
                result["best_checkpoint"] = str(self.best_root / f"step_{int(best['iteration']):07d}")
        if progress.checkpoint is not None:
            result["checkpoint"] = str(progress.checkpoint)
        return result


def train(cfg: PPOConfig, roles: Roles, prompts: list[list[int]], paths: RunPaths, *, end_id: int,
          identity: dict[str, Any] | None = None, decode: Callable[[list[int]], str] | None = None,
          stage: str = "ppo", probe: Probe | None = None, text: Callable[..., str] | None = None) -> dict[str, Any]:
    """Run ``cfg.train_steps`` PPO iterations in this process's groups (resuming from
    ``paths.checkpoints`` when it holds this run's checkpoint); returns the result (the last
    iteration's metrics, the first's reward). ``probe`` and ``text`` (ids -> text, ``special=``
    keeps special tokens): the over-optimisation probe."""
    best = paths.checkpoints / "best" if paths.checkpoints is not None else None
    return run(PPO(cfg, roles, prompts, end_id=end_id, reports=paths.reports, identity=identity, decode=decode,
                   stage=stage, probe=probe, text=text, best_root=best), paths)


# --- the stage side ------------------------------------------------------------------------------

def launch(model: ModelConfig, cfg: PPOConfig, *, data: Path, policy: Path, reward: Path | None,
           tokenizer_sha256: str, checkpoints: Path, reports: Path, run_dir: Path, dtype: str = "fp32",
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """PPO of the ``policy`` export against ``cfg.reward`` (the ``reward`` export for a ``model``
    term; unused, and may be None, without one) on the prompts of ``data``, in ``cfg.world_size``
    processes; returns rank 0's result."""
    from palm.core.io import files_sha256

    model.check_parallel(cfg.tensor_parallel, 1, section="ppo")
    spec = {"model": to_dict(model), "ppo": to_dict(cfg), "dtype": dtype, "data": str(data), "policy": str(policy),
            "reward": str(reward) if reward is not None else None, "tokenizer_sha256": tokenizer_sha256, "data_sha256": files_sha256(data),
            "policy_sha256": files_sha256(policy, ["config.json", "model.safetensors"]),
            "reward_sha256": files_sha256(reward, ["config.json", "model.safetensors"])
            if cfg.uses_reward_model else None,
            "checkpoints": str(checkpoints), "reports": str(reports)}
    return _launch(ENTRY, spec, cfg, run_dir=run_dir, env=env)


def worker(spec: dict[str, Any]) -> None:
    """One PPO process: its roles at the run's layout, then :func:`train`."""
    from palm.core.tokenizer import load_tokenizer, special_ids
    from palm.train.finetune import load_parent
    from palm.train.metrics import DTYPES

    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = from_dict(PPOConfig, spec["ppo"], "ppo")
    reward_dir, policy = Path(spec["reward"] or "."), Path(spec["policy"])
    with worker_groups(cfg):
        sha = spec["tokenizer_sha256"]
        examples = load_prompt_answers(Path(spec["data"]), sha, cfg, model)
        tok = load_tokenizer(policy / "tokenizer.json", sha)
        text = lambda ids, special=False: tok.decode(ids, skip_special_tokens=not special)  # noqa: E731
        # the rule term's documented answers, of every prompt (the probe's too: it scores them)
        answers = {tuple(p): text(a) for p, a in examples}
        probe = None
        if cfg.gold_interval:  # set apart before training: PPO never samples the probe's prompts
            examples, held = split_probe(examples, cfg.gold_probe, cfg.seed)
            probe = Probe.of(held, text, cfg.seed) if held else None
        prompts = [p for p, _ in examples]
        dtype = DTYPES[spec["dtype"]]

        model_scorer, critic_model, critic_from, value_norm = None, None, None, (0.0, 1.0)
        if cfg.uses_reward_model:  # the reward model, and the critic's start (its head reads its scale)
            reward_config = json.loads((reward_dir / "config.json").read_text())
            critic_model = from_dict(ModelConfig, reward_config["model"], "model")
            reward = Engine(critic_model, None, chunk=RewardModel, micro_batch_size=cfg.micro_batch_size, dtype=dtype)
            load_parent(reward, reward_dir)
            stats = reward_config["reward"]
            model_scorer = reward_model_scorer(reward, stats["mean"], stats["std"], cfg.micro_batch_size)
            critic_from, value_norm = reward_dir, (stats["mean"], max(stats["std"], 1e-6))
        # without a reward model, a gae critic starts from the policy with a fresh value head
        scorer = rewards.build(cfg.reward, answers=answers, model=model_scorer,
                               decode_prompt=lambda ids: text(ids, special=True), decode_reply=text)
        roles = build_roles(cfg, model, policy=policy, critic_from=critic_from, critic_model=critic_model,
                            scorer=scorer, value_norm=value_norm, dtype=dtype)
        if cfg.lora is not None and model_scorer is not None and roles.critic is not None:
            # the LoRA critic's frozen base and the reward model come from one export: one copy
            lora.share_frozen(reward.chunks, roles.critic.chunks)
        identity = cfg.run_identity(model, critic_model, spec["dtype"], sha, spec["data_sha256"],
                                    spec["policy_sha256"], spec["reward_sha256"])
        train(cfg, roles, prompts, RunPaths.of(spec), end_id=special_ids(tok)["end_turn_id"], identity=identity,
              decode=lambda ids: tok.decode(ids, skip_special_tokens=False), probe=probe, text=text)
