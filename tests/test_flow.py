"""pipelines.flow checks its Prefect parameters against the DAG before anything reaches DVC;
pipelines.serve checks its params section and its surroundings before it starts anything."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from helpers import ROOT, free_port

from palm.core.config import from_dict, load_section
from palm.core.errors import ConfigError, UserError
from pipelines.flow import RETRIES, dag, plan, stages_in_order
from pipelines.serve import ServeConfig, serve, stop


def test_stages_are_checked_against_the_dag_and_run_in_its_order():
    order = stages_in_order(ROOT)
    assert plan(str(ROOT)) == (ROOT.resolve(), order)
    assert plan(str(ROOT), []) == (ROOT.resolve(), order)
    assert plan(str(ROOT), list(reversed(order[:2])))[1] == order[:2]  # DAG order, not the given one
    for bad in (["no-such-stage"], ["--force"], [order[0], "scrape; rm -rf /"]):
        with pytest.raises(UserError, match=r"^pipeline stages: unknown stage .*; the DAG has ") as err:
            plan(str(ROOT), bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="expected a list of stage names"):
        plan(str(ROOT), "scrape")  # a string is not a list of names


def test_root_must_be_a_readable_dvc_project(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dvc.yaml").write_text("stages: {}\n")
    for root in (str(tmp_path), str(tmp_path / "missing"), "", "relative/nowhere", str(tmp_path / "other")):
        with pytest.raises(UserError, match=r"^pipeline root: .* is not this project \(.*\); the flow runs only the "
                                            r"pipeline of the project it belongs to$"):
            plan(root)  # the project this package belongs to, no other folder
        if root != str(tmp_path / "other"):  # a caller that chose the folder itself: it must hold a pipeline
            with pytest.raises(UserError, match=r"^pipeline root: .* is not a project folder \(no dvc.yaml there\)$"):
                plan(root, project=None)
    (tmp_path / "dvc.yaml").write_text("stages: [this is not a stage mapping\n")
    with pytest.raises(UserError, match=r"^pipeline root: DVC cannot read the pipeline in ") as err:
        plan(str(tmp_path), project=tmp_path)
    assert "\n" not in str(err.value)


def test_until_runs_a_stage_and_everything_upstream_of_it():
    order, upstream = dag(ROOT)
    assert plan(str(ROOT), until="scrape")[1] == ["scrape"]
    assert plan(str(ROOT), until="tokenize")[1] == ["scrape", "tokenizer", "tokenize"]
    reward = plan(str(ROOT), until="reward")[1]
    assert set(reward) == {"scrape", "tokenizer", "tokenize", "pretrain", "sft_data", "prefs", "sft", "reward"}
    assert reward == [s for s in order if s in reward]  # in DAG order
    assert plan(str(ROOT), until=order[-1])[1] == order  # the last stage needs every other one
    for bad in ("no-such-stage", "", 3):
        with pytest.raises(UserError, match=r"^pipeline until: unknown stage .*; the DAG has [^\n]*$"):
            plan(str(ROOT), until=bad)
    with pytest.raises(UserError, match=r"^pipeline until: give either stages or until, not both"):
        plan(str(ROOT), ["scrape"], until="tokenize")


def test_network_bound_stages_retry():
    order, _ = dag(ROOT)
    assert set(RETRIES) <= set(order) and {"scrape", "sft_data", "prefs"} <= set(RETRIES)
    assert not set(RETRIES) & {"pretrain", "sft", "reward", "ppo", "evaluate"}  # local: a rerun fails alike


def test_serve_section_loads_strictly_and_is_no_dvc_parameter():
    cfg = load_section(ServeConfig, ROOT / "params.yaml", "serve")
    assert (cfg.host, cfg.until) == ("127.0.0.1", None)
    plan(str(ROOT), until=cfg.until)
    listed = [p if isinstance(p, str) else next(iter(p)) for st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
              for p in st.get("params", [])]
    assert not [p for p in listed if p.split(".")[0] == "serve"]  # DVC tracks only the keys stages list
    for data, key, words in [({"cron": "0 3 * *"}, "serve.cron", "not a cron schedule"),
                             ({"cron": 3}, "serve.cron", "expected a string"),
                             ({"timezone": "Mars/Olympus"}, "serve.timezone", "unknown time zone"),
                             ({"deployment": "a/b"}, "serve.deployment", "without '/'"),
                             ({"port": 0}, "serve.port", "expected 1..65535"),
                             ({"crom": "0 3 * * *"}, "serve.crom", "did you mean 'cron'")]:
        with pytest.raises(ConfigError) as err:
            from_dict(ServeConfig, data, "serve")
        assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_serve_refuses_a_busy_port_and_a_second_serve_before_starting_anything(tmp_path):
    import psutil

    me = psutil.Process()
    before = set(me.children())  # what earlier tests on this worker may have left running
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = ServeConfig(port=s.getsockname()[1])
        with pytest.raises(UserError, match=rf"^serve.port: 127.0.0.1:{cfg.port} is already in use"):
            serve(tmp_path, cfg)
    (tmp_path / ".prefect").mkdir()
    (tmp_path / ".prefect" / "serve.json").write_text(json.dumps({"serve": {"pid": me.pid, "create_time": me.create_time()}}))
    with pytest.raises(UserError, match=r"^already serving this project .*; stop it first: make stop$"):
        serve(tmp_path, ServeConfig(port=free_port()))
    assert set(me.children()) <= before  # nothing was started
    with pytest.raises(ConfigError, match=r"^serve.until: unknown stage 'nope'; the DAG has scrape, "):
        serve(ROOT, ServeConfig(port=free_port(), until="nope"))
    assert stop(tmp_path / "nowhere") == "nothing to stop: no make serve is running for this project"
