"""The benchmarks' own arithmetic: ``benchmarks/ppo_throughput.py --profile`` counts every
matmul's FLOPs from the shapes the profiler records, so its layout of those shapes (``bmm``'s two
operands first, ``baddbmm``'s after the tensor it adds to) is checked here against known calls.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_throughput import matmul_flops  # noqa: E402


def test_matmul_flops_from_profiler_shapes():
    a, w = torch.randn(6, 5), torch.randn(5, 7)
    x, y = torch.randn(3, 4, 5), torch.randn(3, 5, 2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.mm(a, w)
        torch.bmm(x, y)
        torch.baddbmm(torch.zeros(1, 1, 2), x, y)  # the added tensor broadcasts: its shape is not the output's
    counted = {e.key: matmul_flops(e.key, e.input_shapes) for e in prof.key_averages(group_by_input_shape=True)
               if e.key in ("aten::mm", "aten::bmm", "aten::baddbmm")}
    assert counted == {"aten::mm": 2 * 6 * 5 * 7, "aten::bmm": 2 * 3 * 4 * 5 * 2, "aten::baddbmm": 2 * 3 * 4 * 5 * 2}


def test_time_to_loss_interpolates_the_crossing_and_equal_time():
    from time_to_loss import Run

    run = Run.__new__(Run)
    run.curve = [{"step": 0, "seconds": 0.0, "tokens": 0, "val_loss": 9.0},
                 {"step": 10, "seconds": 10.0, "tokens": 100, "val_loss": 6.0},
                 {"step": 20, "seconds": 20.0, "tokens": 200, "val_loss": 4.0}]
    assert run.to_target(5.0) == (15.0, 150.0)  # halfway between the 6.0 and 4.0 validations
    assert run.to_target(6.0) == (10.0, 100.0)
    assert all(v != v for v in run.to_target(3.9))  # never reached: nan
    assert run.loss_at(5.0) == 7.5 and run.loss_at(20.0) == 4.0
    assert run.loss_at(25.0) != run.loss_at(25.0)  # past the end: nan


def test_time_to_loss_runs_both_recipes_and_reports_the_ratio(tmp_path):
    """The benchmark end to end on tiny shards: today's recipe and params.yaml's, one record."""
    import json
    import subprocess

    import yaml

    from helpers import TINY_PRETRAIN, make_shards

    tokens = make_shards(tmp_path / "tokens")
    pretrain = {**TINY_PRETRAIN["pretrain"], "train_steps": 8,
                "optim": {**TINY_PRETRAIN["pretrain"]["optim"], "name": "muon", "schedule": "wsd"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": TINY_PRETRAIN["model"], "pretrain": pretrain}))
    record = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "time_to_loss.py"), "--tokens", str(tokens),
         "--params", str(tmp_path / "params.yaml"), "--eval-every", "4", "--eval-seqs", "8",
         "--record", str(record), "--recipe", "short=new:train_steps=4"],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("time_ratio ")
    body = json.loads(record.read_text())
    assert [r["recipe"] for r in body["recipes"]] == ["today", "new", "short"]
    today, new, short = body["recipes"]
    assert today["steps"] == 400 and new["steps"] == 8 and short["steps"] == 4
    assert today["pretrain"]["optim"]["name"] == "adamw" and new["pretrain"]["optim"]["name"] == "muon"
    assert record.with_suffix(".png").stat().st_size > 0


def test_ranking_value_runs_both_arms_on_tiny_inputs(tmp_path):
    """benchmarks/ranking_value.py end to end on the pydoc-like chat data and tiny exports: every
    (seed, count, arm) run trains a reward model from the gold labeler's rankings; one record."""
    import json
    import subprocess

    import yaml

    from helpers import MODEL, chat_data, make_parent, make_reward, redraw_weights

    from palm.model.network import PaLM
    from palm.model.parallel import process_groups
    from palm.model.weights import export_safetensors

    data = chat_data(tmp_path / "d", valid_fraction=0.5)  # 8 conversations: 4 to rank, 4 held out
    sft = make_parent(tmp_path / "sft", data["tokenizer"])
    config = json.loads((sft / "config.json").read_text())
    with process_groups():  # varied replies (PaLM's own init repeats the prompt's last token)
        net = PaLM(MODEL, seed=3)
        redraw_weights(net, seed=5)
        export_safetensors(net, sft, {**config, "kind": "sft"})
    reward = make_reward(tmp_path / "reward", data["tokenizer"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"reward": {
        "micro_batch_size": 4, "dtype": "fp32", "optim": {"lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1}}}))
    record = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "ranking_value.py"), "--sft-data", str(data["sft"]),
         "--sft", str(sft), "--reward", str(reward), "--params", str(tmp_path / "params.yaml"), "--counts", "1,2",
         "--k", "4", "--pool-factor", "2", "--candidates", "4", "--seeds", "2", "--steps", "2",
         "--max-new-tokens", "16", "--record", str(record)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("uncertain_minus_random ")
    body = json.loads(record.read_text())
    assert [r["rankings"] for r in body["summary"]] == [1, 2] and body["held_out_pairs"] > 0
    assert sorted((r["seed"], r["rankings"], r["arm"]) for r in body["runs"]) == sorted(
        (s, n, a) for s in (0, 1) for n in (1, 2) for a in ("random", "uncertain"))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in body["runs"])
    for row in body["summary"]:  # the uncertain arm's prompts are the ones the reward model separates least
        runs = {(r["seed"], r["arm"]): r for r in body["runs"] if r["rankings"] == row["rankings"]}
        assert all(runs[(s, "uncertain")]["mean_spread"] <= runs[(s, "random")]["mean_spread"] + 1e-9 for s in (0, 1))
    assert record.with_suffix(".png").stat().st_size > 0


def test_lora_memory_measures_both_runs_and_writes_the_record(tmp_path):
    """benchmarks/lora_memory.py end to end on the pydoc-like chat data and a tiny model: PPO through
    the stage's launcher with and without LoRA, each run's peak RSS and the ratio in the record."""
    import json
    import subprocess

    import yaml

    from helpers import MODEL, chat_data

    from palm.core.config import to_dict

    data = chat_data(tmp_path / "d")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": to_dict(MODEL)}))
    record = tmp_path / "record.md"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "lora_memory.py"), "--data", str(data["sft"]),
         "--tokenizer", str(data["tokenizer"] / "tokenizer.json"), "--params", str(tmp_path / "params.yaml"),
         "--sizes", "default", "--iterations", "1", "--prompts", "4", "--new-tokens", "8", "--record", str(record)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ratio ")
    text = record.read_text()
    (row,) = json.loads(text.split("```json\n")[1].split("\n```")[0])
    assert row["d_model"] == MODEL.d_model and row["full"]["iterations"] == row["lora"]["iterations"] == 1
    assert row["full"]["peak_rss_mib"] > 100 and row["lora"]["peak_rss_mib"] > 100  # a whole torch process
    assert row["ratio"] == row["lora"]["peak_rss_mib"] / row["full"]["peak_rss_mib"]
    assert f"| {MODEL.d_model} |" in text
