"""PPO at the library level (``palm.train.rlhf``): a tiny run on a toy reward (the share of one
token in the response, handed to the library as its scorer) raises that reward within a fixed
number of iterations, with the critic (GAE) and without (GRPO); the rollout's tensors line up
with a naive per-row recomputation; and a run killed with SIGKILL resumes to exactly the
uninterrupted run (torchrun, like the other training stages); at tensor_parallel=2 an iteration
samples the same tokens and makes the same update as in one process."""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, chat_data, make_parent, make_reward  # noqa: E402

from palm.core.tokenizer import load_tokenizer, special_ids  # noqa: E402
from palm.decode.generate import generate  # noqa: E402
from palm.model import parallel  # noqa: E402
from palm.train.engine import OptimConfig  # noqa: E402
from palm.train.loop import KILL_ENV, RunPaths, export  # noqa: E402
from palm.train.rlhf import KLConfig, PPOConfig, build_roles, launch, load_prompts, train  # noqa: E402
from palm.train.rlhf.rollout import sequences_batch  # noqa: E402
from palm.train.rlhf.steps import reference_step, token_logp  # noqa: E402

FAST = OptimConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0, weight_decay=0.0)
TOY = PPOConfig(train_steps=16, micro_batch_size=8, prompts_per_rollout=16, max_new_tokens=16, dtype="fp32",
                ppo_epochs=4, kl=KLConfig(coef=0.0), kl_bound=1.0, no_end_penalty=0.0, optim=FAST,
                critic_optim=FAST, samples_logged=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ppo")
    data = chat_data(root)
    data["policy"] = make_parent(root / "policy", data["tokenizer"])
    data["reward"] = make_reward(root / "reward", data["tokenizer"])
    data["end_id"] = special_ids(load_tokenizer(data["tokenizer"] / "tokenizer.json"))["end_turn_id"]
    return data


def curve(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def frequency_of(token: int):
    """The toy reward: the share of ``token`` among a response's tokens."""
    def score(prompts, responses) -> torch.Tensor:
        return torch.tensor([sum(t == token for t in r) / len(r) for r in responses])
    return score


@pytest.fixture
def one_thread():
    """The tiny model's matmuls are too small to share: with 2 threads on a loaded 2-core machine
    the toy runs took 150-180 s instead of 8-20 s (threads waiting for each other)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo"])
def test_a_tiny_ppo_run_learns_a_toy_reward(inputs, single, one_thread, tmp_path, advantage):
    """The reward climbs with a critic and with the critic-free estimators (rloo: the one the rule
    reward's benchmark runs, where the rule's pass rate did not move: the machinery does learn)."""
    cfg = TOY if advantage == "gae" else dataclasses.replace(TOY, advantage=advantage, samples_per_prompt=4,
                                                             prompts_per_rollout=4)
    prompts = load_prompts(inputs["sft"], inputs["sha"], cfg, MODEL)
    # the target: the token the untrained policy samples most often (a few % of its tokens)
    probe = build_roles(cfg, MODEL, policy=inputs["policy"], critic_from=None, scorer=None)
    g = generate(probe.actor.chunks[0], prompts * 3, cfg.max_new_tokens, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    target, _ = collections.Counter(g.response[g.response_mask].tolist()).most_common(1)[0]
    roles = build_roles(cfg, MODEL, policy=inputs["policy"], critic_from=inputs["reward"], scorer=frequency_of(target))
    assert (roles.critic is None) == (advantage != "gae")
    result = train(cfg, roles, prompts, RunPaths(reports=tmp_path, checkpoints=None), end_id=inputs["end_id"])
    rows = curve(tmp_path / "curve.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, cfg.train_steps + 1))
    reward = [float(r["reward"]) for r in rows]
    before, after = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    print(f"{advantage}: share of token {target} {before:.3f} -> {after:.3f}: {[round(x, 3) for x in reward]}")
    assert after >= before + 0.1 and after >= 2 * before
    assert result["iterations"] == cfg.train_steps
    assert result["actor_steps"] == sum(int(float(r["updates"])) for r in rows) > cfg.train_steps
    assert result["kl"] > 0  # it moved away from the reference (no penalty here)
    for key in ("entropy", "clip_fraction", "approx_kl", "response_length"):
        assert all(r[key] != "" for r in rows), key
    if advantage == "gae":
        assert result["explained_variance"] is not None and result["value_loss"] is not None
    else:
        assert result["explained_variance"] is None and result["value_loss"] is None


def test_rollout_log_probs_line_up_with_a_full_forward_pass(inputs, single):
    """The generation's behaviour log-probs (response space) equal the training forward's log-probs
    read at ``index`` (label space) for the same sequences, and the reference starts equal to the
    actor, so the first update's ratio is 1 and the KL 0."""
    cfg = dataclasses.replace(TOY, max_new_tokens=12)
    prompts = load_prompts(inputs["sft"], inputs["sha"], cfg, MODEL)[:5]
    roles = build_roles(cfg, MODEL, policy=inputs["policy"], critic_from=inputs["reward"], scorer=frequency_of(3))
    g = generate(roles.actor.chunks[0], prompts, cfg.max_new_tokens, temperature=1.0, stop_ids=[inputs["end_id"]],
                 generator=torch.Generator().manual_seed(1))
    lengths = g.response_mask.sum(1).tolist()
    responses = [g.response[i, :n].tolist() for i, n in enumerate(lengths)]
    batch = sequences_batch(prompts, responses, g.response_mask.shape[1], MODEL.seq_len)
    with torch.no_grad():
        logp, _ = token_logp(roles.actor.chunks[0], batch["tokens"], batch["labels"])
    (ref,) = roles.reference.forward([batch], reference_step)
    mask = g.response_mask
    picked = logp.gather(1, batch["index"])
    assert torch.allclose(picked[mask], g.raw_logprobs[mask], atol=1e-4)
    assert torch.allclose(ref["logp"][mask], g.raw_logprobs[mask], atol=1e-4)
    for i, (p, r) in enumerate(zip(prompts, responses)):  # naive: each row alone, unpadded
        seq = torch.tensor([p + r])
        with torch.no_grad():
            full = parallel.gather_vocab(roles.actor.chunks[0](seq))[0, :, :MODEL.vocab_size].double().log_softmax(-1)
        naive = torch.tensor([full[len(p) - 1 + j, t].item() for j, t in enumerate(r)], dtype=torch.float64)
        assert torch.allclose(picked[i, :len(r)].double(), naive, atol=1e-4)


def run(tmp: Path, inputs: dict, cfg: PPOConfig, env: dict | None = None) -> dict:
    return launch(MODEL, cfg, data=inputs["sft"], policy=inputs["policy"], reward=inputs["reward"],
                  tokenizer_sha256=inputs["sha"], checkpoints=tmp / "ckpt", reports=tmp / "reports",
                  run_dir=tmp / "run", env=env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


TIMING = ("generate_tokens_per_s", "rollout_s", "update_s")


@pytest.mark.dist
@pytest.mark.parametrize("lora", [None, "rank-4"])
def test_ppo_resumes_exactly_after_sigkill_and_tp2_does_one_iteration_like_tp1(tmp_path, inputs, lora):
    """Also with LoRA: the checkpoint holds the actor's and the critic's adapters and their optimizer
    state (the frozen bases come from the exports again), and at TP=2 the split adapters sample and
    update like TP=1."""
    from palm.model.lora import LoRAConfig

    cfg = dataclasses.replace(TOY, train_steps=4, checkpoint_interval=2, kl=KLConfig(coef=0.05, target=0.5),
                              no_end_penalty=-0.5, sample_interval=2, samples_logged=2,
                              lora=LoRAConfig(rank=4) if lora else None)
    straight = run(tmp_path / "a", inputs, cfg)
    export(Path(straight["checkpoint"]), tmp_path / "a" / "model", {})

    with pytest.raises(RuntimeError):  # the worker SIGKILLs itself right after checkpoint 2
        run(tmp_path / "b", inputs, cfg, env={KILL_ENV: "2"})
    assert (tmp_path / "b" / "ckpt" / "latest").read_text().strip() == "step_0000002"
    resumed = run(tmp_path / "b", inputs, cfg)
    export(Path(resumed["checkpoint"]), tmp_path / "b" / "model", {})
    assert resumed["resumed"] and resumed["iterations"] == 4 and resumed["actor_steps"] == straight["actor_steps"]
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "explained_variance", "initial_reward",
                "kl_coef_final"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-7), key
    assert straight["kl_coef_final"] != 0.05  # the adaptive coefficient moved, and was restored
    wa, wb = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert set(wa) == set(wb) == set(weights(inputs["policy"]))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    if lora:  # only the adapted block linears moved: the embedding and the norms are the frozen parent's
        start = weights(inputs["policy"])
        moved = {k for k in start if not torch.equal(wa[k], start[k])}
        assert moved and all(".attn." in k or ".mlp." in k for k in moved), moved
    ca, cb = curve(tmp_path / "a" / "reports" / "curve.csv"), curve(tmp_path / "b" / "reports" / "curve.csv")
    assert [r["step"] for r in cb] == ["1", "2", "3", "4"]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in ca] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in cb]
    samples = (tmp_path / "b" / "reports" / "samples.jsonl").read_text()
    assert samples == (tmp_path / "a" / "reports" / "samples.jsonl").read_text()
    assert samples.count("\n") == 4 and '"step": 2' in samples and '"response": ' in samples

    # tensor parallel: the same tokens sampled (one generator for both TP ranks), the same losses
    # and the same update, to float tolerance
    tp2 = run(tmp_path / "c", inputs, dataclasses.replace(cfg, tensor_parallel=2, train_steps=1))
    (row,) = curve(tmp_path / "c" / "reports" / "curve.csv")
    for key in ("reward", "kl", "response_length", "entropy", "policy_loss", "value_loss", "approx_kl", "grad_norm",
                "explained_variance"):
        assert float(row[key]) == pytest.approx(float(ca[0][key]), rel=1e-3, abs=1e-5), key
    assert tp2["iterations"] == 1
