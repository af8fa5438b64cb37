"""The acceptance run: the whole pipeline with the default params, exactly as `make run` runs it
(`dvc repro` in a fresh copy of the project), then the numbers the defaults promise.

Not part of `make test`: on 2 CPU cores it takes about a quarter of an hour, most of it the
default pretrain. `make check-default` runs it (`pytest -m default`). `make test` covers the same
stages end to end with fewer training steps (tests/test_pipeline_e2e.py).

The time bounds are the project's for a 2-core machine (records: benchmarks/records/); they are
only checked where the run is comparable (2 or more cores, the dtype that `auto` picks there).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import make_project

from palm.train.metrics import X86_BF16, bf16_is_fast, cpu_flags

pytestmark = [pytest.mark.default, pytest.mark.timeout(3600)]
STAGES = ["scrape", "tokenizer", "tokenize", "pretrain", "sft_data", "prefs", "sft", "reward", "gold_reward", "ppo", "dpo",
          "evaluate"]
_FLAGS = cpu_flags() or set()
# x86: from the instruction sets alone (independent of the stage's probe); elsewhere (ARM's bf16
# extension varies in speed) the probe is the rule, so ask it here too
NATIVE_BF16 = bool(_FLAGS & X86_BF16) if "sse2" in _FLAGS else bf16_is_fast()


def dvc(project: Path, *args: str, timeout: int = 3000) -> subprocess.CompletedProcess:
    return subprocess.run([str(project / ".venv" / "bin" / "dvc"), *args], cwd=project, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("default"))
    t0 = time.perf_counter()
    out = dvc(root, "repro")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"default dvc repro: {time.perf_counter() - t0:.0f} s")
    return root


def metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "reports" / stage / "metrics.json").read_text())


def test_every_stage_ran_and_a_second_repro_runs_nothing(project):
    for stage in STAGES:
        m = metrics(project, stage)
        print(f"{stage}: {m.get('stage_seconds', float('nan')):.0f} s")
    out = dvc(project, "repro", timeout=600)
    assert out.returncode == 0 and "Running stage" not in out.stdout, out.stdout


def test_default_pretrain(project):
    m = metrics(project, "pretrain")
    print(f"default pretrain: val_loss {m['val_loss']:.3f} vs unigram {m['unigram_loss']:.3f}, "
          f"{m['tokens_per_s']:.0f} tokens/s in {m['dtype']}, stage {m['stage_seconds']:.0f} s")
    assert m["val_loss"] < m["unigram_loss"] - 1.0  # clearly below: > 1 nat better per token
    assert m["dtype"] == ("bf16" if NATIVE_BF16 else "fp32"), m["dtype"]
    if (os.cpu_count() or 1) >= 2:  # under 6 min on 2 cores in fp32 (AVX2-only), ~2 min in bf16
        assert m["stage_seconds"] < (150 if NATIVE_BF16 else 360), m["stage_seconds"]


def test_default_sft_and_reward(project):
    sft, reward = metrics(project, "sft"), metrics(project, "reward")
    print(f"default sft: val_loss {sft['val_loss']:.3f} vs pretrained {sft['base_val_loss']:.3f} "
          f"({sft['stage_seconds']:.0f} s); reward: val_accuracy {reward['val_accuracy']:.3f}, "
          f"val_margin {reward['val_margin']:.3f} ({reward['stage_seconds']:.0f} s)")
    assert sft["val_loss"] < sft["base_val_loss"]
    assert reward["val_accuracy"] > 0.75
    chain = sum(metrics(project, s)["stage_seconds"] for s in ("sft_data", "sft", "prefs", "reward"))
    print(f"sft_data -> sft -> prefs -> reward: {chain:.0f} s")
    if (os.cpu_count() or 1) >= 2:
        assert chain < 600  # issue 7: under 10 minutes after pretrain on 2 cores


def test_default_ppo_beats_sft_by_the_reward_model(project):
    m = metrics(project, "evaluate")
    print(f"default evaluate: win_rate {m['win_rate']:.3f}, reward sft {m['reward_sft']:.3f} -> ppo "
          f"{m['reward_ppo']:.3f}, kl {m['kl']:.3f}; ppo {metrics(project, 'ppo')['stage_seconds']:.0f} s, "
          f"evaluate {m['stage_seconds']:.0f} s")
    assert m["win_rate"] > 0.6
    assert m["kl"] < m["kl_limit"] and m["kl_within_limit"] == 1  # issue 8: KL to the reference within its bound
    total = sum(metrics(project, s)["stage_seconds"] for s in STAGES)
    print(f"the whole default DAG: {total:.0f} s")
    if (os.cpu_count() or 1) >= 2:
        assert total < 1200  # issue 8: make run under 20 minutes on 2 cores


def test_default_evaluation_reports_the_gold_judge_and_the_overoptimisation_curve(project):
    """Issue 32: the gold keys with standard errors, the gold verdict leading the report, and
    proxy and gold against sqrt(KL). Whether PPO beats SFT on gold is what the record says
    (benchmarks/gold-levers), not an assertion: the default chain does not (docs/evaluation.md)."""
    m = metrics(project, "evaluate")
    for key in ("score", "names", "signature", "f1", "rouge_l", "repetition"):
        assert {f"gold_{key}_sft", f"gold_{key}_ppo", f"gold_{key}_gain", f"gold_{key}_gain_se"} <= set(m), key
    assert {"gold_win_rate", "gold_win_rate_se", "verdict", "eval_set"} <= set(m) and m["verdict"] == 1
    print(f"default gold: score sft {m['gold_score_sft']:.4f} -> ppo {m['gold_score_ppo']:.4f} "
          f"(gain {m['gold_score_gain']:+.4f} ± {m['gold_score_gain_se']:.4f}), gold win rate {m['gold_win_rate']:.3f}")
    page = (project / "reports" / "evaluate" / "report.html").read_text()
    assert page.index("Gold judge") < page.index("Proxy (") and "over-optimisation" in page.lower()
    assert (project / "reports" / "evaluate" / "plots" / "overoptimisation.png").is_file()
