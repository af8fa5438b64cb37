"""Strict config loading: unknown keys, wrong types and impossible values name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
from helpers import ROOT, run_stage_cli

from palm.core.config import check, from_dict, load_section, to_dict
from palm.core.errors import ConfigError, UserError
from palm.core.tokenizer import TokenizerConfig
from palm.data.scrape import ScrapeConfig
from palm.data.tokenize import TokenizeConfig


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5

    def __post_init__(self):
        check(0 < self.rate < 1, "rate", "must be between 0 and 1")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    count: int = 1
    mode: Literal["a", "b"] = "a"
    tags: tuple[str, ...] = ()
    inner: Inner = field(default_factory=Inner)


def test_valid_roundtrip():
    cfg = from_dict(Outer, {"name": "y", "count": 3, "mode": "b", "tags": ["p", "q"], "inner": {"rate": 0.25}}, "sec")
    assert cfg == Outer("y", 3, "b", ("p", "q"), Inner(0.25))
    assert to_dict(cfg) == {"name": "y", "count": 3, "mode": "b", "tags": ["p", "q"], "inner": {"rate": 0.25}}


@pytest.mark.parametrize("data, key, words", [
    ({"cuont": 1}, "sec.cuont", "did you mean 'count'"),
    ({"count": "3"}, "sec.count", "expected an integer"),
    ({"count": True}, "sec.count", "expected an integer"),
    ({"mode": "c"}, "sec.mode", "one of 'a', 'b'"),
    ({"tags": "p"}, "sec.tags", "a list of a string"),
    ({"tags": ["p", 1]}, "sec.tags[1]", "expected a string"),
    ({"inner": {"rate": 2.0}}, "sec.inner.rate", "between 0 and 1"),
    ({"inner": {"speed": 2.0}}, "sec.inner.speed", "unknown key"),
])
def test_errors_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data, "sec")
    assert err.value.key == key
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_project_params_load():
    params = ROOT / "params.yaml"
    assert load_section(ScrapeConfig, params, "scrape").source == "pydoc"
    assert load_section(TokenizerConfig, params, "tokenizer").vocab_size > 0
    assert 0 < load_section(TokenizeConfig, params, "tokenize").valid_fraction < 1


def test_stage_impossible_values():
    with pytest.raises(ConfigError) as err:
        from_dict(ScrapeConfig, {"max_pages": -1}, "scrape")
    assert err.value.key == "scrape.max_pages"
    with pytest.raises(ConfigError) as err:
        from_dict(ScrapeConfig, {"source": "crawl"}, "scrape")
    assert err.value.key == "scrape.seed_urls"
    with pytest.raises(ConfigError) as err:
        from_dict(TokenizerConfig, {"vocab_size": 10}, "tokenizer")
    assert err.value.key == "tokenizer.vocab_size"


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="params file not found"):
        load_section(TokenizerConfig, tmp_path / "nope.yaml", "tokenizer")


@pytest.mark.parametrize("yaml_text, expect", [
    ("tokenizer:\n  vocab_sise: 100\n", "tokenizer.vocab_sise: unknown key (did you mean 'vocab_size'?)"),
    ("tokenizer:\n  vocab_size: many\n", "tokenizer.vocab_size: expected an integer"),
    ("scrape:\n  max_pages: -5\n", "scrape.max_pages"),
])
def test_stage_cli_bad_params_one_line(tmp_path, yaml_text, expect):
    """A new user's typo: one line naming the key, exit code 2, no traceback, no output."""
    (tmp_path / "params.yaml").write_text(yaml_text)
    stage = yaml_text.split(":")[0]
    args = {"tokenizer": ["--corpus", "c", "--out", "o"], "scrape": ["--raw", "r", "--out", "o"]}[stage]
    proc = run_stage_cli(stage, args + ["--no-mlflow"], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith(f"error: {stage}: ") and expect in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
