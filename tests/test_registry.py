"""The MLflow Model Registry and lineage (palm/ops/registry.py, palm/apps/serving.py, palm/ops/lineage.py) on a
real registry (SQLite in a temporary folder) and tiny models.

A copy of the project (its real dvc.yaml) gets tiny inputs; stand-ins of the upstream stages run
through the real ``run_stage`` (so their runs carry what every stage's run carries: the DVC md5
of each input and output, and the run that produced each input), each writing its real output
path; then the real ``evaluate`` stage registers the five models (PPO's and DPO's policies each
judged by the champion rule on its own metrics). Checked: the versions, their source runs and aliases; the champion rule; ``mlflow.pyfunc.load_model(...).predict``;
``palm.model.export.resolve`` and ``palm chat`` on a registry URI; ``palm lineage`` back to the scrape
run and the corpus md5; ``mlflow models serve`` answering a POST on 127.0.0.1; ``make ui``'s MLflow
UI in headless Chromium (the stage runs, the registered models, palm-chat's aliases)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402
    EVAL_CFG,
    EVALUATE_ARGS,
    ROOT,
    chat_data,
    launch,
    make_eval_reward,
    make_parent,
    make_project,
    make_tokens,
    on_free_ports,
    with_kind,
)

from palm.core.config import to_dict  # noqa: E402
from palm.model.parallel import process_groups  # noqa: E402
from palm.ops.stage import dvc_md5, run_stage  # noqa: E402

# upstream stage -> the outputs its stand-in writes (dvc.yaml's paths), from the tiny inputs
OUTPUTS = {"scrape": {"data/corpus": "corpus", "data/raw": "corpus"}, "tokenizer": {"artifacts/tokenizer": "tokenizer"},
           "tokenize": {"data/tokens": "tokens"}, "sft_data": {"data/sft": "sft"}, "prefs": {"data/prefs": "prefs"},
           "pretrain": {"models/pretrain": "pretrain"}, "sft": {"models/sft": "sft_model"},
           "reward": {"models/reward": "reward_model"}, "ppo": {"models/ppo": "ppo_model"},
           "dpo": {"models/dpo": "dpo_model"}}
CHAIN = ["ppo", "sft", "reward", "pretrain", "tokenize", "tokenizer", "scrape", "sft_data", "prefs"]
PROMPT = "What does dumps do?"


@dataclasses.dataclass(frozen=True)
class Nothing:
    """The config of a stand-in stage (an empty params section)."""


def stand_in(stage: str, tiny: Path) -> None:
    """Run ``stage`` through run_stage with a body that copies its outputs from ``tiny``."""
    def body(cfg, ctx):
        for out, src in OUTPUTS[stage].items():
            shutil.rmtree(ctx.root / out, ignore_errors=True)
            shutil.copytree(tiny / src, ctx.root / out)
        return {"stand_in": 1}

    assert run_stage(stage, Nothing, body, argv=[]) == 0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tracking URI (a temporary SQLite registry) and model cache, for this process and children."""
    tmp = tmp_path_factory.mktemp("registry")
    values = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PALM_MODEL_CACHE": str(tmp / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield values


@pytest.fixture(scope="module")
def project(tmp_path_factory, env):
    """The project copy after the stand-in stages and one real evaluate stage."""
    tiny = tmp_path_factory.mktemp("tiny")
    data = chat_data(tiny, valid_fraction=0.5)
    make_tokens(tiny / "tokens", data["tokenizer"])
    make_parent(tiny / "pretrain", data["tokenizer"], seed=11)
    with_kind(make_parent(tiny / "sft_model", data["tokenizer"], seed=12), "sft")
    with_kind(make_parent(tiny / "ppo_model", data["tokenizer"], seed=13), "ppo")
    with_kind(make_parent(tiny / "dpo_model", data["tokenizer"], seed=14), "dpo", parent="models/sft",
              dpo={"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5})
    make_eval_reward(tiny / "reward_model", data["tokenizer"])
    root = make_project(tmp_path_factory.mktemp("project"))
    # version 1 must pass the champion rule: the tiny random policies are far apart (a KL bound they
    # meet; the KL gate has its own test), 4 prompts give a verdict, and win_rate is the metric
    evaluate = {**to_dict(EVAL_CFG), "prompts": 4, "kl_limit": 1e6, "champion_metric": "win_rate"}
    if "min_prompts" in evaluate:
        evaluate["min_prompts"] = 1
    params = {stage: {} for stage in OUTPUTS} | {"evaluate": evaluate}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ["scrape", "tokenizer", "tokenize", "sft_data", "prefs", "pretrain", "sft", "reward", "ppo", "dpo"]:
            stand_in(stage, tiny)
        from stages.evaluate import main

        t0 = time.perf_counter()
        assert main(EVALUATE_ARGS + ["--dpo", "models/dpo"]) == 0
        print(f"evaluate with registration: {time.perf_counter() - t0:.1f} s")
    return root


def client(env):
    import mlflow

    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def stage_run(c, stage: str):
    exp = c.get_experiment_by_name("palm-rlhf")
    (run,) = c.search_runs([exp.experiment_id], f"tags.`palm.ops.stage` = '{stage}'",
                           order_by=["attributes.start_time DESC"], max_results=1)
    return run


def test_evaluate_registers_every_model_with_their_source_runs_and_aliases(project, env):
    from palm.ops.registry import NAMES, pip_requirements

    assert NAMES == {"pretrain": "palm-pretrain", "sft": "palm-sft", "reward": "palm-reward", "ppo": "palm-chat",
                     "dpo": "palm-dpo"}
    c = client(env)
    assert c.get_experiment_by_name("palm-rlhf").tags["mlflow.experimentKind"] == "custom_model_development"
    for key, name in NAMES.items():
        (v,) = c.search_model_versions(f"name = '{name}'")
        source = stage_run(c, key)
        assert v.run_id == source.info.run_id and v.tags["palm.source_run_id"] == source.info.run_id
        assert v.tags["dvc.md5"] == dvc_md5(project / "models" / key) == source.data.tags[f"dvc.out.models/{key}.md5"]
        assert set(c.get_registered_model(name).aliases) == {"current", "champion"}  # the first: champion
        assert v.source.startswith(f"runs:/{source.info.run_id}/registry/")
        dl = Path(c.download_artifacts(source.info.run_id, f"registry/{name}", str(project / "dl" / name)))
        mlmodel = yaml.safe_load((dl / "MLmodel").read_text())
        # a policy's input is open (strings, or a chat request: predict checks it); the others' declared
        assert bool(mlmodel["signature"]["inputs"]) == (key in ("pretrain", "reward"))
        assert mlmodel["signature"]["params" if key != "reward" else "inputs"] and not list(dl.rglob("*.pkl"))
        assert (dl / "requirements.txt").read_text().split() == pip_requirements()
    evaluate = stage_run(c, "evaluate")
    assert evaluate.data.tags["palm.registered.palm-chat"] == "1"
    assert evaluate.data.tags["palm.input.models/ppo.run_id"] == stage_run(c, "ppo").info.run_id
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    chat = c.get_model_version("palm-chat", "1")
    assert float(chat.tags["palm.metric.win_rate"]) == metrics["win_rate"]
    # palm-dpo: its own numbers under the names palm-chat's carry, judged by the same rule
    assert evaluate.data.tags["palm.registered.palm-dpo"] == "1"
    dpo = c.get_model_version("palm-dpo", "1").tags
    assert float(dpo["palm.metric.win_rate"]) == metrics["win_rate_dpo"] != metrics["win_rate"]
    assert float(dpo["palm.metric.kl"]) == metrics["kl_dpo"] and float(dpo["palm.metric.reward_ppo"]) == metrics["reward_dpo"]
    assert float(dpo["palm.metric.dpo_pref_accuracy"]) == metrics["dpo_pref_accuracy"]
    assert not [k for k in dpo if k.endswith("_dpo")] and dpo["palm.eval_set"] == chat.tags["palm.eval_set"]


def test_the_champion_params_are_checked_and_the_ui_link_opens_the_runs(project, env):
    from palm.core.config import from_dict
    from palm.core.errors import ConfigError
    from palm.eval.evaluate import EvaluateConfig
    from palm.ops.tracking import ui_url

    with pytest.raises(ConfigError, match="evaluate.champion_metric: must be one of win_rate, "):
        from_dict(EvaluateConfig, {"champion_metric": "wins"}, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.champion_direction: expected one of 'max', 'min'"):
        from_dict(EvaluateConfig, {"champion_direction": "up"}, "evaluate")
    experiment = client(env).get_experiment_by_name("palm-rlhf").experiment_id
    assert ui_url(project) == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning"


def test_pip_requirements_are_the_lock_pins():
    from palm.ops.registry import pip_requirements

    lock = {l.split("==")[0].lower(): l for l in (ROOT / "requirements.lock").read_text().splitlines() if "==" in l}
    reqs = pip_requirements()
    assert {r.split("==")[0] for r in reqs} >= {"mlflow", "torch", "megatron-core", "tokenizers", "safetensors"}
    for r in reqs:
        assert r == lock[r.split("==")[0]] or r.lower() == lock[r.split("==")[0]].lower(), r


# a new palm-chat version's metrics that pass the champion rule's gates (within the KL limit, a verdict)
FIT = {"kl": 0.5, "kl_limit": 2.0, "kl_within_limit": 1, "verdict": 1}
SET = "set-a"  # the evaluation set these tests register on


@pytest.fixture(scope="module")
def new_folders(project, tmp_path_factory):
    """Two more PPO exports, ``worse`` and ``better`` (palm-chat versions 2 and 3 once registered)."""
    tmp = tmp_path_factory.mktemp("new")
    return {name: with_kind(make_parent(tmp / name, project / "artifacts" / "tokenizer", seed=seed), "ppo")
            for name, seed in (("worse", 21), ("better", 22))}


def register_ppo(project, env, folder: Path, metrics: dict, metric: str = "win_rate", direction: str = "max",
                 eval_set: str = SET, log=None) -> dict:
    """registry.register the four models with ``folder`` as the PPO export (no stage run made it)."""
    from palm.ops.registry import register

    c = client(env)
    models = {k: project / "models" / k for k in ("pretrain", "sft", "reward", "ppo")}
    md5s = {k: dvc_md5(p) for k, p in models.items()} | {"ppo": dvc_md5(folder)}
    sources = {k: stage_run(c, k).info.run_id for k in models} | {"ppo": None}
    return register({**models, "ppo": folder}, md5s, sources, evaluate_run=stage_run(c, "evaluate").info.run_id,
                    metrics=metrics, metric=metric, direction=direction, eval_set=eval_set, log=log)


def test_the_champion_rule_and_the_chain_aliases(project, env, new_folders):
    """A new palm-chat version that does not beat the champion's metric (on the same evaluation
    set) is the candidate; one that beats it is champion, and the other models it came with
    become champion too."""
    c = client(env)
    c.set_model_version_tag("palm-chat", "1", "palm.eval_set", SET)  # as if version 1 was evaluated on SET
    champion = float(c.get_model_version("palm-chat", "1").tags["palm.metric.win_rate"])
    worse, better = new_folders["worse"], new_folders["better"]
    said: list[str] = []
    lose = register_ppo(project, env, worse, {**FIT, "win_rate": champion}, log=said.append)  # a tie does not beat it
    assert lose["ppo"]["version"] == 2 and lose["ppo"]["aliases"] == ["current", "candidate"]
    assert lose["sft"] == {"name": "palm-sft", "version": 1, "new": False, "aliases": ["current"]}  # same folder
    assert int(c.get_model_version_by_alias("palm-chat", "champion").version) == 1
    v2 = c.get_model_version("palm-chat", "2")
    assert v2.run_id == stage_run(c, "evaluate").info.run_id  # logged from the evaluate run
    reason = f"win_rate {champion:.4g} <= champion's {champion:.4g}"
    assert v2.tags["palm.candidate_reason"] == reason and v2.tags["palm.eval_set"] == SET
    assert f"evaluate: palm-chat version 2 is the candidate, not champion: {reason}" in said
    win = register_ppo(project, env, better, {**FIT, "kl": 0.25, "win_rate": champion + 0.1, "eval_set": SET})
    assert win["ppo"]["aliases"] == ["current", "champion"]
    assert int(c.get_model_version_by_alias("palm-chat", "champion").version) == 3
    assert int(c.get_model_version_by_alias("palm-chat", "candidate").version) == 2
    assert int(c.get_model_version_by_alias("palm-reward", "champion").version) == 1
    v3 = c.get_model_version("palm-chat", "3").tags
    assert "palm.candidate_reason" not in v3 and "palm.metric.eval_set" not in v3  # a text value: no metric tag
    assert (v3["palm.eval_set"], float(v3["palm.metric.kl"])) == (SET, 0.25)
    lose = register_ppo(project, env, worse, {**FIT, "kl": 0.7}, metric="kl", direction="min")  # v2: more kl than v3
    assert lose["ppo"] == {"name": "palm-chat", "version": 2, "new": False, "aliases": ["current", "candidate"]}
    assert c.get_model_version("palm-chat", "2").tags["palm.candidate_reason"] == "kl 0.7 >= champion's 0.25"
    # back to version 1 for the tests that follow
    c.set_registered_model_alias("palm-chat", "champion", "1")
    c.set_registered_model_alias("palm-chat", "current", "1")


def test_the_champion_rule_compares_like_with_like(project, env, new_folders):
    """A better metric is not enough: over the KL limit, without a verdict, on another evaluation
    set, or against a champion whose set is not recorded, the new version is the candidate and
    says why (tag palm.candidate_reason, one log line); within the limit, with a verdict, on the
    champion's set and better, it is champion."""
    c = client(env)
    worse, better = new_folders["worse"], new_folders["better"]
    champion = float(c.get_model_version("palm-chat", "1").tags["palm.metric.win_rate"])
    best = {**FIT, "win_rate": champion + 0.1}

    def candidate(folder: Path, metrics: dict, reason: str, **kw) -> None:
        said: list[str] = []
        r = register_ppo(project, env, folder, metrics, log=said.append, **kw)
        assert r["ppo"]["aliases"] == ["current", "candidate"], said
        assert int(c.get_model_version_by_alias("palm-chat", "champion").version) == 1
        tags = c.get_model_version("palm-chat", str(r["ppo"]["version"])).tags
        assert tags["palm.candidate_reason"] == reason
        assert said.count(f"evaluate: palm-chat version {r['ppo']['version']} is the candidate, not champion: "
                          f"{reason}") == 1 and all("\n" not in line for line in said)

    candidate(worse, {**best, "kl": 8.13, "kl_within_limit": 0}, "kl 8.13 > kl_limit 2.0")
    no_kl = {k: v for k, v in best.items() if k != "kl_within_limit"}
    candidate(worse, no_kl, "no kl_within_limit in its metrics: its KL to the SFT policy is unchecked")
    candidate(worse, {**best, "verdict": 0}, "too few held-out prompts for a verdict (evaluate.min_prompts)")
    candidate(worse, {**FIT}, "no number for win_rate in its metrics: nothing to compare")
    candidate(worse, {**best, "gold_win_rate": 0.9, "trained_on_rule_ppo": 1}, "gold_win_rate is the rule judge's, "
              "which this policy trained against: not independent evidence", metric="gold_win_rate")
    candidate(better, {**best, "eval_set": "b" * 40}, f"evaluated on a different set (eval_set {'b' * 12}… vs "
              f"champion's {SET}): not comparable", eval_set="b" * 40)
    candidate(better, best, f"no eval_set for this evaluation (the champion (version 1): {SET}): not comparable",
              eval_set="")
    c.delete_model_version_tag("palm-chat", "1", "palm.eval_set")  # a champion registered before eval sets
    candidate(better, best, "the champion (version 1) has no eval_set (evaluated before eval sets were "
              "recorded): not comparable")
    c.set_model_version_tag("palm-chat", "1", "palm.eval_set", SET)
    win = register_ppo(project, env, better, best)  # the same set and better: champion
    assert win["ppo"]["aliases"] == ["current", "champion"] and win["reward"]["aliases"] == ["current", "champion"]
    assert "palm.candidate_reason" not in c.get_model_version("palm-chat", "3").tags  # the earlier reason is gone
    again = register_ppo(project, env, better, {**best, "verdict": 0})  # the champion itself: stays champion
    assert again["ppo"]["aliases"] == ["current", "champion"]
    # back to version 1 as champion and current, version 2 as candidate, for the tests that follow
    for alias, version in (("champion", "1"), ("current", "1"), ("candidate", "2")):
        c.set_registered_model_alias("palm-chat", alias, version)
    for name in ("palm-pretrain", "palm-sft", "palm-reward"):
        c.set_registered_model_alias(name, "champion", "1")


def test_pyfunc_load_and_predict_and_resolve(project, env):
    import mlflow.pyfunc

    from palm.model.export import read_export, resolve

    with process_groups():
        model = mlflow.pyfunc.load_model("models:/palm-chat@champion")
        out = model.predict([PROMPT, "Hi"], params={"max_new_tokens": 5, "temperature": 0.0})
        again = model.predict([PROMPT], params={"max_new_tokens": 5, "temperature": 0.0})
        reward = mlflow.pyfunc.load_model("models:/palm-reward@champion")
        import pandas as pd

        scores = reward.predict(pd.DataFrame({"prompt": [PROMPT, PROMPT], "response": ["It works.", "No."]}))
    assert len(out) == 2 and all(isinstance(t, str) for t in out) and again[0] == out[0]
    assert len(scores) == 2 and all(isinstance(float(s), float) for s in scores) and scores[0] != scores[1]
    folder = resolve("models:/palm-chat@champion")
    md5 = dvc_md5(project / "models" / "ppo")
    assert folder.is_relative_to(Path(env["PALM_MODEL_CACHE"]) / "palm-chat" / f"1-{md5[:12]}")
    ex = read_export(folder)
    assert ex.kind == "ppo" and dvc_md5(folder) == md5
    assert resolve("models:/palm-chat/1") == folder  # cached: the same folder
    assert resolve("models:/palm-pretrain/latest") == resolve("models:/palm-pretrain@champion")


def test_palm_chat_on_a_registry_uri_and_bad_uris(project, env, capsys):
    import io

    from palm.apps import chat
    from palm.apps.cli import main, parser

    args = parser().parse_args(["chat", "models:/palm-chat@champion", "--temperature", "0", "--max-new-tokens", "4"])
    out, err = io.StringIO(), io.StringIO()
    assert chat.run(args, stdin=io.StringIO(f"{PROMPT}\n/quit\n"), stdout=out, stderr=err) == 0
    assert f"{Path(env['PALM_MODEL_CACHE']) / 'palm-chat'}/1-" in err.getvalue() and out.getvalue().count("\n") == 1
    for uri, message in (("models:/palm-chat@nobody", "not in the registry"),
                         ("models:/palm-chat", "not a registry URI")):
        assert main(["chat", uri]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: chat: {uri}: {message}"), lines


def test_lineage_reaches_the_scrape_run_and_the_corpus_md5_from_every_model(project, env, capsys):
    from palm.apps.cli import main

    c = client(env)
    assert main(["lineage", "models:/palm-chat@champion", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    runs = info["runs"]
    stages = {r["stage"]: rid for rid, r in runs.items()}
    assert sorted(stages) == sorted(CHAIN) and len(stages) == len(runs)  # each run once
    assert info["order"][0] == stages["ppo"] == info["model"]["run_id"]
    scrape = stage_run(c, "scrape")
    assert info["corpus"] == {"path": "data/corpus", "md5": dvc_md5(project / "data" / "corpus"),
                              "run_id": scrape.info.run_id}
    assert runs[stages["ppo"]]["registered"] == ["palm-chat/1"]
    assert runs[stages["pretrain"]]["registered"] == ["palm-pretrain/1"]

    def reaches(rid: str) -> bool:
        return runs[rid]["stage"] == "scrape" or any(reaches(i["run_id"]) for i in runs[rid]["inputs"] if i["run_id"])

    for model in ("ppo", "sft", "reward", "pretrain", "tokenize", "tokenizer"):
        assert reaches(stages[model]), model
    inputs = {i["path"]: i for i in runs[stages["tokenize"]]["inputs"]}
    assert inputs["data/corpus"]["run_id"] == scrape.info.run_id
    assert inputs["data/corpus"]["md5"] == info["corpus"]["md5"]
    assert inputs["artifacts/tokenizer"]["run_id"] == stages["tokenizer"]
    assert {i["path"] for i in runs[stages["ppo"]]["inputs"]} == {"data/sft", "models/sft", "models/reward"}

    assert main(["lineage", "models:/palm-chat@champion"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("models:/palm-chat@champion: palm-chat version 1")
    assert f"corpus: data/corpus md5 {info['corpus']['md5']}, from scrape run {scrape.info.run_id}" in text
    assert f"scrape run {scrape.info.run_id}" in text and "(above)" in text  # tokenizer: via tokenize and pretrain
    assert main(["lineage", "models:/palm-nothing@champion"]) == 2
    assert capsys.readouterr().err.startswith("error: lineage: models:/palm-nothing@champion: not in the registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'nothing' / 'mlflow.db'}")
        assert main(["lineage", "models:/palm-chat@champion"]) == 2
    assert capsys.readouterr().err.startswith("error: lineage: no MLflow registry at sqlite:///")
    assert not (project / "nothing").exists()


def test_mlflow_models_serve_answers_a_post_on_loopback(project, env, tmp_path):
    import mlflow.pyfunc

    bin_ = Path(sys.executable).parent  # the server runs uvicorn from PATH: the venv's, as when it is activated

    def start(port: int) -> tuple[str, subprocess.Popen]:
        url = f"http://127.0.0.1:{port}"  # up once <url>/health answers (the scoring server answers it as /ping)
        argv = [str(bin_ / "mlflow"), "models", "serve", "-m", "models:/palm-chat@champion", "--env-manager", "local",
                "-h", "127.0.0.1", "-p", str(port)]
        path = f"{bin_}:{os.environ['PATH']}"
        return url, launch(argv, url, tmp_path / "serve.log", env={**os.environ, **env, "PATH": path}, timeout_s=180)

    url, proc = on_free_ports(start)
    body = {"inputs": [PROMPT], "params": {"max_new_tokens": 5, "temperature": 0.0}}
    # MLflow's chat format: an OpenAI chat request, unwrapped, answered with a chat completion
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
            "max_tokens": 5, "temperature": 0.0}

    def post(data: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        status, served = post(body)
        chat_status, completion = post(chat)
        bad_status, bad = post({"messages": [{"role": "robot", "content": "hi"}]})
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    with process_groups():
        model = mlflow.pyfunc.load_model("models:/palm-chat@champion")
        local = model.predict([PROMPT], params=body["params"])
        local_chat = model.predict(dict(chat))
    assert status == 200 and served["predictions"] == list(local) and isinstance(served["predictions"][0], str)
    assert chat_status == 200 and completion["object"] == "chat.completion", completion
    (choice,) = completion["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == local_chat["choices"][0]["message"]["content"]
    usage = completion["usage"]
    assert 1 <= usage["completion_tokens"] <= 5 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert bad_status >= 400 and "messages[0].role must be one of system, user, assistant" in json.dumps(bad)


def test_a_chat_request_uses_the_chat_template_and_its_settings_and_refuses_what_it_cannot_do(project, env):
    """The pyfunc's chat request: the same reply as the plain string for a lone user turn (one
    template), max_tokens and the other OpenAI fields honoured, bad requests refused in one line."""
    import mlflow.pyfunc

    from palm.core.errors import UserError

    with process_groups():
        model = mlflow.pyfunc.load_model("models:/palm-chat@champion")
        (plain,) = model.predict([PROMPT], params={"max_new_tokens": 6, "temperature": 0.0})
        chat = model.predict({"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
                              "max_tokens": 6, "temperature": 0.0})
        short = model.predict({"messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": 1,
                               "temperature": 0.0})
        # a conversation longer than the context: the usage counts the prompt tokens the model read
        long = model.predict({"messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 4,
                              "temperature": 0.0})
        seq_len = model.unwrap_python_model().model.cfg.seq_len
        refused = {}
        for name, request in {"field": {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}},
                              "n": {"messages": [{"role": "user", "content": "hi"}], "n": 2},
                              "empty": {"messages": []},
                              "many": {"messages": [{"role": "user", "content": "hi"}] * 65}}.items():
            with pytest.raises(UserError) as err:
                model.predict(request)
            refused[name] = str(err.value)
    assert chat["choices"][0]["message"]["content"] == plain
    assert short["usage"]["completion_tokens"] <= 1 and short["choices"][0]["finish_reason"] in ("stop", "length")
    assert long["usage"]["prompt_tokens"] == seq_len - 4
    assert "unsupported field(s) logit_bias" in refused["field"] and "n must be 1" in refused["n"]
    assert "messages must be a non-empty list" in refused["empty"]
    assert "at most 64 (PalmModel.max_messages)" in refused["many"]
    assert all("\n" not in m for m in refused.values())


def test_palm_ui_refuses_a_bad_port_or_worker_count_in_one_line(capsys):
    from palm.apps.cli import main

    for args, message in ((["--port", "0"], "--port: expected 1..65535, got 0"),
                          (["--workers", "0"], "--workers: expected >= 1, got 0")):
        assert main(["ui", *args]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: ui: {message}"]


def test_make_ui_shows_the_stage_runs_and_the_models_with_their_aliases(project, env, browser, tmp_path):
    """``make ui`` (``palm ui``) in a real browser: the link it prints opens the experiment on the
    stage runs (not MLflow 3's GenAI overview, empty here), "Model registry" lists every
    registered model and palm-chat's page shows each version's aliases. The server leaves no
    process behind."""
    import psutil
    from selenium.webdriver.support.ui import WebDriverWait

    from palm.ops.registry import NAMES
    from palm.ops.tracking import ui_url

    c = client(env)
    experiment = c.get_experiment_by_name("palm-rlhf").experiment_id
    runs = {stage_run(c, stage).info.run_id: stage for stage in [*OUTPUTS, "evaluate"]}
    aliases: dict[str, set[str]] = {}
    for alias, version in c.get_registered_model("palm-chat").aliases.items():
        aliases.setdefault(str(version), set()).add(alias)
    assert aliases == {"1": {"champion", "current"}, "2": {"candidate"}}  # as the champion rule's test left them
    log = tmp_path / "ui.log"

    def start(port: int) -> tuple[str, subprocess.Popen]:
        base = f"http://127.0.0.1:{port}"  # what `make ui MLFLOW_PORT=<port>` runs, in the project folder
        return base, launch([sys.executable, "-m", "palm.apps.cli", "ui", "--port", str(port)], base, log,
                            env={**os.environ, **env}, timeout_s=240, cwd=project)

    base, proc = on_free_ports(start)
    wait = WebDriverWait(browser, 120)  # a loaded 2-core machine: the first page took 30 s at load 20

    def links(css: str) -> dict[str, str]:  # href -> text of the links; read in one go (the page re-renders)
        return dict(browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(a => [a.href, a.innerText.trim()])", css))

    def version_aliases(d) -> dict[str, set[str]]:  # version -> the tags "@ <alias>" in its row of the model page
        rows = d.execute_script(
            "return [...document.querySelectorAll('[role=row]')].map(r => ["
            "[...r.querySelectorAll('a[href*=\"/models/palm-chat/versions/\"]')].map(a => a.href),"
            "[...r.querySelectorAll('[role=status]')].map(t => t.innerText.replace(/\\s+/g, ' ').trim())])")
        shown = {hrefs[0].rsplit("/", 1)[1]: {t[2:] for t in tags if t.startswith("@ ")}
                 for hrefs, tags in rows if hrefs}
        return {version: tags for version, tags in shown.items() if tags}

    started: list = []
    try:
        started = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        (line,) = [x for x in log.read_text().splitlines() if x.startswith("MLflow UI: ")]
        link = line.split()[2]
        assert link == ui_url(project, base)
        browser.get(link)
        run_links = {f"{base}/#/experiments/{experiment}/runs/{rid}": stage for rid, stage in runs.items()}
        wait.until(lambda d: run_links.keys() <= links("a[href*='/runs/']").keys(), "the stage runs not listed")
        shown = links("a[href]")
        assert {shown[href] for href in run_links} == set(runs.values())  # each run under its stage's name
        # the "Model training" sidebar, not GenAI's (whose first entry is the traces overview)
        assert not [h for h in shown if f"/experiments/{experiment}/overview" in h], sorted(shown)
        assert shown[f"{base}/#/models"] == "Model registry"
        browser.get(f"{base}/#/models")
        model_links = {f"{base}/#/models/{name}": name for name in NAMES.values()}
        wait.until(lambda d: model_links.keys() <= links("a[href*='/models/']").keys(), "the models not listed")
        assert all(links("a[href*='/models/']")[href] == name for href, name in model_links.items())
        browser.get(f"{base}/#/models/palm-chat")  # where palm-chat's entry in the list links to
        wait.until(lambda d: version_aliases(d) == aliases, f"palm-chat's page does not show the aliases {aliases}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C in the terminal of `make ui`
        proc.wait(60)
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
