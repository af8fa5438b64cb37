"""``ppo.reward``'s terms (palm/train/rlhf/rewards.py): strict loading of the list of terms, the
graded rule check (palm/data/rules.py), the weighted sum of the terms, a user's function imported
from a module by name with its errors as one line naming it, and one small `ppo` stage run with a
critic-free estimator (rloo) and a rule + python reward (no reward model loaded: the --reward path
does not exist) whose export records the terms and whose curve has each term's column."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from palm.core.config import from_dict, to_dict  # noqa: E402
from palm.core.errors import ConfigError, UserError  # noqa: E402
from palm.data import rules  # noqa: E402
from palm.train.rlhf import rewards  # noqa: E402
from palm.train.rlhf.config import PPOConfig, RewardTerm  # noqa: E402

PROMPT = "<|user|>Explain `marshal.dumps`.<|end|><|assistant|>"
ANSWER = "`marshal.dumps(value, version=4, /)`: Return the bytes object that would be written to a file."


# --- config ---------------------------------------------------------------------------------------

def test_the_reward_is_a_list_of_typed_terms_loaded_strictly():
    cfg = from_dict(PPOConfig, {"reward": [{"name": "model"}, {"name": "rule", "weight": 0.5},
                                           {"name": "python:my.mod:score", "weight": -2}]}, "ppo")
    assert cfg.reward == (RewardTerm("model", 1.0), RewardTerm("rule", 0.5), RewardTerm("python:my.mod:score", -2.0))
    assert to_dict(cfg)["reward"] == [{"name": "model", "weight": 1.0}, {"name": "rule", "weight": 0.5},
                                      {"name": "python:my.mod:score", "weight": -2.0}]
    assert from_dict(PPOConfig, to_dict(cfg), "ppo") == cfg  # a tuple of dataclasses round-trips
    assert PPOConfig().reward == (RewardTerm("model", 1.0),) and PPOConfig().uses_reward_model
    assert [t.column for t in cfg.reward] == ["reward_model", "reward_rule", "reward_my_mod_score"]

    def error(reward) -> str:
        with pytest.raises(ConfigError) as err:
            from_dict(PPOConfig, {"reward": reward}, "ppo")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error([{"name": "gold"}]) == \
        "ppo.reward[0].name: unknown reward term 'gold'; one of model, rule, python:<module>:<function>"
    assert error([{"name": "rule"}, {"name": "python:mod"}]).startswith("ppo.reward[1].name: unknown reward term")
    assert error([{"name": "rule", "wieght": 1}]).startswith("ppo.reward[0].wieght: unknown key (did you mean 'weight'?)")
    assert error([{"name": "rule", "weight": 0}]).startswith("ppo.reward[0].weight: must not be 0")
    assert error([{"weight": 1}]) == "ppo.reward[0].name: missing; expected a string"
    assert error("rule") == "ppo.reward: expected a list of mappings, got 'rule'"
    assert error([]).startswith("ppo.reward: needs at least one term")
    assert error([{"name": "rule"}, {"name": "rule"}]).startswith("ppo.reward: a term is listed twice")


def test_the_group_estimators_need_groups_and_dr_grpo_refuses_whitening():
    for kind in ("grpo", "dr_grpo", "rloo", "reinforce++_baseline"):
        with pytest.raises(ConfigError) as err:
            from_dict(PPOConfig, {"advantage": kind, "whiten": kind != "dr_grpo"}, "ppo")
        assert str(err.value) == (f"ppo.samples_per_prompt: advantage: {kind} compares the samples of a prompt: "
                                  "needs >= 2, got 1")
    assert from_dict(PPOConfig, {"advantage": "reinforce++"}, "ppo").samples_per_prompt == 1  # no groups needed
    with pytest.raises(ConfigError, match="ppo.whiten: advantage: dr_grpo removes the division by a standard"):
        from_dict(PPOConfig, {"advantage": "dr_grpo", "samples_per_prompt": 2, "prompts_per_rollout": 4}, "ppo")
    with pytest.raises(ConfigError, match="ppo.advantage: expected one of 'gae', 'grpo', 'dr_grpo', 'rloo'"):
        from_dict(PPOConfig, {"advantage": "ppo"}, "ppo")


# --- the rule term's graded check -----------------------------------------------------------------

def test_the_graded_rule_gives_partial_credit_and_full_credit_only_with_the_documented_signature():
    full = "`marshal.dumps(value, version=4, /)`: writes bytes."
    assert rules.graded(PROMPT, ANSWER, full) == 1.0
    assert rules.judge(PROMPT, ANSWER, full)["names"] == rules.judge(PROMPT, ANSWER, full)["signature"] == 1.0
    # right name, one of three parameters: (1 + 1/3) / 2
    assert rules.graded(PROMPT, ANSWER, "`marshal.dumps(value)`: x") == pytest.approx((1 + 1 / 3) / 2)
    assert rules.graded_parts(PROMPT, ANSWER, "`marshal.dumps(value)`: x") == (1.0, pytest.approx(1 / 3))
    # one of the two name parts, no parameters: (1/2 + 0) / 2; the binary checks give nothing
    assert rules.graded(PROMPT, ANSWER, "`marshal.loads`: x") == pytest.approx(0.25)
    assert rules.judge(PROMPT, ANSWER, "`marshal.loads`: x")["names"] == 0.0
    assert rules.graded(PROMPT, ANSWER, "`os.path(a, b)`") == 0.0  # nothing right
    assert rules.graded(PROMPT, ANSWER, "marshal.dumps(value, version=4, /)") == 0.0  # no code span
    assert rules.graded(PROMPT, "no signature documented", "`marshal.dumps`") == 1.0  # the name alone
    assert rules.graded("<|user|>How are you?<|end|><|assistant|>", ANSWER, "`x`") is None
    # order counts (a subsequence), extra parts cost: 1 exactly when equal
    assert rules.graded(PROMPT, ANSWER, "`dumps.marshal(value, version=4, /)`") == pytest.approx((0.5 + 1) / 2)
    assert rules.graded(PROMPT, ANSWER, "`marshal.dumps.x(value, version=4, /, y)`") == pytest.approx((2 / 3 + 3 / 4) / 2)
    # the name half alone, for a reward on the name (python:palm.data.rules:name_share)
    assert rules.name_share(PROMPT, "`marshal.dumps(a)`: x") == 1.0
    assert rules.name_share(PROMPT, "`marshal.loads(value, version=4, /)`") == 0.5  # the signature does not count
    assert rules.name_share(PROMPT, "marshal.dumps") == 0.0  # no code span
    assert rules.name_share("<|user|>How are you?<|end|><|assistant|>", "`x.y`") == 0.0
    assert rules.split_call("f(a, b=(1, 2), *, c={1: 2})") == (["f"], ["a", "b=(1, 2)", "*", "c={1: 2}"])


# --- the weighted sum and the python term ----------------------------------------------------------

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A real module of reward functions on the import path, as a user writes one."""
    (tmp_path / "user_rewards.py").write_text(
        "import math\n"
        "def length(prompt, reply):\n    return len(reply) / 10\n"
        "def asks_marshal(prompt, reply):\n    return float('marshal' in prompt)\n"
        "def broken(prompt, reply):\n    raise ValueError('no such field\\nsecond line')\n"
        "def nan(prompt, reply):\n    return math.nan if 'marshal' in prompt else 1.0\n"
        "def inf(prompt, reply):\n    return -math.inf\n"
        "def text(prompt, reply):\n    return 'high'\n"
        "NOT_A_FUNCTION = 3\n")
    (tmp_path / "bad_import.py").write_text("import no_such_package_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards"
    for name in ("user_rewards", "bad_import"):
        sys.modules.pop(name, None)


def chars(ids) -> str:
    """A 'tokenizer' for these tests: ids are character codes."""
    return "".join(map(chr, ids))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def reward(terms, answers=None, model=None) -> rewards.Reward:
    return rewards.build([RewardTerm(n, w) for n, w in terms], answers=answers or {}, model=model,
                         decode_prompt=chars, decode_reply=chars)


def test_the_terms_combine_by_their_weights(user_module):
    prompts = [ids(PROMPT), ids("<|user|>Explain `json.dumps`.<|end|><|assistant|>")]
    replies = [ids("`marshal.dumps(value)`: x"), ids("hello")]
    answers = {tuple(prompts[0]): ANSWER, tuple(prompts[1]): "`json.dumps(obj, *, indent=None)`: y"}
    model_scores = torch.tensor([0.5, -1.5])
    r = reward([("model", 1.0), ("rule", 2.0), (f"python:{user_module}:length", -0.5),
                (f"python:{user_module}:asks_marshal", 3.0)], answers, model=lambda p, q: model_scores)
    got = r(prompts, replies)
    rule = [(1 + 1 / 3) / 2, 0.0]
    length = [len("`marshal.dumps(value)`: x") / 10, 0.5]
    want = [model_scores[i].item() + 2.0 * rule[i] - 0.5 * length[i] + 3.0 * [1.0, 0.0][i] for i in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert r.columns == ("reward_model", "reward_rule", f"reward_{user_module}_length",
                         f"reward_{user_module}_asks_marshal", "rule_names", "rule_signature")
    assert set(r.last) == set(r.columns)
    assert r.last["reward_rule"].tolist() == pytest.approx(rule)
    assert r.last["rule_names"].tolist() == [1.0, 0.0] and r.last["rule_signature"].tolist() == [0.0, 0.0]
    assert r.last["reward_model"].tolist() == [0.5, -1.5]
    # a single term of weight 1 is the term itself
    only = reward([("rule", 1.0)], answers)
    assert only(prompts, replies).tolist() == pytest.approx(rule)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, UserError)
    return text


def test_a_python_term_that_does_not_import_is_one_line_naming_it(user_module):
    with pytest.raises(UserError) as err:
        reward([("python:no_such_module_xyz:score", 1.0)])
    assert one_line(err).startswith("ppo.reward: python:no_such_module_xyz:score: cannot import 'no_such_module_xyz' "
                                    "(ModuleNotFoundError: No module named 'no_such_module_xyz')")
    with pytest.raises(UserError) as err:
        reward([("python:bad_import:score", 1.0)])
    assert "python:bad_import:score: cannot import 'bad_import' (ModuleNotFoundError: No module named " \
           "'no_such_package_here')" in one_line(err)
    for missing in ("nope", "NOT_A_FUNCTION"):
        with pytest.raises(UserError) as err:
            reward([(f"python:{user_module}:{missing}", 1.0)])
        assert f"python:{user_module}:{missing}: module '{user_module}'" in one_line(err)
        assert f"has no function '{missing}'; define {missing}(prompt: str, reply: str) -> float" in one_line(err)


def test_a_python_term_that_raises_or_returns_no_finite_number_is_one_line_naming_it(user_module):
    prompts, replies = [ids(PROMPT)], [ids("x")]
    with pytest.raises(UserError) as err:
        reward([(f"python:{user_module}:broken", 1.0)])(prompts, replies)
    assert one_line(err) == (f"ppo.reward: python:{user_module}:broken raised ValueError: no such field "
                             f"(prompt {PROMPT!r}); fix the function")
    with pytest.raises(UserError) as err:
        reward([(f"python:{user_module}:nan", 1.0)])(prompts, replies)
    assert one_line(err) == (f"ppo.reward: python:{user_module}:nan returned nan for the prompt {PROMPT!r}; "
                             "it must return a finite number")
    with pytest.raises(UserError) as err:
        reward([("rule", 1.0), (f"python:{user_module}:inf", 1.0)])(prompts, replies)
    assert f"python:{user_module}:inf returned -inf for the prompt" in one_line(err)
    with pytest.raises(UserError) as err:
        reward([(f"python:{user_module}:text", 1.0)])(prompts, replies)
    assert f"python:{user_module}:text returned str 'high' for the prompt" in one_line(err)
    long_prompt = ids("<|user|>" + "x" * 500)
    with pytest.raises(UserError) as err:
        reward([(f"python:{user_module}:inf", 1.0)])([long_prompt], replies)
    assert len(one_line(err)) < 300  # the prompt is cut
    # a finite result is fine, whatever the other rows
    assert reward([(f"python:{user_module}:nan", 1.0)])([ids("<|user|>hi")], replies).tolist() == [1.0]


# --- the ppo stage, end to end ---------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_the_ppo_stage_trains_rloo_on_a_rule_and_python_reward_without_a_reward_model(tmp_path):
    from helpers import MODEL, policy_project, run_stage_cli, set_params

    root = policy_project(tmp_path / "p", git=False)
    (root / "shortness.py").write_text("def score(prompt, reply):\n    return -len(reply) / 50\n")
    set_params(root, model={"seq_len": MODEL.seq_len}, ppo={
        "train_steps": 2, "micro_batch_size": 4, "prompts_per_rollout": 4, "samples_per_prompt": 2,
        "max_new_tokens": 8, "dtype": "fp32", "checkpoint_interval": 2, "sample_interval": 1, "samples_logged": 2,
        "gold_interval": 0, "advantage": "rloo",
        "reward": [{"name": "rule", "weight": 1.0}, {"name": "python:shortness:score", "weight": 0.5}]})
    args = ["--data", "data/sft", "--policy", "models/sft", "--reward", "models/no_reward_model", "--checkpoints",
            "checkpoints/ppo", "--out", "models/ppo", "--no-mlflow"]
    res = run_stage_cli("ppo", args, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((root / "models" / "ppo" / "config.json").read_text())
    assert config["reward"] == [{"name": "rule", "weight": 1.0}, {"name": "python:shortness:score", "weight": 0.5}]
    assert config["advantage"] == "rloo" and config["reward_model"] is None
    import csv

    rows = list(csv.DictReader((root / "reports" / "ppo" / "curve.csv").open()))
    assert len(rows) == 2
    for row in rows:
        rule, short = float(row["reward_rule"]), float(row["reward_shortness_score"])
        assert 0 <= rule <= 1 and short < 0 and 0 <= float(row["rule_names"]) <= 1
        assert float(row["reward"]) == pytest.approx(rule + 0.5 * short, abs=1e-4)  # the weighted sum
        assert row["value_loss"] == row["explained_variance"] == "nan"  # no critic
    lengths = [json.loads(line)["response"] for line in (root / "reports" / "ppo" / "samples.jsonl").open()]
    assert len(lengths) == 4

    # a reward function that raises in the workers: exit 2, one line naming it
    (root / "shortness.py").write_text("def score(prompt, reply):\n    return {}['missing']\n")
    set_params(root, ppo={"train_steps": 3})
    res = run_stage_cli("ppo", args, cwd=root)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(
        "error: ppo: ppo.reward: python:shortness:score raised KeyError: 'missing' (prompt '<|user|>"), errors
    # and one that does not import fails before any worker starts
    set_params(root, ppo={"reward": [{"name": "python:shortnes:score", "weight": 1.0}]})
    res = run_stage_cli("ppo", args, cwd=root)
    assert res.returncode == 2 and "ppo.reward: python:shortnes:score: cannot import 'shortnes'" in res.stderr
    assert math.isfinite(float(rows[-1]["kl"]))


def test_the_benchmark_reports_means_and_paired_gains_with_standard_errors_over_prompts():
    """benchmarks/rule_reward.py's arithmetic: prompts are the units; the gain is paired per prompt."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rule_reward

    sft = {"graded": [0.0, 0.1, 0.2, 0.1], "name_share": [0.0] * 4, "param_share": [0.0, 0.2, 0.4, 0.2],
           "names": [0.0] * 4, "signature": [0.0] * 4}
    ppo = {**sft, "graded": [0.1, 0.1, 0.4, 0.2]}
    rows = rule_reward.summary({"sft": sft, "arm": ppo})
    diffs = [0.1, 0.0, 0.2, 0.1]
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4)
    assert rows["arm"]["graded_gain"] == pytest.approx(mean) and rows["arm"]["graded_gain_se"] == pytest.approx(se)
    assert rows["sft"]["graded"] == pytest.approx(0.1) and "graded_gain" not in rows["sft"]
    assert rows["arm"]["names_gain"] == 0.0 and rows["arm"]["names_gain_se"] == 0.0
    table = rule_reward.table(rows, {"arm": {"reward": [{"name": "rule", "weight": 4.0}], "overrides": {"advantage": "rloo"},
                                             "metrics": {"kl": 1.5, "reward_rule": 0.05}, "ppo_seconds": 10}})
    assert "| arm | rule×4, advantage: rloo | 0.2000 ± 0.0707 | +0.1000 ± 0.0408 |" in table
