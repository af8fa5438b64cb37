"""LoRA (palm/model/lora.py): zero-initialised adapters leave the model as it was, adapters off is
the base, the merged export computes the adapter model's logits, only adapters (and a reward
head) train, TP=2 equals TP=1 (forward, gradients, decoding, checkpoint resharding), an sft run
with LoRA resumes exactly, PPO's reference is the actor with adapters off, and pretrain refuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, chat_data, chat_export, make_parent, make_reward, redraw_weights  # noqa: E402

from palm.core.config import from_dict  # noqa: E402
from palm.core.errors import ConfigError  # noqa: E402
from palm.model import lora  # noqa: E402
from palm.model.lora import LoRAConfig  # noqa: E402
from palm.model.network import ModelConfig, PaLM  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "lora_worker.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
CFG = ModelConfig(vocab_size=250, d_model=64, n_layers=2, n_heads=4, head_dim=16, seq_len=32)
SEQ = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))


def adapted(b_std: float = 0.5, seed: int = 7) -> tuple[PaLM, dict[str, torch.Tensor]]:
    """A whole PaLM whose every part matters (redrawn weights), with adapters whose ``B`` is random
    (so they change the model), and its base weights before the adapters."""
    model = PaLM(CFG, seed=seed)
    redraw_weights(model, seed=seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.apply([model], LoRAConfig(rank=4, alpha=8.0), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora.b"):
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model, base


def plain(base: dict[str, torch.Tensor]) -> PaLM:
    model = PaLM(CFG, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(base[name])
    return model


def test_zero_initialised_adapters_leave_the_model_unchanged(single):
    model = PaLM(CFG, seed=7)
    before_grad = model(SEQ)
    with torch.no_grad():
        before = model(SEQ)
    lora.apply([model], LoRAConfig(rank=4), seed=1)
    names = [n for n, _ in model.named_parameters() if lora.is_adapter(n)]
    assert len(names) == CFG.n_layers * len(lora.TARGETS) * 2
    assert "layers.1.mlp.down.lora.a" in names and "layers.0.attn.kv.lora.b" in names
    params = dict(model.named_parameters())
    assert all(params[n].abs().sum() == 0 for n in names if n.endswith(".b"))  # B = 0 ...
    assert all(params[n].std() > 0 for n in names if n.endswith(".a"))  # ... A random (it trains from the start)
    assert torch.equal(model(SEQ), before_grad)  # autograd path
    with torch.no_grad():
        assert torch.equal(model(SEQ), before)  # the no-grad (decoding) path
    assert all(not p.requires_grad for n, p in model.named_parameters() if not lora.is_adapter(n))


def test_adapters_off_computes_the_base_alone(single):
    model, base = adapted()
    with torch.no_grad():
        on, reference = model(SEQ), plain(base)(SEQ)
        assert (on - reference).abs().max() > 1e-1  # the adapters matter
        with lora.adapters_off([model]):
            assert torch.equal(model(SEQ), reference)
        assert torch.equal(model(SEQ), on)  # back on after the block
        with pytest.raises(RuntimeError), lora.adapters_off([model]):
            raise RuntimeError("inside")
        assert torch.equal(model(SEQ), on)  # also after a block that raised


def test_merge_gives_the_adapter_models_logits_and_decoding_uses_the_adapters(single):
    from palm.decode.generate import generate

    model, base = adapted()
    prompts = [SEQ[0, :5], SEQ[1, :3]]
    with torch.no_grad():
        want = model(SEQ)
    tokens = generate(model, prompts, 8).tokens  # the fused decoder: reads the weights itself
    with lora.adapters_off([model]):
        base_tokens = generate(model, prompts, 8).tokens
    assert torch.equal(generate(model, prompts, 8, use_cache=False).tokens, tokens)  # the model's own path
    assert not torch.equal(tokens, base_tokens)  # so the decoder did not decode the base

    lora.merge(model)
    assert {n for n, _ in model.named_parameters()} == set(base)  # a plain PaLM again
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        got = model(SEQ)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(generate(model, prompts, 8).tokens, tokens)


def test_only_adapters_and_the_head_train_and_hold_optimizer_state(single):
    from palm.model.reward import HEAD, RewardModel
    from palm.train.reward import pair_batch, reward_forward_step

    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    batches = [pair_batch([{"prompt_ids": ids(4), "chosen_ids": ids(5), "rejected_ids": ids(6)} for _ in range(2)],
                          CFG.seq_len)]
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0)
    eng = Engine(CFG, optim, forward_step=reward_forward_step(0.0), chunk=RewardModel, micro_batch_size=4,
                 seed=3, lora=LoRAConfig(rank=2), lora_trainable=(HEAD,))
    trainable = {n for n, p in eng.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in eng.named_parameters() if lora.is_adapter(n)} | {HEAD}
    in_optimizer = {id(p) for group in eng.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in eng.named_parameters() if n in trainable}
    grad_buffer = sum(b.grad_data.numel() for m in eng.model for b in m.buffers)
    assert grad_buffer == sum(p.numel() for n, p in eng.named_parameters() if n in trainable)
    before = {n: p.detach().clone() for n, p in eng.named_parameters()}
    eng.train_step(batches)
    changed = {n for n, p in eng.named_parameters() if not torch.equal(p, before[n])}
    assert HEAD in changed and any(n.endswith(".lora.b") for n in changed)
    assert changed <= trainable  # the base did not move

    frozen_head = Engine(CFG, optim, forward_step=reward_forward_step(0.0), chunk=RewardModel,
                         micro_batch_size=4, seed=3, lora=LoRAConfig(rank=2))
    assert not dict(frozen_head.named_parameters())[HEAD].requires_grad


def test_muon_leaves_the_adapters_to_adamw(single):
    from palm.train.pretrain import lm_forward_step

    eng = Engine(CFG, OptimConfig(name="muon", lr=1e-2, warmup_steps=0), forward_step=lm_forward_step(0.0),
                 micro_batch_size=2, seed=3, lora=LoRAConfig(rank=2))
    inner = eng.optimizer.optimizer
    assert not any(inner.is_matrix(p) for group in inner.param_groups for p in group["params"])
    before = {n: p.detach().clone() for n, p in eng.named_parameters()}
    stats = eng.train_step(random_batches(CFG, steps=1, num_microbatches=1, micro_batch_size=2, seed=1)[0])
    assert stats["loss"] == stats["loss"]
    assert all(torch.equal(p, before[n]) for n, p in eng.named_parameters() if not lora.is_adapter(n))


def test_export_of_a_lora_checkpoint_is_plain_weights_with_the_adapter_models_logits(tmp_path, single):
    from palm.core.config import to_dict
    from palm.model.weights import load_exported
    from palm.train import checkpoint
    from palm.train.loop import export
    from palm.train.pretrain import lm_forward_step

    eng = Engine(CFG, OptimConfig(lr=3e-2, warmup_steps=0), forward_step=lm_forward_step(0.0), micro_batch_size=2,
                 seed=3, lora=LoRAConfig(rank=4, alpha=32.0))
    base = {n: p.detach().clone() for n, p in eng.named_parameters() if not lora.is_adapter(n)}
    for step in random_batches(CFG, steps=3, num_microbatches=1, micro_batch_size=2, seed=1):
        eng.train_step(step)
    path = checkpoint.save(eng, tmp_path / "ckpt", step=3,
                           meta={"run": {"model": to_dict(CFG), "tokenizer_sha256": "0" * 64}})
    config = export(path, tmp_path / "out", {"kind": "sft"})
    assert config["kind"] == "sft"
    model, _ = load_exported(tmp_path / "out")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == set(base)
    with torch.no_grad():
        want, got = eng.chunks[0](SEQ), model(SEQ)
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - plain(base)(SEQ)).abs().max().item() > 1e-4  # the adapters trained into the export


def test_lora_config_is_checked_and_pretrain_refuses_it():
    from palm.train.pretrain import PretrainConfig
    from palm.train.reward import RewardConfig
    from palm.train.rlhf.config import PPOConfig
    from palm.train.sft import SFTConfig

    for cls, section in ((SFTConfig, "sft"), (RewardConfig, "reward"), (PPOConfig, "ppo")):
        cfg = from_dict(cls, {"lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q", "down"]}}, section)
        assert cfg.lora == LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "down"))
        assert from_dict(cls, {}, section).lora is None  # the default: full fine-tuning
        assert cfg.identity("fp32")["lora"]["rank"] == 4  # another LoRA setting is another run
    for bad, key in (({"rank": 0}, "sft.lora.rank"), ({"targets": ["qkv"]}, "sft.lora.targets"),
                     ({"dropout": 1.0}, "sft.lora.dropout"), ({"rnak": 2}, "sft.lora.rnak")):
        with pytest.raises(ConfigError) as err:
            from_dict(SFTConfig, {"lora": bad}, "sft")
        assert err.value.key == key and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(PretrainConfig, {"lora": {"rank": 4}}, "pretrain")
    assert err.value.key == "pretrain.lora" and "parent" in str(err.value) and "\n" not in str(err.value)


def test_ppo_reference_is_the_actor_with_adapters_off(tmp_path):
    import dataclasses

    from palm.model.parallel import process_groups
    from palm.model.reward import HEAD
    from palm.train.finetune import load_parent
    from palm.train.rlhf.config import PPOConfig
    from palm.train.rlhf.roles import build_roles
    from palm.train.rlhf.rollout import micro_batches, sequences_batch
    from palm.train.rlhf.steps import reference_step

    tok = chat_data(tmp_path / "data")["tokenizer"]
    policy = chat_export(tmp_path / "policy", tok)
    reward = make_reward(tmp_path / "reward", tok)
    cfg = dataclasses.replace(PPOConfig(micro_batch_size=2, prompts_per_rollout=2), lora=LoRAConfig(rank=2))
    with process_groups():
        roles = build_roles(cfg, MODEL, policy=policy, critic_from=reward, scorer=lambda p, r: torch.zeros(len(p)))
        assert isinstance(roles.reference, lora.AdaptersOff) and roles.reference.engine is roles.actor
        assert {n for n, p in roles.actor.named_parameters() if p.requires_grad} == \
            {n for n, _ in roles.actor.named_parameters() if lora.is_adapter(n)}
        assert {n for n, p in roles.critic.named_parameters() if p.requires_grad} == \
            {n for n, _ in roles.critic.named_parameters() if lora.is_adapter(n)} | {HEAD}
        with torch.no_grad():  # adapters that matter: the reference must still be the policy export
            for n, p in roles.actor.named_parameters():
                if n.endswith(".lora.b"):
                    p.normal_(0, 0.5)
        prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13]]
        micros = micro_batches(sequences_batch(prompts, responses, 3, MODEL.seq_len), range(2), 2)
        ref = roles.reference.forward(micros, reference_step)[0]["logp"]
        frozen = Engine(MODEL, None, micro_batch_size=2)
        load_parent(frozen, policy)
        want = frozen.forward(micros, reference_step)[0]["logp"]
        actor = roles.actor.forward(micros, reference_step)[0]["logp"]
        # the reward model shares the critic's frozen base (both from the reward export)
        from palm.model.reward import RewardModel
        from palm.train.rlhf.steps import value_step

        scorer = Engine(MODEL, None, chunk=RewardModel, micro_batch_size=2)
        load_parent(scorer, reward)
        before = scorer.forward(micros, value_step())[0]["value"]
        shared = lora.share_frozen(scorer.chunks, roles.critic.chunks)
        assert shared == len(list(scorer.named_parameters())) - 1  # all but the head, which trains
        critic_q = dict(roles.critic.named_parameters())["layers.0.attn.q.weight"]
        assert dict(scorer.named_parameters())["layers.0.attn.q.weight"].data_ptr() == critic_q.data_ptr()
        assert torch.equal(scorer.forward(micros, value_step())[0]["value"], before)
    assert torch.equal(ref, want)
    assert (actor - want).abs().max() > 1e-3


@pytest.mark.dist
def test_ppo_with_lora_trains_the_adapters_and_exports_plain_weights(tmp_path):
    from safetensors.torch import load_file

    from palm.train.loop import export
    from palm.train.rlhf import launch
    from palm.train.rlhf.config import PPOConfig

    data = chat_data(tmp_path / "data")
    policy = make_parent(tmp_path / "policy", data["tokenizer"])
    reward = make_reward(tmp_path / "reward", data["tokenizer"])
    cfg = PPOConfig(train_steps=2, micro_batch_size=4, prompts_per_rollout=4, max_new_tokens=8, ppo_epochs=1,
                    gold_interval=0, dtype="fp32", checkpoint_interval=2, kl_bound=10.0,
                    optim=OptimConfig(lr=3e-2, min_lr=3e-2, warmup_steps=0, weight_decay=0.0),
                    lora=LoRAConfig(rank=4, alpha=32.0))
    result = launch(MODEL, cfg, data=data["sft"], policy=policy, reward=reward, tokenizer_sha256=data["sha"],
                    checkpoints=tmp_path / "ckpt", reports=tmp_path / "reports", run_dir=tmp_path / "run")
    assert result["iterations"] == 2 and result["actor_steps"] == 2
    assert result["kl"] > 0  # the second rollout's policy is not its reference (the base) any more
    export(Path(result["checkpoint"]), tmp_path / "out", {})
    got, parent = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "out", policy))
    assert set(got) == set(parent)
    assert (got["layers.1.mlp.down.weight"] - parent["layers.1.mlp.down.weight"]).abs().max() > 1e-6
    assert torch.equal(got["embedding.weight"], parent["embedding.weight"])


# --- TP=2 against TP=1 (tests/dist/lora_worker.py) ------------------------------------------------

@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_tp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for cmd in ([TORCHRUN, "--standalone", "--nproc-per-node=2", str(WORKER), str(out), "2"],
                [sys.executable, str(WORKER), str(out), "1"]):  # TP=1 also reads the TP=2 checkpoint
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.dist
def test_tp2_trains_the_adapters_like_tp1(tp_runs):
    one, two = torch.load(tp_runs / "tp1.pt"), torch.load(tp_runs / "tp2.pt")
    assert one["trainable"] == two["trainable"] and all(lora.is_adapter(n) for n in one["trainable"])
    for a, b in zip(two["losses"], one["losses"]):
        assert abs(a - b) <= 1e-6 * abs(b), (two["losses"], one["losses"])
    assert set(one["grads"]) == set(two["grads"]) == set(one["trainable"])
    for name, g in one["grads"].items():  # gathered shards; A's gradient complete on every rank
        assert g.norm() > 0, name
        assert rel(two["grads"][name], g) <= 1e-5, name
    for name, w in one["weights"].items():  # 3 AdamW steps; the base untouched in both
        assert (two["weights"][name] - w).abs().max().item() <= 1e-5, name


@pytest.mark.dist
def test_tp2_decoding_and_reference_include_or_drop_the_adapters_like_tp1(tp_runs):
    one, two = torch.load(tp_runs / "tp1.pt"), torch.load(tp_runs / "tp2.pt")
    for d in (one, two):
        assert torch.equal(d["off"], one["plain"]) or (d["off"] - one["plain"]).abs().max() <= 1e-5  # base alone
        assert (d["on"] - d["off"]).abs().max() > 1e-3  # the adapters matter
        assert (d["nograd"] - d["nograd_off"]).abs().max() > 1e-2
        assert (d["fused"] - d["nograd"][:, -1]).abs().max() <= 1e-4  # the decoder folds them in
    assert (two["nograd"] - one["nograd"]).abs().max() <= 1e-5
    assert torch.equal(two["greedy"], one["greedy"])


@pytest.mark.dist
def test_tp2_checkpoint_loads_at_tp1(tp_runs):
    two, loaded = torch.load(tp_runs / "tp2.pt"), torch.load(tp_runs / "resharded.pt")
    assert set(loaded) == set(two["weights"])
    for name, w in two["weights"].items():  # split adapters (column B, row A) gathered back whole
        assert torch.equal(loaded[name], w), name


# --- an sft run with LoRA: resume and export ------------------------------------------------------

@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft_lora")
    data = chat_data(root)
    data["parent"] = make_parent(root / "parent", data["tokenizer"])
    return data


@pytest.mark.dist
def test_sft_with_lora_resumes_exactly_and_exports_plain_weights(tmp_path, sft_inputs):
    import dataclasses
    import json

    from safetensors.torch import load_file

    from palm.train.loop import KILL_ENV, export
    from palm.train.sft import SFTConfig, launch

    cfg = SFTConfig(train_steps=6, micro_batch_size=2, num_microbatches=2, dtype="fp32", log_interval=3,
                    eval_interval=3, eval_batches=2, checkpoint_interval=3, tensor_parallel=2,
                    optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1), lora=LoRAConfig(rank=4, alpha=16.0))

    def run(tmp: Path, cfg: SFTConfig = cfg, env: dict | None = None) -> dict:
        return launch(MODEL, cfg, data=sft_inputs["sft"], parent=sft_inputs["parent"],
                      tokenizer_sha256=sft_inputs["sha"], checkpoints=tmp / "ckpt", reports=tmp / "reports",
                      run_dir=tmp / "run", peak_flops=1e11, env=env)

    straight = run(tmp_path / "a")
    assert straight["val_loss"] < straight["base_val_loss"]  # the adapters learnt something
    with pytest.raises(RuntimeError):  # the workers SIGKILL themselves right after checkpoint 3
        run(tmp_path / "b", env={KILL_ENV: "3"})
    resumed = run(tmp_path / "b")
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    for key in ("final_train_loss", "val_loss", "base_val_loss"):
        assert abs(resumed[key] - straight[key]) <= 1e-6, key
    meta = json.loads((Path(straight["checkpoint"]) / "palm.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["run"]["lora"]["rank"] == 4
    for tag, result in (("a", straight), ("b", resumed)):
        export(Path(result["checkpoint"]), tmp_path / tag / "model", {})
    wa, wb = (load_file(str(tmp_path / t / "model" / "model.safetensors")) for t in "ab")
    parent = load_file(str(sft_inputs["parent"] / "model.safetensors"))
    assert set(wa) == set(wb) == set(parent)  # merged: the parent's parameters, no adapters
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert torch.equal(wa["embedding.weight"], parent["embedding.weight"])  # not a target: frozen
    assert (wa["layers.0.attn.q.weight"] - parent["layers.0.attn.q.weight"]).abs().max() > 1e-5  # merged in
    # a checkpoint of another LoRA setting is another run: not resumed
    other = run(tmp_path / "b", cfg=dataclasses.replace(cfg, lora=LoRAConfig(rank=2)))
    assert other["resumed_from_step"] == 0


@pytest.mark.dist
def test_reward_stage_with_lora_trains_adapters_and_the_head(tmp_path, sft_inputs):
    """The reward stage's job keeps its new head trainable beside the adapters; the export is a
    plain reward model whose head and adapted linears moved and whose embedding did not."""
    from safetensors.torch import load_file

    from palm.model.reward import HEAD, RewardModel
    from palm.train.loop import export
    from palm.train.reward import RewardConfig, launch

    cfg = RewardConfig(train_steps=3, micro_batch_size=4, dtype="fp32", log_interval=3, eval_interval=3,
                       eval_batches=2, checkpoint_interval=3, optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0),
                       lora=LoRAConfig(rank=4))
    result = launch(MODEL, cfg, data=sft_inputs["prefs"], parent=sft_inputs["parent"],
                    tokenizer_sha256=sft_inputs["sha"], checkpoints=tmp_path / "ckpt", reports=tmp_path / "reports",
                    run_dir=tmp_path / "run", peak_flops=1e11)
    export(Path(result["checkpoint"]), tmp_path / "out", {}, chunk=RewardModel)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    parent = load_file(str(sft_inputs["parent"] / "model.safetensors"))
    assert set(got) == set(parent) | {HEAD}
    assert torch.equal(got["embedding.weight"], parent["embedding.weight"])
    assert (got["layers.0.mlp.up.weight"] - parent["layers.0.mlp.up.weight"]).abs().max() > 1e-6
    with torch.no_grad():  # the head moved from its seeded start (a fresh reward model's)
        from palm.model.parallel import process_groups

        with process_groups():
            start = RewardModel(MODEL, seed=cfg.seed).head.weight
        assert (got[HEAD] - start).abs().max() > 1e-6
