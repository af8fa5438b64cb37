"""Acceptance 2 and 6 at the library level: exact resume after SIGKILL, TP=2 -> TP=1 checkpoint
loading, and one-line errors for bad input, under the default recipe's optimizer (Muon + AdamW,
warmup-stable-decay; the fine-tuning stages' tests resume AdamW). Token shards are tiny ones made here with megatron's
IndexedDatasetBuilder (make_shards in tests/helpers.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers import SHARDS_SHA, make_shards  # noqa: E402

from palm.core.config import ConfigError  # noqa: E402
from palm.core.errors import UserError  # noqa: E402
from palm.model.network import ModelConfig  # noqa: E402
from palm.train import checkpoint as ckpt  # noqa: E402
from palm.train import data  # noqa: E402
from palm.train.engine import OptimConfig  # noqa: E402
from palm.train.pretrain import KILL_ENV, PretrainConfig, evaluate_checkpoint, export, launch  # noqa: E402

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, seq_len=32)
CFG = PretrainConfig(train_steps=12, micro_batch_size=4, num_microbatches=2, dtype="fp32",
                     log_interval=4, eval_interval=4, eval_batches=2, checkpoint_interval=4,
                     optim=OptimConfig(name="muon", schedule="wsd", lr=1e-2, min_lr=1e-3, warmup_steps=2))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "tokens")


def run(tmp: Path, tokens: Path, cfg: PretrainConfig = CFG, env: dict | None = None) -> dict:
    return launch(MODEL, cfg, tokens=tokens, tokenizer_sha256=SHARDS_SHA, checkpoints=tmp / "ckpt",
                  reports=tmp / "reports", run_dir=tmp / "run", peak_flops=1e11, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokens) -> tuple[Path, dict]:
    """An uninterrupted run of CFG (and its export), the reference of the resume tests."""
    tmp = tmp_path_factory.mktemp("straight")
    result = run(tmp, tokens)
    export(Path(result["checkpoint"]), tmp / "model", {})
    return tmp, result


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.dist
def test_sigkill_after_checkpoint_then_restart_equals_uninterrupted(tmp_path, tokens, straight):
    straight_dir, straight = straight
    with pytest.raises(RuntimeError):  # every rank SIGKILLs itself right after checkpoint 8
        run(tmp_path / "b", tokens, env={KILL_ENV: "8"})
    assert (tmp_path / "b" / "ckpt" / "latest").read_text().strip() == "step_0000008"
    resumed = run(tmp_path / "b", tokens)
    export(Path(resumed["checkpoint"]), tmp_path / "b" / "model", {})
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == 12
    assert abs(resumed["final_train_loss"] - straight["final_train_loss"]) <= 1e-6
    assert abs(resumed["val_loss"] - straight["val_loss"]) <= 1e-6
    wa, wb = weights(straight_dir / "model"), weights(tmp_path / "b" / "model")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    # the curve reads as one run: rows 4, 8, 12 exactly once
    rows = (tmp_path / "b" / "reports" / "curve.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "4", "8", "12"]


@pytest.mark.dist
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tokens, straight):
    _, straight = straight
    with pytest.raises(RuntimeError):
        run(tmp_path / "b", tokens, env={KILL_ENV: "8"})
    newest = tmp_path / "b" / "ckpt" / "step_0000008"
    for shard in newest.glob("*.distcp"):  # a torn write: the shards cut short
        shard.write_bytes(shard.read_bytes()[:100])
    resumed = run(tmp_path / "b", tokens)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 12
    assert abs(resumed["final_train_loss"] - straight["final_train_loss"]) <= 1e-6
    assert abs(resumed["val_loss"] - straight["val_loss"]) <= 1e-6


@pytest.mark.dist
def test_new_shards_from_the_same_tokenizer_retrain_instead_of_resuming(tmp_path, tokens):
    first = run(tmp_path, tokens, dataclasses.replace(CFG, train_steps=4))
    assert first["resumed_from_step"] == 0
    again = run(tmp_path, tokens, dataclasses.replace(CFG, train_steps=4))
    assert again["resumed_from_step"] == 4  # same shards: the finished run is resumed, not redone
    other = make_shards(tmp_path / "other" / "tokens", seed=1)  # same tokenizer sha256, other data
    fresh = run(tmp_path, other, dataclasses.replace(CFG, train_steps=4))
    assert fresh["resumed_from_step"] == 0 and fresh["steps"] == 4
    assert fresh["val_loss"] != first["val_loss"]


@pytest.mark.dist
def test_tp2_checkpoint_loads_at_tp1_with_the_same_loss(tmp_path, tokens):
    cfg = dataclasses.replace(CFG, tensor_parallel=2, train_steps=4)
    result = run(tmp_path, tokens, cfg)
    # the same validation batches, evaluated here in one process at TP=1 from the TP=2 checkpoint
    val = evaluate_checkpoint(Path(result["checkpoint"]), tokens, cfg, run_dir=tmp_path / "eval")
    assert abs(val - result["val_loss"]) <= 1e-5 * abs(result["val_loss"])
    config = export(Path(result["checkpoint"]), tmp_path / "model", {})
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model"] == config["model"]
    assert weights(tmp_path / "model")["layers.0.attn.q.weight"].shape == (32, 32)
    # the export loads back into the same function as the checkpoint (one process, TP=1)
    from palm.model import parallel
    from palm.model.network import PaLM
    from palm.model.weights import load_exported

    parallel.init_distributed()
    try:
        exported, _ = load_exported(tmp_path / "model")
        direct = PaLM(MODEL)
        ckpt.load_model([direct], Path(result["checkpoint"]))
        tokens = torch.randint(0, MODEL.vocab_size, (2, 16))
        with torch.no_grad():
            assert torch.equal(exported(tokens), direct(tokens))
            assert exported.hidden_states(tokens).shape == (2, 16, 32)
    finally:
        parallel.teardown()


# --- bad input: one clear line each ---------------------------------------------------------------

def test_tp_not_dividing_heads_names_the_fields():
    with pytest.raises(ConfigError, match=r"pretrain.tensor_parallel: model.n_heads=2 is not divisible by tensor_parallel=4"):
        MODEL.check_parallel(4, 1)


def test_pp_not_dividing_layers_names_the_fields():
    with pytest.raises(ConfigError, match=r"pretrain.pipeline_parallel: model.n_layers=2 is not divisible by pipeline_parallel=4"):
        MODEL.check_parallel(1, 4)


def test_world_size_must_be_tp_pp_dp():
    from palm.model import parallel

    try:
        with pytest.raises(UserError, match=r"world size 1 != tensor_parallel x pipeline_parallel x data_parallel = 2 x 1 x 1 = 2"):
            parallel.init_distributed(2, 1, 1)
    finally:
        parallel.teardown()


def test_missing_shards(tmp_path):
    with pytest.raises(UserError, match="no meta.json; run the tokenize stage"):
        data.check_shards(tmp_path)
    make_shards(tmp_path / "t", docs=10)
    (tmp_path / "t" / "valid.idx").unlink()
    with pytest.raises(UserError, match=r"valid.idx: token shard missing or empty"):
        data.check_shards(tmp_path / "t")


def test_shards_of_another_tokenizer_are_refused(tokens):
    with pytest.raises(UserError, match=r"made by tokenizer sha256 ababababab.*but the tokenizer given has cdcdcd.*re-tokenize"):
        data.check_shards(tokens, "cd" * 32)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tokens):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "palm.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt checkpoint"):
        ckpt.check_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "palm.json").write_text("{}")
    with pytest.raises(UserError, match="corrupt checkpoint .megatron metadata.json"):
        ckpt.check_checkpoint(tmp_path / "c")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("step_0000004\n")
    with pytest.raises(UserError, match="checkpoint folder not found"):
        ckpt.latest(tmp_path / "ck")


def test_config_values_are_checked():
    with pytest.raises(ConfigError, match="dtype: must be auto, fp32 or bf16"):
        PretrainConfig(dtype="fp16")
    with pytest.raises(ConfigError, match="head_dim: must be even"):
        ModelConfig(head_dim=15)
