"""MLflow policy: a stage whose tracking server is unreachable warns once and keeps its outputs."""

from __future__ import annotations

from conftest import ROOT, free_port, run_stage_cli


def test_unreachable_mlflow_keeps_outputs(tmp_path, shared_data):
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 400\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import hashlib

    from palm.data.corpus import write_corpus

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:50000]
    write_corpus([{"url": "u", "title": "t", "text": text, "sha1": hashlib.sha1(text.encode()).hexdigest(),
                   "fetched_at": "x", "source": "files"}], corpus)
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_stage_cli("tokenizer", ["--corpus", "corpus", "--out", "tok"], cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert (tmp_path / "reports" / "tokenizer" / "metrics.json").is_file()
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning: MLflow")]
    assert len(warnings) == 1 and uri in warnings[0] and "keeps its outputs" in warnings[0], proc.stderr


def test_follow_logs_each_complete_curve_row_at_its_step_and_changed_artifacts(tmp_path, monkeypatch):
    """What the training workers append to curve.csv reaches the stage's MLflow run while they
    run (they never import MLflow): every complete row once, at its step; a half-written last
    line waits for its newline; a stale curve of an earlier execution is not logged; an artifact
    is logged again when it changes."""
    import time

    import mlflow

    from palm.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    reports = tmp_path / "reports"
    reports.mkdir()
    curve, samples = reports / "curve.csv", reports / "samples.jsonl"
    curve.write_text("step,loss,val_loss\n99,9.0,\n")  # an earlier execution's
    tracker = Tracker(tmp_path, "pretrain")
    tracker.start({"a": 1}, {})
    with tracker.follow(curve, [samples], every_s=0.05):
        curve.write_text("step,loss,val_loss\n2,5.0,\n")
        time.sleep(0.3)
        samples.write_text('{"step": 2}\n')
        with curve.open("a") as f:
            f.write("4,4.0,4.5\n6,3.")  # the last row is still being written
        time.sleep(0.3)
        with curve.open("a") as f:
            f.write("5,\n")
        samples.write_text('{"step": 2}\n{"step": 6}\n')
    tracker.end()
    client = mlflow.MlflowClient()
    loss = [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")]
    assert sorted(loss) == [(2, 5.0), (4, 4.0), (6, 3.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "val_loss")] == [(4, 4.5)]
    path = client.download_artifacts(tracker.run_id, "samples.jsonl", str(tmp_path / "dl"))
    assert open(path).read().count("step") == 2
