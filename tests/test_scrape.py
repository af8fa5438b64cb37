"""The scrape stage as a user runs it (stages/scrape.py), on local files and a real local site."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from helpers import ROOT, run_stage_cli

PROSE = ("Foxes are small omnivorous mammals with a flattened skull, upright triangular ears and a long "
         "bushy tail. They live on every continent except Antarctica and adapt well to cities. ")


def write_params(tmp, **scrape):
    (tmp / "params.yaml").write_text(json.dumps({"scrape": {"tasks": 2, "workers": 1, **scrape}}))


def scrape(tmp):
    return run_stage_cli("scrape", ["--raw", "raw", "--out", "corpus", "--no-mlflow"], cwd=tmp,
                         env={"PYTHONPATH": str(ROOT)})


def corpus_rows(tmp):
    return pq.read_table(sorted((tmp / "corpus").glob("part-*.parquet"))).to_pylist()


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: scrape: "), proc.stderr
    for w in words:
        assert w in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_files_source_all_formats(tmp_path, shared_data):
    src = tmp_path / "src"
    src.mkdir()
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    (src / "a.txt").write_text(text[:6000])
    (src / "b.md").write_text(text[6000:12000])
    (src / "c.html").write_bytes(f"<html><head><title>Latin</title></head><body><article><p>Café déjà vu. {PROSE * 4}"
                                 f"</p></article></body></html>".encode("iso-8859-1"))
    (src / "d.jsonl").write_text(json.dumps({"text": text[12000:18000], "url": "https://example.org/d"}) + "\n"
                                 + json.dumps({"text": text[12000:18000]}) + "\nnot json\n")
    (src / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    write_params(tmp_path, source="files", files_path=str(src))
    proc = scrape(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = corpus_rows(tmp_path)
    assert len(rows) == 4  # a, b, c, d (its second line is an exact duplicate)
    latin = next(r for r in rows if r["title"] == "Latin")
    assert "Café déjà vu" in latin["text"]  # non-UTF-8 HTML decoded through its charset
    stats = json.loads((tmp_path / "corpus" / "stats.json").read_text())
    assert stats["dropped"]["exact_duplicate"] == 1
    assert stats["collect"]["unsupported_file"] == 1 and stats["collect"]["bad_json_line"] == 1
    metrics = json.loads((tmp_path / "reports" / "scrape" / "metrics.json").read_text())
    assert metrics["documents"] == 4
    assert list((tmp_path / "raw").glob("shard-*.warc.gz"))


def test_missing_folder(tmp_path):
    write_params(tmp_path, source="files", files_path=str(tmp_path / "nope"))
    assert_one_line_error(scrape(tmp_path), "scrape.files_path", "not found")
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "raw").exists()


@pytest.mark.parametrize("files", [{}, {"x.bin": bytes(range(256)) * 4, "y.png": b"\x89PNG" + bytes(64)},
                                   {"z.txt": b"\x00\x01\x02binary\x00" * 50}])
def test_empty_or_binary_corpus(tmp_path, files):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    write_params(tmp_path, source="files", files_path=str(src))
    proc = scrape(tmp_path)
    assert_one_line_error(proc, "scrape")
    assert not (tmp_path / "corpus").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_unresolvable_seed(tmp_path):
    write_params(tmp_path, source="crawl", seed_urls=["https://no-such-host.invalid/"], retries=0)
    assert_one_line_error(scrape(tmp_path), "no-such-host.invalid")
    assert not (tmp_path / "corpus").exists()


def test_hf_offline_is_one_line(tmp_path):
    write_params(tmp_path, source="hf", hf_dataset="no-such-user/no-such-dataset-xyz")
    proc = run_stage_cli("scrape", ["--raw", "raw", "--out", "corpus", "--no-mlflow"], cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert_one_line_error(proc, "scrape.hf_dataset", "offline")


LONG = " ".join(f"Fact {i}: the fox number {i} lives in den {i * 7 % 13} and hunts at hour {i % 24}." for i in range(40))


class Site(BaseHTTPRequestHandler):
    pages = {
        "/": f"<html><head><title>Home</title></head><body><article><p>{LONG}</p>"
             "<a href='/'>self</a> <a href='/#top'>again</a> <a href='/copy'>copy</a> <a href='/near'>near</a>"
             "</article></body></html>",
        "/copy": f"<html><head><title>Home</title></head><body><article><p>{LONG}</p>"
                 "<a href='/'>self</a> <a href='/#top'>again</a> <a href='/copy'>copy</a> <a href='/near'>near</a>"
                 "</article></body></html>",
        "/near": f"<html><head><title>Near</title></head><body><article><p>{LONG} Also badgers.</p>"
                 "</article></body></html>",
    }

    def do_GET(self):
        body = self.pages.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        data = (body or "not found").encode()
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_crawl_self_links_and_duplicates_yield_one_document(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        write_params(tmp_path, source="crawl", seed_urls=[base], allow_hosts=[f"127.0.0.1:{server.server_address[1]}"],
                     filters={"min_words": 20})
        proc = scrape(tmp_path)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    rows = corpus_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["url"] == base  # the earliest-crawled copy survives
    stats = json.loads((tmp_path / "corpus" / "stats.json").read_text())
    assert stats["fetched"] == 3
    assert stats["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    metrics = json.loads((tmp_path / "reports" / "scrape" / "metrics.json").read_text())
    assert metrics["crawl_skipped_parse_timeout"] == 0 and metrics["crawl_skipped_encoding"] == 0


def test_hf_source_streams_a_local_dataset(tmp_path, shared_data):
    """The `hf` source goes through `datasets.load_dataset(..., streaming=True)`; offline it
    accepts a local dataset folder (here OpenAssistant messages as JSON lines)."""
    import json as _json

    src = tmp_path / "ds"
    src.mkdir()
    texts = []
    with open(shared_data / "oasst" / "en_100_tree.jsonl") as f:
        for line in f:
            root = _json.loads(line)["prompt"]
            stack = [root]
            while stack:
                m = stack.pop()
                if len(m["text"].split()) >= 60:
                    texts.append(m["text"])
                stack.extend(m.get("replies", []))
    (src / "train.jsonl").write_text("".join(_json.dumps({"content": t}) + "\n" for t in texts[:40]))
    write_params(tmp_path, source="hf", hf_dataset=str(src), hf_text_field="content", hf_max_docs=30)
    proc = run_stage_cli("scrape", ["--raw", "raw", "--out", "corpus", "--no-mlflow"], cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    stats = _json.loads((tmp_path / "corpus" / "stats.json").read_text())
    assert stats["fetched"] == 30 and 0 < stats["documents"] <= 30
    assert all(r["url"].startswith("hf://") for r in corpus_rows(tmp_path))


def test_sigkill_mid_scrape_then_dvc_repro_ends_like_an_uninterrupted_run(tmp_path):
    """Kill -9 the whole `dvc repro` (DVC and the stage) while scrape writes its shards: no output
    is left half-written, and the next `dvc repro` redoes the stage to the same corpus (each
document's ``fetched_at`` aside: the time it was read)."""
    import os
    import random
    import signal
    import subprocess
    import time

    import yaml

    from helpers import make_project

    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    for i in range(1500):
        (src / f"doc{i:04d}.txt").write_text(" ".join(rng.choice(words) for _ in range(120)))

    def project(name):
        root = make_project(tmp_path / name)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["scrape"].update(source="files", files_path=str(src), tasks=2, workers=1)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        return root

    def repro(root, **kw):
        return subprocess.Popen([str(root / ".venv" / "bin" / "dvc"), "repro", "-s", "scrape"], cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)

    straight = project("a")
    first = repro(straight)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    killed = project("b")
    run = repro(killed)
    data = killed / "data"
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob(".work/scrape-*/raw/*.warc.gz")):
        time.sleep(0.02)  # until the stage is writing its WARC shards (in its work folder)
    assert run.poll() is None, "the stage ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (data / "corpus").exists() and not (data / "raw").exists()
    again = repro(killed)
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
    def content(root):  # all but when each document was read, which is the run's own time
        return [{k: v for k, v in row.items() if k != "fetched_at"} for row in corpus_rows(root / "data")]

    assert content(straight) == content(killed)
    assert not list(data.glob(".*.tmp-*")), "the killed run's temporary folders are cleaned up"
    assert not (killed / ".work").exists(), "the work folder goes once the stage has finished"
