"""Tokenizer determinism and token shards that read back exactly through megatron-core."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import ROOT, run_stage_cli

from palm.core.errors import UserError
from palm.core.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerConfig,
    load_tokenizer,
    sha256_file,
    special_ids,
    train_tokenizer,
)
from palm.data.corpus import write_corpus
from palm.data.split import split_score
from palm.data.tokenize import TokenizeConfig, choose_valid, read_meta, tokenize_corpus


@pytest.fixture(scope="module")
def shakespeare_corpus(tmp_path_factory, request):
    from helpers import SHARED_DATA

    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"real test data not found at {path}")
    lines = path.read_text().splitlines()
    docs = ["\n".join(lines[i : i + 400]) for i in range(0, 16000, 400)]  # 40 documents
    rows = [{"url": f"file://shakespeare#{i}", "title": f"part {i}", "text": t,
             "sha1": hashlib.sha1(t.encode()).hexdigest(), "fetched_at": "2026-01-01T00:00:00Z", "source": "files"}
            for i, t in enumerate(docs)]
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(rows[:25], d, 0)
    write_corpus(rows[25:], d, 1)
    return d, docs


def _train(corpus, out, vocab=600):
    from palm.data.corpus import read_corpus

    texts = (t for b in read_corpus(corpus, ["text"]) for t in b.column("text").to_pylist())
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=vocab), progress=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def test_tokenizer_deterministic_and_special(shakespeare_corpus, tmp_path):
    corpus, docs = shakespeare_corpus
    a = _train(corpus, tmp_path / "a")
    b = _train(corpus, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    tok = load_tokenizer(a, expected_sha256=sha256_file(b))
    assert tok.get_vocab_size() == 600
    ids = special_ids(tok)
    assert sorted(ids.values()) == list(range(len(SPECIAL_TOKENS)))
    text = docs[3]
    assert tok.decode(tok.encode(text).ids) == text  # byte-level BPE round-trips exactly
    with pytest.raises(UserError, match="differs"):
        load_tokenizer(a, expected_sha256="0" * 64)


def test_shards_read_back_exactly(shakespeare_corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus, docs = shakespeare_corpus
    tok_path = _train(corpus, tmp_path / "tok")
    tok = load_tokenizer(tok_path)
    eod = special_ids(tok)["eod_id"]
    cfg = TokenizeConfig(valid_fraction=0.2, seed=7, batch_size=8)
    out = tmp_path / "tokens"
    out.mkdir()
    m = tokenize_corpus(corpus, tok_path, out, cfg, progress=False)
    sha1s = [hashlib.sha1(t.encode()).hexdigest() for t in docs]
    valid = choose_valid(sha1s, cfg)
    expect = {"train": [], "valid": []}
    for s, t in zip(sha1s, docs):
        expect["valid" if s in valid else "train"].append(tok.encode(t).ids + [eod])
    for name in ("train", "valid"):
        ds = IndexedDataset(str(out / name))
        assert len(ds) == len(expect[name]) > 0
        for i, ids in enumerate(expect[name]):
            assert np.array_equal(ds[i], np.asarray(ids)), (name, i)
    assert m["tokens"] == sum(len(x) for v in expect.values() for x in v)
    meta = read_meta(out)
    assert meta["tokenizer_sha256"] == sha256_file(tok_path) and meta["eod_id"] == eod


def test_split_is_seeded_and_order_free():
    sha1s = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(1000)]
    cfg = TokenizeConfig(valid_fraction=0.1, seed=3)
    v = choose_valid(sha1s, cfg)
    assert v == choose_valid(list(reversed(sha1s)), cfg)
    assert 60 < len(v) < 140
    assert v != choose_valid(sha1s, TokenizeConfig(valid_fraction=0.1, seed=4))
    assert all(0 <= split_score(s, 1) < 1 for s in sha1s[:50])
    assert len(choose_valid(sha1s[:2], TokenizeConfig(valid_fraction=0.01))) == 1


def test_tokenize_cli_missing_inputs(tmp_path):
    (tmp_path / "params.yaml").write_text("tokenize: {}\n")
    (tmp_path / "corpus").mkdir()
    proc = run_stage_cli("tokenize", ["--corpus", "corpus", "--tokenizer", "tok/tokenizer.json", "--out", "tokens",
                                      "--no-mlflow"], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tokenize: ") and "tokenizer not found" in last, proc.stderr
    assert not (tmp_path / "tokens").exists() and not list(tmp_path.glob(".tokens.tmp-*"))


def _shards(folder) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("train.bin", "train.idx", "valid.bin", "valid.idx", "meta.json")}


def test_the_shards_do_not_depend_on_tasks_or_workers(shakespeare_corpus, tmp_path):
    """One rank, or three ranks on two worker processes (each writing its slice with datatrove's
    Megatron writer, appended in rank order): the same bytes."""
    corpus, _ = shakespeare_corpus
    tok = _train(corpus, tmp_path / "tok")
    outs = []
    for tasks, workers in ((1, 1), (3, 2)):
        out = tmp_path / f"t{tasks}"
        out.mkdir()
        tokenize_corpus(corpus, tok, out, TokenizeConfig(tasks=tasks, workers=workers), progress=False)
        outs.append(_shards(out))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("n,fraction", [(1, 0.05), (2, 0.01), (3, 0.99), (40, 0.2), (40, 0.001)])
def test_the_streaming_split_is_choose_valids(n, fraction):
    """split_plan's one pass (no set of every hash held) decides like choose_valid on all of them."""
    import tempfile
    from pathlib import Path

    from palm.data.tokenize import split_plan

    cfg = TokenizeConfig(valid_fraction=fraction)
    rows = [{"url": f"u{i}", "title": "", "text": "t", "sha1": hashlib.sha1(str(i).encode()).hexdigest(),
             "fetched_at": "", "source": "files"} for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        write_corpus(rows, Path(d))
        total, forced_valid, forced_train = split_plan(Path(d), cfg)
    want = choose_valid([r["sha1"] for r in rows], cfg)
    got = {r["sha1"] for r in rows if r["sha1"] != forced_train
           and (r["sha1"] == forced_valid or split_score(r["sha1"], cfg.seed) < fraction)}
    assert total == n and got == want


def test_a_failed_rank_resumes_after_the_ranks_that_finished(shakespeare_corpus, tmp_path, monkeypatch):
    """Rank 1 dies once: the work folder stays, and the rerun redoes rank 1 only, to the same shards
    as a run that never failed."""
    from palm.data.executors import StepFailed
    from palm.data.steps import TokenizeRank

    corpus, _ = shakespeare_corpus
    tok = _train(corpus, tmp_path / "tok")
    cfg = TokenizeConfig(tasks=2, workers=1)  # ranks in this process: the patch below reaches them
    (tmp_path / "ref").mkdir()
    tokenize_corpus(corpus, tok, tmp_path / "ref", cfg, progress=False)
    calls, run = [], TokenizeRank.run

    def flaky(self, data=None, rank=0, world_size=1):
        calls.append(rank)
        if rank == 1 and calls.count(1) == 1:
            raise RuntimeError("worker lost")
        return run(self, data, rank, world_size)

    monkeypatch.setattr(TokenizeRank, "run", flaky)
    work = tmp_path / "work"
    (tmp_path / "a").mkdir()
    with pytest.raises(StepFailed, match="tokenize"):
        tokenize_corpus(corpus, tok, tmp_path / "a", cfg, work=work, progress=False)
    assert (work / "logs" / "tokenize" / "completions" / "00000").is_file()
    (tmp_path / "b").mkdir()
    tokenize_corpus(corpus, tok, tmp_path / "b", cfg, work=work, progress=False)
    assert calls == [0, 1, 1]
    assert _shards(tmp_path / "b") == _shards(tmp_path / "ref")
    assert not work.exists()
