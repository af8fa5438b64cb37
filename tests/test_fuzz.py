"""Hostile neighbours, in the suite: every target of the fuzzing harness (``benchmarks/fuzz.py``,
``make fuzz`` for the long run) with a few derandomized Hypothesis inputs each, and the inputs the
long runs found, kept as regression tests of the fixes.

The property (see the harness): a reader or parser of outside input lets nothing escape but a
one-line ``UserError``/``ConfigError``, counts bad data as skipped, and writes nothing outside its
output folder. Any input that breaks it fails the target's test.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import ROOT

_spec = importlib.util.spec_from_file_location("fuzz_harness", ROOT / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz  # dataclasses look their module up by name
_spec.loader.exec_module(fuzz)

EXAMPLES = 100  # per target, derandomized: the same inputs on every run

@pytest.fixture(autouse=True)
def subnormal_floats():
    """Hypothesis draws subnormal floats and refuses to run where the CPU flushes them to zero; a
    test run before this one in the same worker process may have turned flushing on
    (``palm.core.process.flush_denormals``, as every training process does): off while fuzzing."""
    flushing = sys.float_info.min / 2 == 0.0  # with FTZ the smallest normal halved is 0
    if flushing:
        import torch

        torch.set_flush_denormal(False)
    yield
    if flushing:
        torch.set_flush_denormal(True)


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_target_holds_its_property(target):
    result = fuzz.run_target(target, EXAMPLES, derandomize=True, time_limit=None, shrink=False)
    assert not result.stopped, result.stopped
    assert result.inputs >= EXAMPLES
    assert not result.failures, "\n".join(f"{f.signature}: {f.detail}\n  input: {f.minimal[:800]}"
                                           for f in result.failures)


def test_the_harness_sees_a_failure(monkeypatch):
    """A target that escapes with a bare exception, or writes beside its output, is reported (so
    the tests above can fail), with its shrunk input, and the search goes on after it."""
    def run(p, work: Path) -> None:
        if p == 3:
            raise KeyError("boom")
        if p == 5:
            (work / "stray.txt").write_text("x")
        if p == 7:
            from palm.core.errors import UserError

            raise UserError("two\nlines")

    target = fuzz.Target("t", lambda: fuzz.st.integers(0, 10), lambda v, work: v, run)
    monkeypatch.setitem(fuzz.TARGETS, "t", target)
    result = fuzz.run_target("t", 200, derandomize=True, time_limit=None)
    got = {f.signature.split(" at ")[0].split(" (")[0]: f.minimal for f in result.failures}
    assert got == {"KeyError": "3", "wrote outside the output folder": "5", "UserError message not one line": "7"}


# ---- regressions: inputs the long runs found, in modules of this harness's scope ----------------

def _passes(target: str, value) -> None:
    fuzz.call_once(fuzz.TARGETS[target], value)  # raises fuzz.Violation on a broken property


def _scrape(*files, min_words: int = 0) -> dict:
    return {"files": [(f, ("none",), "") for f in files], "max_bytes": 2_000_000, "min_words": min_words,
            "missing": False}


@pytest.mark.parametrize("value", [
    _scrape((".txt", "", "utf-8")),  # no words, min_words 0: quality_reason's Counter was empty (IndexError)
    _scrape((".parquet", [], "")) | {"files": [((".parquet", [], ""), ("truncate", 0.0), "")]},  # a 0-byte .parquet
    _scrape((".parquet", [], "")) | {"files": [((".parquet", [], ""), ("insert", 0.5, b"\x00"), "")]},  # corrupt
    _scrape((".jsonl", '{"text": "hi", "url": 5}', "utf-8")),  # a url that is not text (AttributeError)
    _scrape((".parquet", [{"text": "hi", "url": 5}], "")),
    _scrape((".jsonl", '{"text": "\\ud800 hi"}', "utf-8")),  # a lone surrogate (UnicodeEncodeError)
    _scrape((".jsonl", '{"text": "hi", "title": "\\udc80"}', "utf-8")),
    _scrape((".jsonl", "1" * 5000, "utf-8")),  # a number past int()'s 4300 digits (ValueError)
    _scrape((".jsonl", "[" * 5000 + "]" * 5000, "utf-8")),  # nested past the JSON parser (RecursionError)
    # a title with CR LF ended the WARC header early: the record was lost in the shards (a URL's
    # CR LF is kept off the header line the same way)
    _scrape((".jsonl", '{"text": "hi", "title": "a\\r\\n\\r\\nb"}', "utf-8")),
    _scrape((".jsonl", '{"text": "hi", "url": "x\\r\\nWARC-Type: warcinfo\\r\\n"}', "utf-8")),
], ids=["empty-text", "empty-parquet", "corrupt-parquet", "int-url-jsonl", "int-url-parquet", "surrogate-text",
        "surrogate-title", "long-number", "deep-line", "crlf-title", "crlf-url"])
def test_scrape_files_regressions(value):
    _passes("scrape_files", value)


def test_scrape_files_counts_what_it_skips(tmp_path):
    from palm.data.scrape import ScrapeConfig, _collect_files
    from palm.data.warc import WarcShardWriter, read_warc, shard_name

    src = tmp_path / "in"
    src.mkdir()
    (src / "bad.parquet").write_bytes(b"PAR1 not really")
    (src / "rows.jsonl").write_text('{"text": "one", "url": 5, "title": "a\\r\\nb"}\n' + "[" * 3000 + "]" * 3000 + "\n")
    cfg = ScrapeConfig(source="files", files_path=str(src), tasks=1, workers=1)
    with WarcShardWriter(tmp_path / "raw", 1) as out:
        stats = _collect_files(cfg, out, False)
    assert stats["unreadable_file"] == 1 and stats["bad_json_line"] == 1 and stats["fetched"] == 1
    (rec,) = read_warc(tmp_path / "raw" / shard_name(0))
    assert rec.url.endswith("rows.jsonl#L1") and rec.title == "a  b" and rec.body == b"one"


def test_quality_reason_of_no_words_with_min_words_zero():
    from palm.data.clean import FilterConfig, quality_reason

    assert quality_reason("", FilterConfig(min_words=0)) == "too_short"
    assert quality_reason(" \n ", FilterConfig(min_words=0)) == "too_short"


@pytest.mark.parametrize("text, expect", [
    (b"\x80scrape: {}\n", "cannot read the params file (UnicodeDecodeError"),  # not UTF-8
    (b"scrape:\n  max_pages: 2001-13-45\n", "not valid YAML: month must be in 1..12"),  # a date YAML cannot build
    (b"scrape:\n  max_pages: " + b"1" * 5000 + b"\n", "not valid YAML: Exceeds the limit"),
    (b"scrape: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested deeper than the parser goes"),  # RecursionError
    (b"scrape:\n  max_pages: [\n", "not valid YAML"),  # was already one line; still is
])
def test_read_params_refuses_in_one_line(tmp_path, text, expect):
    from palm.core.config import read_params
    from palm.core.errors import UserError

    (tmp_path / "params.yaml").write_bytes(text)
    with pytest.raises(UserError) as err:
        read_params(tmp_path / "params.yaml")
    assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(UserError, match="cannot read the params file"):
        read_params(tmp_path)  # a folder


@pytest.mark.parametrize("data, expect", [
    ({"ffn_mult": float("inf")}, "model.ffn_mult: expected a finite number, got inf"),  # int(inf) in ffn_dim
    ({"ffn_mult": float("nan")}, "model.ffn_mult: expected a finite number, got nan"),
    ({"ffn_mult": 10**400}, "model.ffn_mult: expected a finite number"),  # float() of it overflowed
    ({"ffn_mult": 1e308, "d_model": 1024}, "model: values out of range"),  # finite, but the product is not
    ({"vocab_size": 2**63}, "model.vocab_size: expected an integer of 64 bits at most, got 9223372036854775808"),
    ({"vocab_size": 10**5000}, "model.vocab_size: expected an integer of 64 bits at most, got an integer of"),
    ({"a\nb": 1}, "model.'a\\nb': unknown key"),  # the key printed as it was: two lines
    ({"seq_len": "x" * 3 + "\r"}, "model.seq_len: expected an integer, got 'xxx\\r'"),
])
def test_from_dict_refuses_in_one_line(data, expect):
    from palm.core.config import from_dict
    from palm.core.errors import ConfigError
    from palm.model.network import ModelConfig

    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, data, "model")
    assert str(err.value).startswith(expect) and "\n" not in str(err.value) and "\r" not in str(err.value), str(err.value)


def test_from_dict_still_takes_ordinary_numbers():
    from palm.core.config import from_dict
    from palm.model.network import ModelConfig

    cfg = from_dict(ModelConfig, {"ffn_mult": 4, "vocab_size": 2**63 - 1, "rope_base": 1e4}, "model")
    assert cfg.ffn_mult == 4.0 and isinstance(cfg.ffn_mult, float) and cfg.vocab_size == 2**63 - 1


def test_warc_writer_keeps_header_values_on_their_line(tmp_path):
    from palm.data.warc import RawRecord, WarcShardWriter, read_warc, shard_name

    with WarcShardWriter(tmp_path, 1) as out:
        out.write(RawRecord("file:///x\r\nWARC-Type: warcinfo", "text/plain\n", b"body", "2026-01-01T00:00:00Z",
                            "t\r\n\r\n\ud800"))
        out.write(RawRecord("https://a.example/", "text/html", b"<p>two</p>", "2026-01-01T00:00:00Z"))
    skipped: Counter = Counter()
    recs = list(read_warc(tmp_path / shard_name(0), skipped=skipped))
    assert [r.body for r in recs] == [b"body", b"<p>two</p>"] and not skipped
    # (warcio reads the spaces of a URI as %20)
    assert recs[0].url == "file:///x%20%20WARC-Type:%20warcinfo" and recs[0].title == "t    \ufffd"
    assert recs[0].content_type == "text/plain"


def _registry(version: dict, path: object = "model", uri: str = "models:/palm-chat@champion") -> dict:
    return {"uri": uri, "mlmodel": {"flavors": {"python_function": {
                "artifacts": {"model": {"path": path} if path != "model" else "model"}}}},
            "server": {"error": None, "version": {"name": "palm-chat", "version": "1", "run_id": "r1", "tags": {},
                                                  "aliases": [], **version},
                       "runs": {}, "champion": None, "search": []},
            "champion_args": (0, 0.0, "reward_mean", "max")}


@pytest.mark.parametrize("value", [
    _registry({}, path="\x00"),  # a NUL byte in the artifact path: Path.resolve's ValueError
    _registry({"aliases": 1}, uri="models:/palm-chat@current"),  # aliases not a list: lineage's list() TypeError
], ids=["nul-artifact-path", "int-aliases"])
def test_registry_regressions(value):
    _passes("registry", value)
