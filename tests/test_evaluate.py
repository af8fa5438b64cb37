"""The `evaluate` stage (palm/eval/evaluate.py, palm/eval/report.py, stages/evaluate.py) on tiny exports:
a policy against itself ties everywhere (win rate 0.5, KL 0); the reply log-probs equal
generation's own; SFT, PPO and DPO compared in one run, PPO's numbers the same as without DPO, DPO's
held-out preference accuracy against a slow loop; a judge a policy trained against is no gold for it; the stage writes its metrics, plots and one self-contained, escaped HTML report
and logs them to MLflow; bad input is one line and leaves nothing behind."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402
    EVAL_CFG,
    EVALUATE_ARGS,
    MODEL,
    chat_data,
    make_eval_reward,
    make_parent,
    make_tokenizer,
    make_tokens,
    with_kind,
)

from palm.core.config import to_dict  # noqa: E402
from palm.core.errors import ConfigError, UserError  # noqa: E402
from palm.core.tokenizer import sha256_file  # noqa: E402
from palm.eval.evaluate import (  # noqa: E402
    EvaluateConfig, champion_policy, evaluate, held_out_prompts, response_logprobs, sample)
from palm.model.export import load_model, read_export  # noqa: E402
from palm.model.parallel import process_groups  # noqa: E402

DPO = {"loss": "sigmoid", "beta": 0.5, "label_smoothing": 0.0, "simpo_gamma": 0.5}  # the dpo stage's config
KEYS = {"win_rate", "reward_sft", "reward_ppo", "kl", "reward_gain", "length_sft", "length_ppo", "ended_sft",
        "ended_ppo", "reward_accuracy", "reward_margin", "prompts", "pairs", "kl_limit", "kl_within_limit",
        "win_rate_se", "samples_per_prompt",
        *(f"{p}_{m}" for p in ("perplexity", "reply_perplexity") for m in ("pretrain", "sft", "ppo"))}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """data/{sft,prefs,tokens}, models/{pretrain,sft,ppo,dpo,reward,gold_reward} (ppo, dpo: other
    random policies; gold_reward: another random reward model), models/same and models/same_dpo
    (copies of sft as PPO and as DPO: a policy against itself) and models/rule_ppo (ppo's weights,
    trained, its config says, on the rule checks beside the reward model)."""
    root = tmp_path_factory.mktemp("eval")
    data = chat_data(root / "data", valid_fraction=0.5)
    tok = data["tokenizer"]
    make_tokens(root / "data" / "tokens", tok)
    models = root / "models"
    make_parent(models / "pretrain", tok, seed=11)
    with_kind(make_parent(models / "sft", tok, seed=12), "sft")
    with_kind(make_parent(models / "ppo", tok, seed=13), "ppo")
    with_kind(shutil.copytree(models / "sft", models / "same"), "ppo")
    with_kind(make_parent(models / "dpo", tok, seed=14), "dpo", parent="models/sft", dpo=DPO)
    with_kind(shutil.copytree(models / "sft", models / "same_dpo"), "dpo", parent="models/sft", dpo=DPO)
    with_kind(shutil.copytree(models / "ppo", models / "rule_ppo"), "ppo",
              reward=[{"name": "model", "weight": 1.0}, {"name": "rule", "weight": 0.5}])
    make_eval_reward(models / "reward", tok)
    with_kind(make_eval_reward(models / "gold_reward", tok, seed=9), "reward", split="gold")
    return root


def paths(root: Path, ppo: str = "ppo", gold: str = "gold_reward", dpo: str | None = None) -> dict:
    models = {n: root / "models" / n for n in ("pretrain", "sft", "reward")} | {"ppo": root / "models" / ppo,
                                                                                "gold_reward": root / "models" / gold}
    if dpo:
        models["dpo"] = root / "models" / dpo
    return {"models": models, "sft_data": root / "data" / "sft", "prefs": root / "data" / "prefs",
            "tokens": root / "data" / "tokens"}


def valid_prompts(root: Path) -> list[dict]:
    from palm.data.chat import load_sft

    sha = sha256_file(root / "models" / "sft" / "tokenizer.json")
    return held_out_prompts(load_sft(root / "data" / "sft", "valid", sha).to_pylist(), 0)


def test_a_policy_against_itself_ties_everywhere(project):
    ev = evaluate(EVAL_CFG, **paths(project, ppo="same"))
    m = ev.metrics
    assert KEYS <= set(m) and m["prompts"] == len(valid_prompts(project)) and 0 < m["pairs"] <= EVAL_CFG.pairs
    assert m["win_rate"] == 0.5 and m["kl"] == 0.0  # same seeds, same samples, same scores
    assert m["kl_limit"] == EVAL_CFG.kl_limit and m["kl_within_limit"] == 1
    assert ev.rewards["sft"] == ev.rewards["ppo"] and m["reward_sft"] == m["reward_ppo"]
    assert m["length_sft"] == m["length_ppo"] <= EVAL_CFG.max_new_tokens
    assert m["perplexity_sft"] == m["perplexity_ppo"] and m["perplexity_sft"] != m["perplexity_pretrain"]
    for key in KEYS:
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    assert 1.0 < m["perplexity_pretrain"] and 1.0 < m["reply_perplexity_sft"]
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and 0.0 <= m["ended_sft"] <= 1.0
    assert len(ev.samples) == min(3, m["prompts"]) and ev.samples[0]["prompt"].endswith("<|assistant|>")
    assert ev.samples[0]["sft"] == ev.samples[0]["ppo"]


def test_another_policy_and_the_reply_logprobs(project):
    m = evaluate(EVAL_CFG, **paths(project)).metrics
    assert 0.0 <= m["win_rate"] <= 1.0 and m["kl"] > 0  # two random policies are far apart
    ex = read_export(project / "models" / "ppo")
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    with process_groups():
        model = load_model(ex)
        (gen,) = sample(model, prompts, EVAL_CFG, stop_ids=(), pad_id=0)
        logp = response_logprobs(model, gen)  # one forward pass over the padded batch
    assert torch.allclose(logp, gen.raw_logprobs, atol=1e-5)  # what generation itself reported


def test_several_replies_per_prompt(project):
    cfg = EvaluateConfig(**{**to_dict(EVAL_CFG), "samples_per_prompt": 3})
    same = evaluate(cfg, **paths(project, ppo="same"))
    assert same.metrics["win_rate"] == 0.5 and same.metrics["kl"] == 0.0 and same.metrics["samples_per_prompt"] == 3
    n = same.metrics["prompts"]
    assert len(same.rewards["sft"]) == 3 * n
    r = torch.tensor(same.rewards["sft"]).view(n, 3)
    assert not torch.equal(r[:, 0], r[:, 1])  # three draws of each prompt, not one draw thrice
    other = evaluate(cfg, **paths(project)).metrics
    assert 0.0 <= other["win_rate"] <= 1.0 and other["win_rate_se"] >= 0
    assert "win_rate_se" not in evaluate(EvaluateConfig(**{**to_dict(EVAL_CFG), "prompts": 1}),
                                         **paths(project, ppo="same")).metrics  # one prompt: no spread


def test_win_rate_and_its_standard_error_against_loops():
    from palm.eval.evaluate import win_rate

    g = torch.Generator().manual_seed(0)
    ours, theirs = torch.randint(0, 4, (20, 3), generator=g).double(), torch.randint(0, 4, (20, 3), generator=g).double()
    shares = []
    for i in range(20):
        score = 0.0
        for j in range(3):
            score += 1.0 if ours[i, j] > theirs[i, j] else 0.5 if ours[i, j] == theirs[i, j] else 0.0
        shares.append(score / 3)
    mean = sum(shares) / 20
    se = math.sqrt(sum((s - mean) ** 2 for s in shares) / 19 / 20)
    got, got_se = win_rate(ours.flatten(), theirs.flatten(), 3)
    assert got == pytest.approx(mean, abs=1e-12) and got_se == pytest.approx(se, abs=1e-12)
    assert win_rate(torch.ones(4), torch.zeros(4)) == (1.0, 0.0)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        EvaluateConfig(samples_per_prompt=0)


def test_held_out_prompts_end_before_the_last_reply():
    rows = [{"input_ids": [3, 10, 11, 5, 4, 12, 5, 3, 13, 5, 4, 14, 15, 5],
             "loss_mask": [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]},
            {"input_ids": [3, 10, 11, 5, 4, 20, 5], "loss_mask": [0, 0, 0, 0, 0, 1, 1]}]
    (p,) = held_out_prompts(rows, 0)[:1]
    assert p["prompt_ids"] == [3, 10, 11, 5, 4, 12, 5, 3, 13, 5, 4] and p["reply_ids"] == [14, 15, 5]
    assert len(held_out_prompts(rows, 0)) == 2 and len(held_out_prompts(rows, 1)) == 1
    assert len(held_out_prompts(rows + rows, 0)) == 2  # the same prompt once


def stage_project(project: Path, tmp_path: Path, monkeypatch, **params) -> Path:
    import yaml

    root = tmp_path / "p"
    shutil.copytree(project, root)
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": {**to_dict(EVAL_CFG), **params}}))
    monkeypatch.chdir(root)
    return root


def test_stage_writes_metrics_plots_and_report_and_logs_them(project, tmp_path, monkeypatch):
    import mlflow

    from stages.evaluate import main

    root = stage_project(project, tmp_path, monkeypatch, prompts=0)
    (root / "reports" / "sft").mkdir(parents=True)
    (root / "reports" / "sft" / "curve.csv").write_text(
        "step,loss,val_loss,tokens_per_s\n2,5.1,,100\n4,4.0,4.5,110\n6,3.2,,\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(EVALUATE_ARGS) == 0
    out = root / "reports" / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics) and metrics["prompts"] == len(valid_prompts(root))  # 0: every one
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["curve_sft.png", "rewards.png"]
    for png in (out / "plots").iterdir():
        assert png.read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "No curve for: pretrain" in page
    assert "<|assistant|>" not in page and "&lt;|assistant|&gt;" in page  # prompts shown escaped
    assert "Proxy (the reward model PPO was trained to maximise" in page and f"{100 * metrics['win_rate']:.1f}" in page
    assert page.index("Gold judge") < page.index("Proxy (")  # the gold verdict leads

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("palm-rlhf").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["win_rate"] == metrics["win_rate"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "rewards.png", "curve_sft.png", "champion-hf"} <= logged

    # the champion's Hugging Face folder: this evaluation's pick, loadable by transformers, logged whole
    champion = metrics["champion"]
    assert champion in ("sft", "ppo") and run.data.tags["palm.champion"] == champion
    assert champion == champion_policy(metrics, ("ppo",), EVAL_CFG.champion_metric, EVAL_CFG.champion_direction)[0]
    hf = root / "models" / "champion-hf"
    from palm.model.hf import read_hf

    assert read_hf(hf)["kind"] == champion
    files = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "champion-hf")}
    assert files == {f.name for f in hf.iterdir()} >= {"config.json", "model.safetensors", "modeling_palm.py"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    assert model.config.palm_export["kind"] == champion


def test_the_champion_is_the_policy_that_beats_sft_by_the_rule_else_sft():
    """champion_policy against the rule written out: a policy must pass its own checks (KL within
    the limit, a verdict, a judge it did not train against) and beat SFT's neutral value (win
    rate 0.5; gains 0) or SFT's own measure (``reward_sft``), and every other such policy."""
    base = {"kl_within_limit": 1, "verdict": 1, "kl_within_limit_dpo": 1}
    win = dict(base, gold_win_rate=0.55, gold_win_rate_dpo=0.6)
    assert champion_policy(win, ("ppo", "dpo"), "gold_win_rate", "max")[0] == "dpo"
    assert champion_policy(win, ("ppo",), "gold_win_rate", "max")[0] == "ppo"
    lose = dict(base, gold_win_rate=0.42, gold_win_rate_dpo=0.5)  # a tie is no gain
    name, why = champion_policy(lose, ("ppo", "dpo"), "gold_win_rate", "max")
    assert name == "sft" and why == "gold_win_rate (max): sft 0.5, ppo 0.42; dpo 0.5"
    far = dict(win, kl_within_limit_dpo=0, kl_dpo=9.0, kl_limit=2.0)
    assert champion_policy(far, ("ppo", "dpo"), "gold_win_rate", "max")[0] == "ppo"
    hacked = dict(win, trained_on_rule_ppo=1, trained_on_rule_dpo=1)  # a gold_ metric is the rule judge's
    assert champion_policy(hacked, ("ppo", "dpo"), "gold_win_rate", "max")[0] == "sft"
    assert champion_policy(dict(win, verdict=0), ("ppo", "dpo"), "gold_win_rate", "max")[0] == "sft"
    own = dict(base, reward_sft=0.3, reward_ppo=0.2, reward_dpo=0.1)
    assert champion_policy(own, ("ppo", "dpo"), "reward_ppo", "max")[0] == "sft"
    assert champion_policy(own, ("ppo", "dpo"), "reward_ppo", "min")[0] == "dpo"
    assert champion_policy(dict(base, kl=0.3, kl_dpo=0.1), ("ppo", "dpo"), "kl", "min")[0] == "sft"


def test_report_escapes_what_models_and_data_say():
    from palm.eval.report import html, reward_plot

    sample = {"prompt": "<|user|>hi<|end|><|assistant|>", "reference": "a & b", "sft": "<script>alert(1)</script>",
              "ppo": '<img src=x onerror="alert(2)">', "reward_sft": 0.1, "reward_ppo": 0.2}
    metrics = {"win_rate": 0.75, "reward_sft": 0.1, "reward_ppo": 0.2, "kl": 1.5, "prompts": 1}
    page = html(metrics, [sample], reward_plot({"sft": [0.1], "ppo": [0.2]}), {}, ["ppo"])
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "a &amp; b" in page and "75.0 %" in page


def test_bad_input_is_one_line_and_writes_nothing(project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    with pytest.raises(UserError, match="models/nothing: no such model folder"):
        evaluate(EVAL_CFG, **paths(root, ppo="nothing"))
    other = tmp_path / "tok2"
    make_tokenizer(other, vocab=380)
    with_kind(make_parent(root / "models" / "other", other, seed=14), "ppo")
    with pytest.raises(UserError, match="trained with tokenizer sha256 .* must share one tokenizer"):
        evaluate(EVAL_CFG, **paths(root, ppo="other"))
    with pytest.raises(UserError, match="a sft model, expected ppo"):
        evaluate(EVAL_CFG, **paths(root, ppo="sft"))
    with pytest.raises(UserError, match="evaluate.max_new_tokens: 128 leaves no room for a prompt"):
        evaluate(EvaluateConfig(max_new_tokens=MODEL.seq_len), **paths(root))
    with pytest.raises(UserError, match=r"evaluate\.windows: must be >= 1"):
        from palm.core.config import from_dict

        from_dict(EvaluateConfig, {"windows": 0}, "evaluate")
    import pyarrow.parquet as pq

    valid = root / "data" / "sft" / "valid.parquet"
    pq.write_table(pq.read_table(valid).slice(0, 0), valid)
    with pytest.raises(UserError, match="data/sft: no held-out conversations"):
        evaluate(EVAL_CFG, **paths(root))
    assert not (root / "reports").exists()


def test_stage_bad_input_is_one_line_exit_2_and_no_output(project, tmp_path, monkeypatch, capsys):
    from stages.evaluate import main

    root = stage_project(project, tmp_path, monkeypatch)
    shutil.rmtree(root / "models" / "ppo")
    assert main(EVALUATE_ARGS + ["--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: evaluate: ") and "models/ppo: no such model folder" in err[0]
    assert not [p for p in (root / "reports").rglob("*") if p.is_file()]


# ---- the gold judge, the verdict, the evaluation set --------------------------------------------

def test_gold_keys_a_policy_against_itself_and_the_evaluation_set(project):
    same = evaluate(EVAL_CFG, **paths(project, ppo="same")).metrics
    for m in ("score", "f1", "rouge_l", "repetition"):
        assert {f"gold_{m}_sft", f"gold_{m}_ppo", f"gold_{m}_gain", f"gold_{m}_gain_se"} <= set(same), m
        assert same[f"gold_{m}_gain"] == 0.0 and same[f"gold_{m}_sft"] == same[f"gold_{m}_ppo"]
    assert same["gold_win_rate"] == 0.5 and same["verdict"] == 1 and same["min_prompts"] == EVAL_CFG.min_prompts
    other = evaluate(EVAL_CFG, **paths(project)).metrics
    assert other["eval_set"] == same["eval_set"]  # same prompts, judge and sampling: comparable
    assert 0 <= other["gold_score_ppo"] <= 1 and 0 <= other["gold_win_rate"] <= 1
    more = evaluate(EvaluateConfig(**{**to_dict(EVAL_CFG), "samples_per_prompt": 2}), **paths(project)).metrics
    assert more["eval_set"] != other["eval_set"]
    none = evaluate(EvaluateConfig(**{**to_dict(EVAL_CFG), "gold": "none"}), **paths(project)).metrics
    assert not any(k.startswith("gold_") for k in none) and none["eval_set"] != other["eval_set"]


def test_gold_rule_equals_a_loop_over_prompts():
    from palm.data import rules
    from palm.eval.evaluate import gold_rule

    prompts = ["<|user|>What is `a.f` for?<|assistant|>", "<|user|>Say hi<|assistant|>", "<|user|>Explain `b.g`."]
    answers = ["`a.f(x)`: Adds one to x.", "Hello there friend.", "`b.g()`: Returns nothing at all."]
    got = {"sft": ["`a.f(x)`: Adds one", "no", "Hello there", "Hello", "`b.g()`", "nothing at all"],
           "ppo": ["a.f adds", "`a.f(x)`: Adds one to x.", "Hello there friend.", "x", "b.g b.g b.g b.g b.g", "no"]}
    out, scores = gold_rule(prompts, answers, got, 2)
    for m in ("score", "names", "f1"):
        per = {}
        for name in got:
            vals = [[rules.judge(prompts[i], answers[i], got[name][2 * i + j])[m] for j in range(2)] for i in range(3)]
            per[name] = [sum(v) / 2 for v in vals if v[0] is not None]
        gains = [p - s for p, s in zip(per["ppo"], per["sft"])]
        mean = sum(gains) / len(gains)
        se = (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains)) ** 0.5
        assert out[f"gold_{m}_gain"] == pytest.approx(mean) and out[f"gold_{m}_gain_se"] == pytest.approx(se), m
    assert len(per["ppo"]) == 3 and out["gold_names_sft"] == pytest.approx(0.5)  # names: 2 prompts apply
    wins = [sum((p > s) + 0.5 * (p == s) for p, s in zip(scores["ppo"][2 * i:2 * i + 2], scores["sft"][2 * i:2 * i + 2])) / 2
            for i in range(3)]
    assert out["gold_win_rate"] == pytest.approx(sum(wins) / 3)


def test_too_few_held_out_prompts_give_no_verdict(project, tmp_path, monkeypatch):
    """The real-data case: one held-out prompt "won" 100 %; below min_prompts there is no verdict."""
    from stages.evaluate import main

    root = stage_project(project, tmp_path, monkeypatch, prompts=1, min_prompts=30)
    assert main(EVALUATE_ARGS + ["--no-mlflow"]) == 0
    metrics = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["verdict"] == 0 and metrics["prompts"] == 1
    page = (root / "reports" / "evaluate" / "report.html").read_text()
    assert "No verdict: only 1 held-out prompts" in page and "Gold judge (" not in page and "Proxy (" not in page


def test_headline_and_the_overoptimisation_plot(tmp_path):
    from palm.eval.report import headline, overoptimisation_plot

    m = {"prompts": 87, "verdict": 1, "min_prompts": 30, "gold_score_gain": -0.013, "gold_score_gain_se": 0.0015,
         "gold_score_ppo": 0.026, "gold_score_sft": 0.039, "gold_win_rate": 0.33, "gold_win_rate_se": 0.02,
         "gold_names_ppo": 0.0, "gold_names_sft": 0.0, "win_rate": 0.63, "win_rate_se": 0.02, "reward_ppo": 0.64,
         "reward_sft": 0.07, "kl": 1.1, "kl_limit": 2.0, "kl_within_limit": 1}
    lines = headline(m)
    assert lines[0].startswith("Gold judge") and "worse (more than 2 standard errors)" in lines[0]
    assert lines[-1].startswith("Proxy (") and "63.0 ± 2.0 %" in lines[-1]
    assert "better (more than 2" in headline({**m, "gold_score_gain": 0.01})[0]
    assert "not distinguishable" in headline({**m, "gold_score_gain": 0.002})[0]
    people = headline({**m, "human_win_rate": 0.6, "human_win_rate_se": 0.05, "human_judgments": 40, "human_labelers": 2})
    assert people[1].startswith("People (blind A/B, 40 judgements by 2 labelers)")
    curve = tmp_path / "curve.csv"
    curve.write_text("step,reward,gold_score,proxy_reward,probe_kl\n1,0.1,,,\n2,0.2,0.05,0.3,0.5\n4,0.4,0.03,0.6,1.2\n")
    png = overoptimisation_plot(curve, {"gold_initial": 0.04, "proxy_initial": 0.0, "probe_kl_initial": 0.0})
    assert png.startswith(b"\x89PNG")
    curve.write_text("step,reward\n1,0.1\n")
    assert overoptimisation_plot(curve) is None


def test_the_stage_reads_peoples_judgments_of_this_pair(project, tmp_path, monkeypatch):
    """evaluate.human_judgments: only judgements of this SFT (A) against this PPO (B) count, in
    either stored order; the headline gives the people's verdict after the gold judge's."""
    import hashlib

    from stages.evaluate import main

    root = stage_project(project, tmp_path, monkeypatch, human_judgments="data/judgments/judgments.jsonl")

    def ident(name):
        sha = hashlib.sha256((root / "models" / name / "model.safetensors").read_bytes()).hexdigest()
        return {"ref": f"models/{name}", "path": str(root / "models" / name), "kind": name, "weights_sha256": sha,
                "tokenizer_sha256": "0" * 64}

    sft, ppo, other = ident("sft"), ident("ppo"), ident("pretrain")
    rows = [(sft, ppo, 0, "b"), (sft, ppo, 1, "tie"), (ppo, sft, 2, "b"),  # stored B=sft: PPO lost item 2
            (sft, other, 3, "b")]  # another pair: left out
    lines = [json.dumps({"format": "palm-ab-judgment/1", "comparison": "c1", "index": i, "prompt": "p",
                         "model_a": a, "model_b": b, "replies": {"a": "x", "b": "y"}, "choice": c, "a_side": "left",
                         "labeler": "alice", "time": 0.0, "sampling": {}}) for a, b, i, c in rows]
    (root / "data" / "judgments").mkdir(parents=True)
    (root / "data" / "judgments" / "judgments.jsonl").write_text("\n".join(lines) + "\n")
    assert main(EVALUATE_ARGS + ["--no-mlflow"]) == 0
    m = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    assert m["human_judgments"] == 3 and m["human_win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    page = (root / "reports" / "evaluate" / "report.html").read_text()
    assert page.index("Gold judge") < page.index("People (blind A/B, 3 judgements by 1 labelers)") < page.index("Proxy (")


# ---- the gold reward model (the gold_reward stage's export) as a second gold judge ---------------

GOLD_RM = ("gold_rm_sft", "gold_rm_ppo", "gold_rm_gain", "gold_rm_gain_se", "gold_rm_win_rate", "gold_rm_win_rate_se",
           "gold_rm_accuracy")
BOTH = EvaluateConfig(**{**to_dict(EVAL_CFG), "gold": ["rule", "reward_model"]})


def test_the_gold_reward_model_judge_a_policy_against_itself_and_the_evaluation_set(project):
    same = evaluate(BOTH, **paths(project, ppo="same"))
    m = same.metrics
    assert set(GOLD_RM) <= set(m) and same.judges == ("rule", "reward_model")
    assert m["gold_rm_gain"] == 0.0 and m["gold_rm_win_rate"] == 0.5 and m["gold_rm_sft"] == m["gold_rm_ppo"]
    assert "gold_score_gain" in m and 0.0 <= m["gold_rm_accuracy"] <= 1.0
    other = evaluate(BOTH, **paths(project)).metrics
    assert other["gold_rm_sft"] == m["gold_rm_sft"] and 0.0 <= other["gold_rm_win_rate"] <= 1.0  # SFT: same draws
    assert other["gold_rm_gain"] != 0.0 and other["gold_rm_accuracy"] == m["gold_rm_accuracy"]
    rule = evaluate(EVAL_CFG, **paths(project)).metrics  # evaluate.gold: rule (a single name, as old params have it)
    assert not any(k.startswith("gold_rm") for k in rule) and rule["eval_set"] != other["eval_set"]
    assert rule["gold_score_gain"] == other["gold_score_gain"]


def test_gold_rm_equals_a_loop_over_prompts():
    from palm.eval.evaluate import gold_rm

    g = torch.Generator().manual_seed(1)
    r = {"sft": torch.randn(12, generator=g).double(), "ppo": torch.randn(12, generator=g).double()}
    r["ppo"][3] = r["sft"][3]  # a tie
    out = gold_rm(r, 3)
    per = {n: [sum(v[3 * i:3 * i + 3].tolist()) / 3 for i in range(4)] for n, v in r.items()}
    gains = [p - q for p, q in zip(per["ppo"], per["sft"])]
    mean = sum(gains) / 4
    assert out["gold_rm_gain"] == pytest.approx(mean) and out["gold_rm_sft"] == pytest.approx(sum(per["sft"]) / 4)
    assert out["gold_rm_gain_se"] == pytest.approx((sum((x - mean) ** 2 for x in gains) / 3 / 4) ** 0.5)
    wins = [sum(1.0 if p > q else 0.5 if p == q else 0.0
                for p, q in zip(r["ppo"][3 * i:3 * i + 3].tolist(), r["sft"][3 * i:3 * i + 3].tolist())) / 3
            for i in range(4)]
    assert out["gold_rm_win_rate"] == pytest.approx(sum(wins) / 4)


def test_the_gold_reward_model_must_be_given_be_apart_from_the_proxy_and_share_the_tokenizer(project, tmp_path):
    with pytest.raises(ConfigError, match="evaluate.gold: names reward_model but no gold reward model was given"):
        evaluate(BOTH, **{**paths(project), "models": {**paths(project)["models"], "gold_reward": None}})
    with pytest.raises(UserError, match="the gold reward model is the proxy itself"):
        evaluate(BOTH, **paths(project, gold="reward"))
    with pytest.raises(UserError, match="a sft model, expected reward"):
        evaluate(BOTH, **paths(project, gold="sft"))


def test_stage_reports_the_gold_reward_model_and_refuses_another_tokenizer(project, tmp_path, monkeypatch, capsys):
    from stages.evaluate import main

    root = stage_project(project, tmp_path, monkeypatch, gold=["rule", "reward_model"])
    args = EVALUATE_ARGS + ["--gold-reward", "models/gold_reward", "--no-mlflow"]
    assert main(args) == 0
    metrics = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    assert set(GOLD_RM) <= set(metrics)
    page = (root / "reports" / "evaluate" / "report.html").read_text()
    assert page.index("Gold judge (") < page.index("Gold reward model (trained on preference pairs") < page.index("Proxy (")
    capsys.readouterr()
    other = tmp_path / "tok2"
    make_tokenizer(other, vocab=380)
    make_eval_reward(root / "models" / "gold_other", other)
    assert main(args[:-2] + ["models/gold_other", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: evaluate: ") and "gold_other was trained with tokenizer sha256" in err[0]


def test_headline_gives_each_gold_judge_in_order():
    from palm.eval.report import headline

    m = {"prompts": 87, "verdict": 1, "gold_score_gain": -0.013, "gold_score_gain_se": 0.0015, "gold_score_ppo": 0.026,
         "gold_score_sft": 0.039, "gold_win_rate": 0.33, "gold_win_rate_se": 0.02, "gold_rm_gain": 0.4,
         "gold_rm_gain_se": 0.05, "gold_rm_sft": -0.1, "gold_rm_ppo": 0.3, "gold_rm_win_rate": 0.6,
         "gold_rm_win_rate_se": 0.02, "gold_rm_accuracy": 0.75, "win_rate": 0.63, "reward_ppo": 0.64, "reward_sft": 0.07,
         "kl": 1.1}
    lines = headline(m, ("rule", "reward_model"))
    assert lines[0].startswith("Gold judge (checks from the documentation") and lines[2].startswith("The gold judges disagree.") and lines[3].startswith("Proxy (")
    assert lines[1] == ("Gold reward model (trained on preference pairs that neither the proxy nor PPO saw): PPO is "
                        "better (more than 2 standard errors) on 87 held-out prompts: mean normalised gold reward 0.300 "
                        "vs SFT's -0.100 (difference 0.400 ± 0.050); PPO's reply wins on it 60.0 ± 2.0 % of the time; "
                        "it ranks 75.0 % of the held-out pairs right.")
    assert headline(m, ("reward_model", "rule"))[0].startswith("Gold reward model")
    assert headline({k: v for k, v in m.items() if not k.startswith("gold_score")}, ("rule", "reward_model"))[0] \
        .startswith("Gold reward model")


def test_the_headline_says_when_the_gold_judges_disagree():
    from palm.eval.report import headline

    m = {"prompts": 87, "verdict": 1, "gold_score_gain": -0.008, "gold_score_gain_se": 0.0014, "gold_score_ppo": 0.031,
         "gold_score_sft": 0.039, "gold_win_rate": 0.42, "gold_rm_gain": 0.5, "gold_rm_gain_se": 0.04, "gold_rm_ppo": 0.76,
         "gold_rm_sft": 0.27, "gold_rm_win_rate": 0.63, "win_rate": 0.63, "reward_ppo": 0.62, "reward_sft": 0.14,
         "kl": 0.83}
    lines = headline(m)
    assert lines[2].startswith("The gold judges disagree.") and lines[-1].startswith("Proxy (")
    agree = headline({**m, "gold_rm_gain": -0.1})
    assert not any(line.startswith("The gold judges disagree") for line in agree)
    assert not any("disagree" in line for line in headline({**m, "gold_rm_gain": 0.01}))  # within 2 SE: no claim


# ---- every policy in one table: SFT, PPO and DPO ------------------------------------------------

# DPO's measures beside PPO's (names: palm/eval/evaluate.py's docstring), with both gold judges
DPO_KEYS = {"reward_dpo", "length_dpo", "ended_dpo", "win_rate_dpo", "win_rate_dpo_se", "reward_gain_dpo",
            "reward_gain_dpo_se", "kl_dpo", "kl_within_limit_dpo", "perplexity_dpo", "reply_perplexity_dpo",
            "gold_score_dpo", "gold_score_gain_dpo", "gold_score_gain_dpo_se", "gold_f1_gain_dpo", "gold_win_rate_dpo",
            "gold_win_rate_dpo_se", "gold_rm_dpo", "gold_rm_gain_dpo", "gold_rm_gain_dpo_se", "gold_rm_win_rate_dpo",
            "gold_rm_win_rate_dpo_se", "trained_on_rule_dpo", "trained_on_reward_model_dpo"}
PREFERENCE_KEYS = {"dpo_pref_accuracy", "dpo_pref_margin", "dpo_reward_chosen", "dpo_reward_rejected", "dpo_beta",
                   "sft_pref_accuracy"}


@pytest.fixture(scope="module")
def runs(project):
    """The same evaluation (both gold judges) of SFT and PPO, and of SFT, PPO and DPO."""
    return evaluate(BOTH, **paths(project)), evaluate(BOTH, **paths(project, dpo="dpo"))


def test_every_policy_in_one_run_and_ppo_unchanged_by_dpo(runs):
    from palm.eval.evaluate import policy_view

    two, three = runs
    m2, m3 = two.metrics, three.metrics
    assert (two.policies, three.policies) == (("ppo",), ("ppo", "dpo"))
    assert DPO_KEYS | PREFERENCE_KEYS <= set(m3) and not any("dpo" in k for k in m2)
    assert {k: m3[k] for k in m2} == m2  # adding DPO changes none of SFT's or PPO's numbers, bit for bit
    assert three.rewards["ppo"] == two.rewards["ppo"] and set(three.rewards) == {"sft", "ppo", "dpo"}
    assert three.gold["ppo"] == two.gold["ppo"] and three.samples[0]["ppo"] == two.samples[0]["ppo"]
    assert {"dpo", "reward_dpo", "gold_dpo"} <= set(three.samples[0])
    assert m3["kl_dpo"] > 0 and m3["reward_dpo"] != m3["reward_ppo"]  # another random policy, measured on its own
    for key in DPO_KEYS | PREFERENCE_KEYS:
        assert isinstance(m3[key], (int, float)) and math.isfinite(m3[key]), key
    # DPO's metrics under PPO's names are exactly the set PPO has: no measure of DPO left out
    view = policy_view(m3, "dpo")
    assert set(view) == set(m2) | PREFERENCE_KEYS
    assert (view["win_rate"], view["reward_ppo"], view["gold_rm_win_rate_se"], view["kl_within_limit"]) == \
        (m3["win_rate_dpo"], m3["reward_dpo"], m3["gold_rm_win_rate_dpo_se"], m3["kl_within_limit_dpo"])
    assert view["prompts"] == m3["prompts"] and view["eval_set"] == m3["eval_set"] == m2["eval_set"]
    assert policy_view(m3, "ppo") == m3 and policy_view({**m2, "human_win_rate": 0.7}, "dpo").get("human_win_rate") is None


def test_dpo_preference_accuracy_equals_a_slow_loop(project, runs):
    """The implicit reward beta * (log pi_dpo - log pi_sft) of each held-out reply, from one
    unpadded forward per sequence and the full-vocabulary log-softmax, pair by pair."""
    from palm.data.chat import load_prefs

    m = runs[1].metrics
    sha = sha256_file(project / "models" / "sft" / "tokenizer.json")
    pairs = load_prefs(project / "data" / "prefs", "valid", sha).to_pylist()[:BOTH.pairs]

    def reply_logp(name: str) -> list[list[float]]:
        out = []
        with process_groups(), torch.no_grad():
            model = load_model(read_export(project / "models" / name))
            for p in pairs:
                row = []
                for side in ("chosen_ids", "rejected_ids"):
                    seq = list(p["prompt_ids"]) + list(p[side])
                    logits = model(torch.tensor([seq[:-1]]))[0].float()[:, :model.cfg.vocab_size]
                    lp = logits.log_softmax(-1)
                    row.append(sum(float(lp[t - 1, seq[t]]) for t in range(len(p["prompt_ids"]), len(seq))))
                out.append(row)
        return out

    dpo, sft = reply_logp("dpo"), reply_logp("sft")
    rewards = [[DPO["beta"] * (d - s) for d, s in zip(dr, sr)] for dr, sr in zip(dpo, sft)]
    assert m["pairs"] == len(pairs) and m["dpo_beta"] == DPO["beta"]
    assert m["dpo_pref_accuracy"] == sum(c > r for c, r in rewards) / len(pairs)
    assert m["dpo_pref_margin"] == pytest.approx(sum(c - r for c, r in rewards) / len(pairs), abs=1e-5)
    assert m["dpo_reward_chosen"] == pytest.approx(sum(c for c, _ in rewards) / len(pairs), abs=1e-5)
    assert m["sft_pref_accuracy"] == sum(c > r for c, r in sft) / len(pairs)
    assert 0 < m["dpo_pref_accuracy"] < 1  # random models: the comparison above could tell a sign flip


def test_implicit_rewards_per_loss_against_the_formulas():
    from palm.eval.evaluate import dpo_preferences, implicit_rewards

    g = torch.Generator().manual_seed(2)
    logp, ref = -20 * torch.rand(6, generator=g).double(), -20 * torch.rand(6, generator=g).double()
    n = torch.tensor([3, 4, 5, 1, 7, 2])
    for loss in ("sigmoid", "cdpo"):
        assert torch.allclose(implicit_rewards(logp, ref, n, loss, 0.3), 0.3 * (logp - ref))
    assert torch.allclose(implicit_rewards(logp, ref, n, "ipo", 0.3), 0.3 * (logp - ref) / n)  # per token, as IPO's loss
    assert torch.allclose(implicit_rewards(logp, None, n, "simpo", 0.3), 0.3 * logp / n)  # no reference
    # simpo: the chosen replies are longer but likelier per token; summed they would lose
    c, r = torch.tensor([-6.0, -8.0]).double(), torch.tensor([-4.0, -2.0]).double()
    nc, nr = torch.tensor([6, 8]), torch.tensor([2, 1])
    logps = {"dpo": {"chosen": (c, nc), "rejected": (r, nr)}, "sft": {"chosen": (c, nc), "rejected": (r, nr)}}
    simpo = dpo_preferences(logps, "simpo", 2.0)
    assert simpo["dpo_pref_accuracy"] == 1.0 and simpo["dpo_pref_margin"] == pytest.approx(2.0 * (-1 - -2))
    assert simpo["sft_pref_accuracy"] == 0.0  # SFT by summed log-probs: both rejected replies likelier
    same = dpo_preferences(logps, "sigmoid", 2.0)  # the policy is its reference: every implicit reward 0
    assert same["dpo_pref_accuracy"] == 0.0 and same["dpo_pref_margin"] == 0.0


def test_a_policy_against_itself_and_a_rule_trained_ppo(project):
    """DPO = SFT's weights ties everywhere; a PPO whose reward included the rule checks is not
    judged by them: the headline leads with the gold reward model for it and says why."""
    from palm.eval.report import headline, policy_table

    ev = evaluate(BOTH, **paths(project, ppo="rule_ppo", dpo="same_dpo"))
    m = ev.metrics
    assert (m["win_rate_dpo"], m["gold_win_rate_dpo"], m["gold_rm_win_rate_dpo"]) == (0.5, 0.5, 0.5)
    assert (m["kl_dpo"], m["reward_gain_dpo"], m["gold_score_gain_dpo"], m["gold_rm_gain_dpo"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["dpo_pref_accuracy"] == 0.0 and m["dpo_pref_margin"] == 0.0  # every implicit reward 0: no pair right
    assert (m["trained_on_rule_ppo"], m["trained_on_reward_model_ppo"], m["trained_on_rule_dpo"]) == (1, 0, 0)
    lines = headline(m, BOTH.judges, ev.policies)
    assert lines[0].startswith("Gold reward model (trained on preference pairs that neither the proxy nor PPO saw): PPO ")
    assert not any(line.startswith("Gold judge (checks from the documentation, which PPO never saw)") for line in lines)
    (note,) = [line for line in lines if line.startswith("Not gold for PPO")]
    assert "the rule judge is not independent of PPO, whose reward included it" in note
    assert lines.index(note) < next(i for i, line in enumerate(lines) if "DPO" in line)  # PPO's block, then DPO's
    assert any(line.startswith("Gold judge (checks from the documentation, which DPO never saw): DPO is no different")
               for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("Proxy (")] == [
        "Proxy (the reward model PPO was trained to maximise, so not evidence of quality)",
        "Proxy (the reward model PPO was trained to maximise; DPO learned from the same kind of preference pairs, so "
        "not evidence of quality)"]
    header, rows = policy_table(m, BOTH.judges, ev.policies)
    assert header[3] == "gold score (rule)" and [r[0] for r in rows] == ["SFT", "PPO", "DPO"]
    assert rows[1][3].endswith("(trained on it: not gold)") and not rows[2][3].endswith("not gold")
    assert rows[2][2] == "50.0 ± 0.0" and rows[0][2] == "" and rows[2][-3] == "0.000"  # DPO = SFT: a tie, KL 0
    only_rule = headline({**m, "trained_on_rule_dpo": 1}, ("rule",), ev.policies)
    assert only_rule[0].startswith("No gold judge for PPO: it trained against every judge of evaluate.gold (rule)")


def test_stage_compares_every_policy_in_one_table(project, tmp_path, monkeypatch, capsys):
    from stages.evaluate import main

    root = stage_project(project, tmp_path, monkeypatch)
    assert main(EVALUATE_ARGS + ["--dpo", "models/dpo", "--no-mlflow"]) == 0
    metrics = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    assert {k for k in DPO_KEYS if "_rm" not in k and "reward_model" not in k} | PREFERENCE_KEYS <= set(metrics)
    page = (root / "reports" / "evaluate" / "report.html").read_text()
    table = page[page.index("<h2>Policies against SFT</h2>"):]
    assert [table.index(f"<tr><td>{name}</td>") for name in ("SFT", "PPO", "DPO")] == sorted(
        table.index(f"<tr><td>{name}</td>") for name in ("SFT", "PPO", "DPO"))
    assert "<th>SFT</th><th>PPO</th><th>DPO</th>" in page  # the sample replies of every policy
    assert page.index("which DPO never saw): DPO is") < page.index("Proxy (") and "DPO&#39;s implicit reward" in page
    capsys.readouterr()
    assert main(EVALUATE_ARGS + ["--dpo", "models/ppo", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("models/ppo: a ppo model, expected dpo")
