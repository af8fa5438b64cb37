"""The bad-input battery: what a new user gets wrong, tried on every stage as DVC runs it (the
stage's command line from ``dvc.yaml``, its ``main`` called in this process to save the
interpreter start-ups), each time expecting exactly one ``error: <stage>: …`` line, no
traceback, and exit code 2 before anything is written:

* a wrong value in the stage's params section (a key it does not know; a number given as text);
* every input missing (a fresh folder, nothing built yet);
* every input corrupt (each input folder holds the files a stage reads, filled with junk).

docs/troubleshooting.md lists these messages."""

from __future__ import annotations

import shlex

import pytest
import yaml

from helpers import ROOT
from pipelines.node import dvc_stages

DVC = dvc_stages()  # as DVC resolves dvc.yaml
STAGES = list(DVC)
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# what the stages read inside their input folders; "corrupt" fills each with junk
JUNK_FILES = ["meta.json", "config.json", "stats.json", "tokenizer.json", "model.safetensors", "train.bin",
              "train.idx", "valid.bin", "valid.idx", "train.parquet", "valid.parquet", "part-00000.parquet",
              "curve.csv"]


def argv(stage: str) -> list[str]:
    """The stage's arguments as dvc.yaml gives them (after ``-m stages.<stage>``)."""
    words = shlex.split(DVC[stage].cmd)
    return words[words.index(f"stages.{stage}") + 1:]


def inputs(stage: str) -> list[str]:
    """The data, model and report paths the stage reads (its deps outside the code)."""
    deps = [d.def_path for d in DVC[stage].deps]
    return [d for d in deps if d.split("/")[0] in ("data", "artifacts", "models", "reports")]


def outputs(stage: str) -> list[str]:
    """The stage's DVC outputs (its metrics included)."""
    return [o.def_path for o in DVC[stage].outs]


def run(stage: str, tmp_path, stage_error, params: dict) -> str:
    """Run the stage in ``tmp_path`` with ``params``; returns its one error line. Nothing of
    what the stage outputs may exist afterwards."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    line = stage_error(stage, argv(stage), tmp_path)
    assert [o for o in outputs(stage) if (tmp_path / o).exists()] == []
    return line


def first_number(section: dict) -> str:
    return next(k for k, v in section.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


@pytest.mark.parametrize("stage", STAGES)
def test_a_wrong_value_in_the_stage_section(stage, tmp_path, stage_error):
    section = PARAMS[stage]
    unknown = {**PARAMS, stage: {**section, "no_such_key": 1}}
    assert f"{stage}.no_such_key" in run(stage, tmp_path, stage_error, unknown)
    key = first_number(section)
    as_text = {**PARAMS, stage: {**section, key: "lots"}}
    assert f"{stage}.{key}" in run(stage, tmp_path, stage_error, as_text)


@pytest.mark.parametrize("stage", STAGES)
def test_every_input_missing(stage, tmp_path, stage_error):
    params = PARAMS
    if stage == "scrape":  # its default source is embedded: point it at a folder that is not there
        params = {**PARAMS, "scrape": {**PARAMS["scrape"], "source": "files", "files_path": "no/such/folder"}}
    run(stage, tmp_path, stage_error, params)


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "scrape"])
def test_every_input_corrupt(stage, tmp_path, stage_error):
    for rel in inputs(stage):
        path = tmp_path / rel
        if path.suffix:  # a file input (a curve)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x00junk, not what a stage wrote\xff")
            continue
        path.mkdir(parents=True, exist_ok=True)
        for name in JUNK_FILES:
            (path / name).write_bytes(b"{\x00junk, not what a stage wrote\xff")
    run(stage, tmp_path, stage_error, PARAMS)


def test_the_node_launcher_refuses_node_0_and_an_unknown_stage(monkeypatch, capsys):
    """`python -m pipelines.node STAGE` (a node other than node 0): one line and exit 2 when
    PALM_NODE_RANK says node 0 or the stage is not in dvc.yaml."""
    from pipelines import node

    monkeypatch.delenv("PALM_NODE_RANK", raising=False)
    assert node.main(["pretrain"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: node: PALM_NODE_RANK is unset or 0; node 0 runs `dvc repro pretrain` instead"]
    monkeypatch.setenv("PALM_NODE_RANK", "1")
    assert node.main(["nosuch"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: node: no stage 'nosuch' in "), err
