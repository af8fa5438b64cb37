"""The human loop unattended: `palm feedback simulate` (the gold rule judge with seeded noise as
the labeler) and `palm feedback sample --select uncertain`. Unit checks against slow obvious
versions (ranking by the rule's score, the noise's swap rate, the least-separated prompts), the
judgement the page would write, and on tiny configs the whole loop through the real stage entry
points: sample -> simulate -> prefs (format rankings) -> reward -> ppo."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from palm.apps.feedback.sample import batch_items, least_separated, spread  # noqa: E402
from palm.apps.feedback.simulate import gold_scores, item_rng, judgement, noisy_order  # noqa: E402
from palm.data import rules  # noqa: E402
from palm.data.chat_readers import Turn  # noqa: E402
from palm.data.rankings import ordered_pairs, places  # noqa: E402

QUESTION = "What does `json.dumps` do?"
ANSWER = "`json.dumps(obj, *, indent=None)`: Serialize ``obj`` to a JSON formatted ``str``."
REPLIES = [
    "`json.dumps(obj, *, indent=None)`: Serialize obj to a JSON formatted str.",  # nearly the answer
    "json.dumps turns obj into a JSON formatted string.",
    "It reads a file.",
    "Serialize serialize serialize serialize serialize serialize serialize.",
    "`json.dumps(obj, *, indent=None)` serializes.",
]


def items(n: int = 3, batch: str = "batch-1") -> list[dict]:
    """A batch of ``n`` items of REPLIES (rotated) with their reference, as `palm feedback sample` writes it."""
    prompts = [(Turn("user", QUESTION if i % 2 == 0 else f"{QUESTION} Item {i}."),) for i in range(n)]
    replies = [REPLIES[i % len(REPLIES):] + REPLIES[:i % len(REPLIES)] for i in range(n)]
    return batch_items(batch, prompts, replies, {"ref": "models/sft", "kind": "sft"},
                       {"temperature": 1.0, "k": len(REPLIES)}, [ANSWER] * n)


# ----------------------------------------------------------------------------- the simulated labeler

def test_without_noise_the_ranking_is_the_rule_judges_order():
    (item,) = items(1)
    score = [rules.judge(QUESTION, ANSWER, r)["score"] for r in REPLIES]
    assert len(set(score)) == len(score)  # premise: no ties
    assert gold_scores(item) == score
    by_rule = sorted(range(len(REPLIES)), key=lambda i: score[i], reverse=True)
    record = judgement(item, "sim", noise=0.0, seed=7)
    assert record["order"] == by_rule and record["order"][0] == 0  # the documented answer wins
    # equal scores share a place: no pair between two identical replies
    tied = {**item, "replies": [REPLIES[2], REPLIES[0], REPLIES[2]]}
    order = judgement(tied, "sim", noise=0.0, seed=7)["order"]
    assert order == [1, [0, 2]] and ordered_pairs(places("ranked", order, 3)) == [(1, 0), (1, 2)]


def test_seeded_noise_is_deterministic_per_item_and_swaps_at_the_normal_rate():
    batch = items(4)
    once = [judgement(it, "sim", 0.3, seed=5)["order"] for it in batch]
    again = [judgement(it, "sim", 0.3, seed=5)["order"] for it in reversed(batch)][::-1]  # another batch order
    assert once == again
    assert any(judgement(it, "sim", 0.3, seed=6)["order"] != o for it, o in zip(batch, once))  # the seed matters
    # two replies whose scores differ by d swap with probability Phi(-d / (noise * sqrt 2))
    d, noise, trials = 0.1, 0.1, 4000
    swapped = sum(noisy_order([0.5 + d, 0.5], noise, item_rng(s, "b", "i"))[0] == 1 for s in range(trials))
    expected = 0.5 * math.erfc(d / (noise * math.sqrt(2)) / math.sqrt(2))  # Phi(-x) = erfc(x / sqrt 2) / 2
    assert abs(swapped / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials), (swapped, expected)


def test_the_judgement_is_the_record_the_page_writes(tmp_path):
    from palm.apps.feedback.app import create_app
    from palm.apps.feedback.sample import write_batch

    batch = tmp_path / "batch-1.jsonl"
    write_batch(batch, items(2))
    page = tmp_path / "page.jsonl"
    first = json.loads(batch.read_text().splitlines()[0])
    with create_app(batch, page, "alice", token="t", key="k").test_client() as c:
        c.get("/?key=k")
        assert c.post("/api/judge", headers={"X-Feedback-Token": "t"}, json={
            "index": 0, "item": first["item"], "verdict": "ranked", "order": [4, 3, 2, 1, 0]}).status_code == 200
    by_page = json.loads(page.read_text())
    ours = judgement(first, "sim", 0.0, seed=0)
    assert set(ours) == set(by_page)
    assert {k: ours[k] for k in ours if k not in ("order", "labeler", "time")} == \
        {k: by_page[k] for k in by_page if k not in ("order", "labeler", "time")}


def test_simulate_appends_synced_judgements_and_a_second_run_finishes_a_killed_one(tmp_path, capsys):
    from palm.apps.cli import main
    from palm.apps.feedback.sample import write_batch

    batch, rankings = tmp_path / "batch-1.jsonl", tmp_path / "rankings.jsonl"
    write_batch(batch, items(3))
    assert main(["feedback", "simulate", str(batch), "--rankings", str(rankings), "--noise", "0"]) == 0
    lines = rankings.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2]
    assert all(json.loads(x)["labeler"] == "sim" and json.loads(x)["verdict"] == "ranked" for x in lines)
    # killed after the first judgement, halfway through writing the second
    rankings.write_text(lines[0] + "\n" + lines[1][:40])
    assert main(["feedback", "simulate", str(batch), "--rankings", str(rankings), "--noise", "0"]) == 0
    assert "2 items" in capsys.readouterr().err
    again = rankings.read_text().splitlines()
    assert again[0] == lines[0] and again[1] == lines[1][:40]
    assert [json.loads(x)["order"] for x in again[2:]] == [json.loads(x)["order"] for x in lines[1:]]
    assert main(["feedback", "simulate", str(batch), "--rankings", str(rankings)]) == 0  # nothing left
    assert len(rankings.read_text().splitlines()) == 4
    assert main(["feedback", "simulate", str(batch), "--rankings", str(rankings), "--labeler", "sim2",
                 "--noise", "0.2", "--seed", "3"]) == 0  # a second opinion
    assert len(rankings.read_text().splitlines()) == 7


def test_simulate_refuses_in_one_line(tmp_path, capsys):
    from palm.apps.cli import main
    from palm.apps.feedback.sample import write_batch

    def error(*args: str) -> str:
        assert main(["feedback", "simulate", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: feedback: "), lines
        return lines[0]

    old = tmp_path / "old.jsonl"  # a batch from before references, or of a prompts file without them
    write_batch(old, [{k: v for k, v in it.items() if k != "reference"} for it in items(2)])
    assert "item 0 has no reference answer" in error(str(old))
    assert not (tmp_path / "r.jsonl").exists()
    good = tmp_path / "batch.jsonl"
    write_batch(good, items(1))
    assert "--noise: " in error(str(good), "--noise", "-1")
    assert "--noise: " in error(str(good), "--noise", "nan")
    assert "--labeler: '<x>'" in error(str(good), "--labeler", "<x>")
    assert "no such batch file" in error(str(tmp_path / "none.jsonl"))


# ----------------------------------------------------------------------------- --select uncertain

def test_least_separated_picks_the_lowest_spread_prompts():
    rng = random.Random(3)
    rewards = [[round(rng.gauss(0, 1), 1) for _ in range(4)] for _ in range(40)]
    rewards[7] = list(rewards[3])  # an equal spread: the earlier prompt goes first
    rewards[9] = [0.5] * 4  # the reward model cannot tell these apart at all

    def slow(rewards, limit):
        spreads = [statistics.pstdev(r) for r in rewards]
        chosen = []
        for _ in range(limit):
            best = None
            for i, s in enumerate(spreads):
                if i not in chosen and (best is None or s < spreads[best] - 1e-12):
                    best = i
            chosen.append(best)
        return sorted(chosen)

    for limit in (1, 5, 10, 40):
        assert least_separated(rewards, limit) == slow(rewards, limit), limit
    assert least_separated(rewards, 1) == [9]
    assert all(math.isclose(spread(r), statistics.pstdev(r), abs_tol=1e-12) for r in rewards)
    assert (3 in least_separated(rewards, 40)) and least_separated([[1, 2], [2, 1]], 1) == [0]


def test_sample_refuses_selection_flags_that_do_not_go_together_in_one_line(export, tmp_path, capsys):
    from palm.apps.cli import main

    def error(*args: str) -> str:
        assert main(["feedback", "sample", "--model", str(export), "--max-new-tokens", "8", "--out",
                     str(tmp_path / "b.jsonl"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: feedback: "), lines
        return lines[0]

    assert "--select uncertain: needs --reward" in error("--select", "uncertain")
    assert "--pool: " in error("--select", "uncertain", "--reward", str(export), "--limit", "4", "--pool", "3")
    assert "a ppo model, expected reward" in error("--select", "uncertain", "--reward", str(export))
    assert "only with --select uncertain" in error("--reward", str(export))
    assert "only with --select uncertain" in error("--pool", "8")
    assert "--limit: must be >= 1" in error("--limit", "0")
    assert not (tmp_path / "b.jsonl").exists()


# ----------------------------------------------------------------------------- the loop, unattended

TRAIN = {"train_steps": 4, "log_interval": 2, "eval_interval": 2, "checkpoint_interval": 2, "eval_batches": 2,
         "dtype": "fp32", "optim": {"lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1}}
PPO = {"train_steps": 2, "micro_batch_size": 4, "prompts_per_rollout": 4, "max_new_tokens": 8, "dtype": "fp32",
       "checkpoint_interval": 2, "sample_interval": 1, "samples_logged": 2}
LIMIT, K = 32, 4  # the tiny corpus has fewer train prompts: all of them


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict:
    """A tiny project: the sft_data stage on the pydoc-like corpus, a tiny models/sft whose weights
    are redrawn (varied replies), then sample -> simulate -> prefs -> reward -> ppo."""
    from helpers import (
        MODEL,
        make_parent,
        make_project,
        make_tokenizer,
        pydoc_corpus,
        redraw_weights,
        run_stage_cli,
        set_params,
    )

    from palm.apps.cli import main
    from palm.model.network import PaLM
    from palm.model.parallel import process_groups
    from palm.model.weights import export_safetensors

    root = make_project(tmp_path_factory.mktemp("loop"))
    pydoc_corpus(root / "data" / "corpus")
    tok = make_tokenizer(root / "artifacts" / "tokenizer")
    set_params(root, model={"seq_len": MODEL.seq_len}, sft_data={"valid_fraction": 0.3},
               prefs={"path": "data/feedback/rankings.jsonl", "format": "rankings", "valid_fraction": 0.3},
               reward={**TRAIN, "micro_batch_size": 4}, ppo=PPO)
    sft = make_parent(root / "models" / "sft", tok)
    config = json.loads((sft / "config.json").read_text())
    with process_groups():
        net = PaLM(MODEL, seed=3)
        redraw_weights(net, seed=5)
        export_safetensors(net, sft, {**config, "kind": "sft"})
    results = {"root": root}

    def stage(name: str, *args: str) -> None:
        res = run_stage_cli(name, [*args, "--no-mlflow"], cwd=root)
        assert res.returncode == 0, f"{name}:\n{res.stderr[-3000:]}"

    stage("sft_data", "--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--out", "data/sft")
    batch, rankings = root / "data" / "feedback" / "batch-1.jsonl", root / "data" / "feedback" / "rankings.jsonl"
    assert main(["feedback", "sample", "--model", str(sft), "--sft-data", str(root / "data" / "sft"), "--limit",
                 str(LIMIT), "--k", str(K), "--max-new-tokens", "8", "--out", str(batch)]) == 0
    assert main(["feedback", "simulate", str(batch), "--rankings", str(rankings), "--noise", "0.05",
                 "--seed", "1"]) == 0
    stage("prefs", "--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--out", "data/prefs")
    stage("reward", "--data", "data/prefs", "--parent", "models/sft", "--checkpoints", "checkpoints/reward",
          "--out", "models/reward")
    stage("ppo", "--data", "data/sft", "--policy", "models/sft", "--reward", "models/reward",
          "--checkpoints", "checkpoints/ppo", "--out", "models/ppo")
    results["uncertain"] = root / "data" / "feedback" / "batch-2.jsonl"
    assert main(["feedback", "sample", "--model", str(sft), "--sft-data", str(root / "data" / "sft"), "--limit", "2",
                 "--select", "uncertain", "--reward", str(root / "models" / "reward"), "--pool", "4", "--k", "3",
                 "--max-new-tokens", "8", "--seed", "2", "--out", str(results["uncertain"])]) == 0
    return results


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.timeout(1200)
def test_sample_simulate_prefs_reward_ppo_unattended(loop):
    from helpers import metrics

    from palm.data.chat import load_prefs, load_sft

    root = loop["root"]
    batch = [json.loads(x) for x in (root / "data" / "feedback" / "batch-1.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (root / "data" / "feedback" / "rankings.jsonl").read_text().splitlines()]
    prompts = len(batch)
    assert len(judged) == prompts >= 4 and all(it["reference"].strip() for it in batch)
    # each reference is the conversation's own last reply in data/sft
    sha = json.loads((root / "data" / "sft" / "meta.json").read_text())["tokenizer_sha256"]
    texts = "".join(r["text"] for r in load_sft(root / "data" / "sft", "train", sha).to_pylist())
    assert all(f"<|assistant|>{it['reference']}<|end|>" in texts for it in batch)
    assert [(j["item"], j["labeler"], j["verdict"]) for j in judged] == [(it["item"], "sim", "ranked") for it in batch]

    # the rankings, read into pairs: every two differently placed distinct replies, the better one chosen
    prefs = metrics(root, "prefs")
    assert (prefs["rankings"], prefs["rankings_ranked"], prefs["rankings_labelers"]) == (prompts, prompts, 1)
    expected = set()
    for j in judged:
        for better, worse in ordered_pairs(places("ranked", j["order"], K)):
            if j["replies"][better] != j["replies"][worse]:
                expected.add((j["prompt"][-1]["content"], j["replies"][better], j["replies"][worse]))
    splits = sorted(f.stem for f in (root / "data" / "prefs").glob("*.parquet"))  # train, valid (and any other)
    rows = [r for s in splits for r in load_prefs(root / "data" / "prefs", s, sha).to_pylist()]
    got = {(r["prompt"].split("<|user|>")[-1].split("<|end|>")[0], r["chosen"], r["rejected"]) for r in rows}
    assert prefs["kept"] == len(rows) == len(expected) > prompts and got == expected

    reward = metrics(root, "reward")
    assert reward["steps"] == TRAIN["train_steps"] and reward["train_pairs"] == prefs["train"]
    assert 0 < reward["valid_pairs"] <= prefs["valid"] and 0.0 <= reward["val_accuracy"] <= 1.0
    assert math.isfinite(reward["val_loss"]) and reward["reward_std"] > 0
    assert json.loads((root / "models" / "reward" / "config.json").read_text())["kind"] == "reward"

    ppo = metrics(root, "ppo")
    assert ppo["iterations"] == PPO["train_steps"] and math.isfinite(ppo["reward"]) and math.isfinite(ppo["kl"])
    assert json.loads((root / "models" / "ppo" / "config.json").read_text())["kind"] == "ppo"


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.timeout(1200)
def test_select_uncertain_keeps_the_prompts_the_trained_reward_model_separates_least(loop):
    from palm.apps.feedback.sample import SampleSettings, reward_scores, sample_replies, split_prompts
    from palm.decode.generate import SamplingConfig
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    root = loop["root"]
    kept = [json.loads(x) for x in loop["uncertain"].read_text().splitlines()]
    assert len(kept) == 2 and all(len(it["replies"]) == 3 and it["reference"] for it in kept)
    sft, rm = read_export(root / "models" / "sft"), read_export(root / "models" / "reward")
    tok = load_tokenizer(sft)
    pool = split_prompts(root / "data" / "sft", tok, sft.tokenizer_sha256, 4)
    with process_groups():  # the pool again: the same seed gives the same replies
        replies = sample_replies(load_model(sft), tok, [p for p, _ in pool], SamplingConfig(1.0),
                                 SampleSettings(k=3, max_new_tokens=8, seed=2))
        scores = reward_scores(load_model(rm), tok, [p for p, _ in pool], replies, rm.config["reward"])
    spreads = [statistics.pstdev(s) for s in scores]
    lowest = sorted(sorted(range(4), key=lambda i: spreads[i])[:2])
    assert [it["prompt"][-1]["content"] for it in kept] == [pool[i][0][-1].text for i in lowest]
    assert [it["replies"] for it in kept] == [replies[i] for i in lowest]
    for it, i in zip(kept, lowest):
        sel = it["selection"]
        assert sel["method"] == "uncertain" and sel["pool"] == 4 and sel["reward_model"]["kind"] == "reward"
        assert sel["rewards"] == pytest.approx(scores[i]) and sel["spread"] == pytest.approx(spreads[i])
    assert max(spreads[i] for i in lowest) <= min(s for i, s in enumerate(spreads) if i not in lowest)
