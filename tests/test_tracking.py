"""MLflow policy: a stage whose tracking server is unreachable warns once and keeps its outputs."""

from __future__ import annotations

import socket

from conftest import ROOT, run_stage_cli


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_mlflow_keeps_outputs(tmp_path, shared_data):
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 400\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import hashlib

    from palm.data.corpus import write_corpus

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:50000]
    write_corpus([{"url": "u", "title": "t", "text": text, "sha1": hashlib.sha1(text.encode()).hexdigest(),
                   "fetched_at": "x", "source": "files"}], corpus)
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = run_stage_cli("tokenizer", ["--corpus", "corpus", "--out", "tok"], cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert (tmp_path / "reports" / "tokenizer" / "metrics.json").is_file()
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: MLflow")]
    assert len(warnings) == 1 and uri in warnings[0] and "keeps its outputs" in warnings[0], proc.stderr
