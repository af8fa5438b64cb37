"""SFT at the library level: the objective against a naive masked mean over the assistant tokens,
the data order and validation split, starting from the parent's weights, and exact resume after
SIGKILL (torchrun, like pretraining)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, chat_data, make_parent  # noqa: E402

from palm.train.engine import Engine, OptimConfig  # noqa: E402
from palm.train.finetune import EpochOrder, load_parent, pad, padded_length, valid_rows  # noqa: E402
from palm.train.loop import KILL_ENV, export  # noqa: E402
from palm.train.sft import SFTConfig, batch, conversation_batch, launch, read_rows, sft_forward_step  # noqa: E402

CFG = SFTConfig(train_steps=6, micro_batch_size=2, num_microbatches=2, dtype="fp32", log_interval=3,
                eval_interval=3, eval_batches=2, checkpoint_interval=3,
                optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    data = chat_data(root)
    data["parent"] = make_parent(root / "parent", data["tokenizer"])
    return data


def test_sft_loss_is_the_mean_nll_over_exactly_the_assistant_tokens(inputs, single):
    from palm.model.parallel import gather_vocab

    rows = read_rows(inputs["sft"], "train", inputs["sha"])
    assert len(rows) >= 5
    length = padded_length((len(r["input_ids"]) - 1 for r in rows), MODEL.seq_len)
    batches = [conversation_batch(rows[:3], length), conversation_batch(rows[3:5] + [None], length)]
    engine = Engine(MODEL, None, forward_step=sft_forward_step(), micro_batch_size=3, seq_len=length)
    load_parent(engine, inputs["parent"])
    got = engine.evaluate(batches)["loss"]
    # without pipeline stages each micro-batch pads only to its own longest row: the same loss
    own = [batch(rows[:3], length, CFG), batch(rows[3:5] + [None], length, CFG)]
    assert [b["tokens"].shape[1] for b in own] == [padded_length([len(r["input_ids"]) - 1 for r in part], length)
                                                   for part in (rows[:3], rows[3:5])]
    assert engine.evaluate(own)["loss"] == pytest.approx(got, rel=1e-6)
    assert batch(rows[:3], length, dataclasses.replace(CFG, pipeline_parallel=2))["tokens"].shape[1] == length

    # naive: each conversation alone, unpadded; every position whose next token is an assistant
    # token (its text or <|end|>: loss_mask 1) adds -log p(next token), in float64
    model, total, count = engine.chunks[0], 0.0, 0
    with torch.no_grad():
        for r in rows[:5]:
            ids = r["input_ids"]
            logp = gather_vocab(model(torch.tensor([ids]))).double().log_softmax(-1)[0]
            for t in range(1, len(ids)):
                if r["loss_mask"][t]:
                    total -= logp[t - 1, ids[t]].item()
                    count += 1
    assert count == sum(sum(r["loss_mask"]) for r in rows[:5]) > 0
    assert sum(b["loss_mask"].sum().item() for b in batches) == count
    assert abs(got - total / count) <= 1e-5 * abs(total / count)


def test_conversation_batch_shifts_and_pads():
    rows = [{"input_ids": [3, 10, 11, 5, 4, 12, 5], "loss_mask": [0, 0, 0, 0, 0, 1, 1]}, None]
    b = conversation_batch(rows, 8)
    assert b["tokens"].tolist() == [[3, 10, 11, 5, 4, 12, 0, 0], [0] * 8]
    assert b["labels"].tolist() == [[10, 11, 5, 4, 12, 5, 0, 0], [0] * 8]
    # the loss counts the predictions of 12 (at position 4) and <|end|> (position 5), nothing else
    assert b["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8]
    assert pad([[1, 2]], 4, "left").tolist() == [[0, 0, 1, 2]]
    assert padded_length([5, 17, 3], 256) == 32 and padded_length([300], 256) == 256


def test_epoch_order_covers_every_row_once_per_epoch_across_dp_ranks():
    order = EpochOrder(10, seed=3)
    seen = []
    for step in range(5):  # 5 steps x 2 DP ranks x 2 micro-batches x 1 row = 2 epochs
        for rank in range(2):
            seen += [i for m in order.rows(step, micro_batch_size=1, num_microbatches=2, dp_rank=rank, dp_size=2)
                     for i in m]
    assert sorted(seen[:10]) == list(range(10)) == sorted(seen[10:]) and seen[:10] != seen[10:]
    assert EpochOrder(10, seed=3).rows(3, micro_batch_size=2, num_microbatches=1, dp_rank=1, dp_size=2) == \
        order.rows(3, micro_batch_size=2, num_microbatches=1, dp_rank=1, dp_size=2)  # depends on the step only
    # validation: rows 0..6 once over 2 DP ranks, padded with None to equal micro-batch counts
    parts = [valid_rows(7, micro_batch_size=2, max_microbatches=4, dp_rank=r, dp_size=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2
    flat = [i for p in parts for m in p for i in m]
    assert sorted(i for i in flat if i is not None) == list(range(7)) and flat.count(None) == 1
    capped = valid_rows(7, micro_batch_size=2, max_microbatches=1, dp_rank=0, dp_size=1)
    assert capped == [[0, 1]]


def run(tmp: Path, inputs: dict, cfg: SFTConfig = CFG, env: dict | None = None) -> dict:
    return launch(MODEL, cfg, data=inputs["sft"], parent=inputs["parent"], tokenizer_sha256=inputs["sha"],
                  checkpoints=tmp / "ckpt", reports=tmp / "reports", run_dir=tmp / "run", peak_flops=1e11, env=env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.dist
def test_sft_trains_from_the_parent_and_resumes_exactly_after_sigkill(tmp_path, inputs):
    straight = run(tmp_path / "a", inputs)
    export(Path(straight["checkpoint"]), tmp_path / "a" / "model", {})
    # the parent's loss on the held-out replies is measured before training, and training lowers it
    assert straight["val_loss"] < straight["base_val_loss"]
    assert straight["valid_conversations"] > 0 and straight["train_conversations"] > 0
    assert straight["val_perplexity"] == pytest.approx(torch.tensor(straight["val_loss"]).exp().item())

    with pytest.raises(RuntimeError):  # the worker SIGKILLs itself right after checkpoint 3
        run(tmp_path / "b", inputs, env={KILL_ENV: "3"})
    assert (tmp_path / "b" / "ckpt" / "latest").read_text().strip() == "step_0000003"
    resumed = run(tmp_path / "b", inputs)
    export(Path(resumed["checkpoint"]), tmp_path / "b" / "model", {})
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    for key in ("final_train_loss", "val_loss", "base_val_loss"):
        assert abs(resumed[key] - straight[key]) <= 1e-6, key
    wa, wb = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    rows = (tmp_path / "b" / "reports" / "curve.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "3", "6"]
    assert rows[0].startswith("step,loss,val_loss,")
    assert set(weights(inputs["parent"])) == set(wa)  # the parent's parameters, no more, no fewer
    meta = json.loads((tmp_path / "a" / "ckpt" / "step_0000006" / "palm.json").read_text())
    assert len(meta["run"]["parent_sha256"]) == len(meta["run"]["data_sha256"]) == 64  # in the identity
