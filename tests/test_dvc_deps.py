"""dvc.yaml's code deps are what the stages' commands execute (palm/ops/deps.py): the repository's
dvc.yaml has no drift, and the derivation itself, on a small synthetic repository, follows every
way a module reaches code (lazy and relative imports, a worker's entry string, a file named by a
path built from ``__file__``, package data) and reports paths missing from dvc.yaml and paths listed but not run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from palm.ops import deps

ROOT = Path(__file__).resolve().parents[1]


def test_repository_dvc_yaml_lists_exactly_the_derived_code_deps():
    assert deps.check(ROOT) == [], "dvc.yaml's code deps drifted: run `make deps`"


def test_every_listed_code_dep_exists():
    listed = deps.listed(ROOT)
    assert listed and all(listed.values())
    missing = [f"{stage}: {path}" for stage, paths in listed.items() for path in paths if not (ROOT / path).is_file()]
    assert missing == []


def test_the_generating_stages_depend_on_the_native_kernel_source():
    derived = deps.derived(ROOT)
    for stage in ("ppo", "evaluate"):
        assert "palm/decode/native/decode.c" in derived[stage]
        assert derived[stage][0] == f"stages/{stage}.py"
    for stage in ("scrape", "tokenize", "pretrain", "sft", "reward"):
        assert not any(p.startswith("palm/decode/") for p in derived[stage]), stage
    assert "stages/sft.py" not in derived["ppo"] + derived["reward"]  # no stage imports another
    assert {"palm/train/pretrain.py", "palm/train/launch.py"} <= set(derived["pretrain"])


FILES = {
    "pyproject.toml": """
        [tool.setuptools.package-data]
        "palm.native" = ["*.c"]
        "palm.unused_pkg" = ["*.txt"]
    """,
    "palm/__init__.py": "import numpy  # third-party: not followed\n",
    "palm/core.py": "X = 1\n",
    "palm/lazy.py": "from palm import core\n",
    "palm/train/__init__.py": "",
    "palm/train/run.py": """
        from __future__ import annotations
        from typing import TYPE_CHECKING
        from .helpers import shared  # relative: palm.train.helpers
        if TYPE_CHECKING:
            from palm import typing_only  # never runs
        ENTRY = "palm.train.worker:main"  # started by a launcher, by name
        SCRIPT = Path(__file__).with_name("script.py")  # run in a subprocess
        PALM = Path(__file__).resolve().parents[1]
        SERVED = str(PALM / "tools" / "served.py")  # code logged with a model
        LOCK = PALM.parent / "requirements.lock"  # read, but not code
        def go():
            from palm import lazy  # imported when go() runs
            return lazy
    """,
    "palm/train/helpers.py": "def shared(): pass\n",
    "palm/train/worker.py": "from palm.native import kernel\n",
    "palm/train/script.py": "from palm import core\n",
    "palm/tools/served.py": "",
    "requirements.lock": "",
    "palm/native/__init__.py": "kernel = None\n",
    "palm/native/kernel.c": "int f(void) { return 0; }\n",
    "palm/native/notes.md": "not package data\n",
    "palm/typing_only.py": "",
    "palm/unused.py": "",
    "palm/unused_pkg/__init__.py": "",
    "palm/unused_pkg/data.txt": "",
    "stages/__init__.py": "",
    "stages/train.py": "from palm.train.run import go\n",
    "stages/other.py": "",
}
DVC_YAML = """\
# the pipeline
vars:
  - py: .venv/bin/python
    data: data/in
stages:
  train:
    cmd: ${py} -m stages.train --data ${data}
    deps:
      - stages/train.py
      - stages/other.py             # listed by hand, never imported
      - palm/train/run.py           # the objective
      - ${data}
      - data/extra                  # read too
    params:
      - train
    outs:
      - models/train
  other:
    cmd: >-
      ${py} -m stages.other
      --out models/other
    deps:
      - stages/other.py
      - ${data}
    outs:
      - models/other:
          cache: false
"""
TRAIN = ["stages/train.py", "stages/__init__.py", "palm/__init__.py", "palm/core.py", "palm/lazy.py",
         "palm/native/__init__.py", "palm/native/kernel.c", "palm/tools/served.py", "palm/train/__init__.py",
         "palm/train/helpers.py", "palm/train/run.py", "palm/train/script.py", "palm/train/worker.py"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    import textwrap

    for rel, text in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text).lstrip("\n"))
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


def test_derivation_follows_lazy_relative_entry_path_and_package_data(repo):
    assert deps.derived(repo) == {"train": TRAIN, "other": ["stages/other.py", "stages/__init__.py"]}


def test_check_reports_missing_and_stale_then_write_fixes_only_the_code_lines(repo, capsys):
    listed = {"stages/train.py", "stages/other.py", "palm/train/run.py"}
    expect = [f"stage train: missing {p}" for p in TRAIN if p not in listed] + \
             ["stage train: stale stages/other.py", "stage other: missing stages/__init__.py"]
    assert deps.check(repo) == expect
    assert deps.main(["--root", str(repo)]) == 1
    assert capsys.readouterr().out.splitlines() == expect

    before = yaml.safe_load((repo / "dvc.yaml").read_text())
    assert deps.main(["--root", str(repo), "--write"]) == 0
    assert deps.check(repo) == []
    assert deps.main(["--root", str(repo)]) == 0
    text = (repo / "dvc.yaml").read_text()
    after = yaml.safe_load(text)
    assert after["stages"]["train"]["deps"] == [*TRAIN, "${data}", "data/extra"]
    assert after["stages"]["other"]["deps"] == ["stages/other.py", "stages/__init__.py", "${data}"]
    for doc in (before, after):  # the rest as it was
        for stage in doc["stages"].values():
            del stage["deps"]
    assert after == before
    assert text.startswith("# the pipeline\n")
    assert "      - palm/train/run.py           # the objective\n" in text  # a kept entry keeps its comment
    assert "      - data/extra                  # read too\n" in text
    assert "stages/other.py             # listed by hand" not in text


def test_a_function_level_import_is_a_dependency(repo):
    """Dropping the lazy import drops palm/lazy.py (and nothing else: palm/core.py is still run by
    the script beside palm/train/run.py)."""
    run = repo / "palm" / "train" / "run.py"
    run.write_text(run.read_text().replace("    from palm import lazy  # imported when go() runs\n", ""))
    assert deps.derived(repo)["train"] == [p for p in TRAIN if p != "palm/lazy.py"]
