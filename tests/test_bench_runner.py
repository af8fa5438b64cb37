"""`make bench`'s runner (benchmarks/bench.py): each benchmark's result lines and records gathered into
one dated result per machine class, its Markdown summary and the performance table, on stand-in
benchmark scripts (the real ones take hours)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench  # noqa: E402


def test_the_machine_class_names_cpu_cores_and_isa_or_the_gpu():
    cpu = {"cpu": "Intel(R) Xeon(R) Platinum 8480+ Processor", "cores": 16, "isa": "amx", "gpu": None}
    assert bench.machine_class(cpu) == "intel-xeon-platinum-8480-16c-amx"
    assert bench.machine_class({**cpu, "gpu": "NVIDIA H100 80GB HBM3"}) == "gpu-nvidia-h100-80gb-hbm3"
    here = bench.machine()
    assert here["cores"] >= 1 and here["isa"] in ("amx", "avx512bf16", "avx512", "avx2", "generic")


def test_a_run_writes_the_dated_result_its_summary_and_the_table_and_a_failure_is_a_row(tmp_path):
    scripts, records, out, page = tmp_path / "scripts", tmp_path / "records", tmp_path / "results", tmp_path / "b.md"
    scripts.mkdir()
    records.mkdir()
    (scripts / "int8_decode.py").write_text(
        "import pathlib, sys\n"
        f"pathlib.Path({str(records)!r}, 'int8-x.json').write_text('{{}}')\n"
        "print('working'); print('ratio_batch1 1.700'); print('ratio_batch16 0.610')\n")
    (scripts / "serve_load.py").write_text("print('ratio 9'); raise SystemExit(3)\n")
    args = ["--script-dir", str(scripts), "--records", str(records), "--out", str(out), "--page", str(page)]
    assert bench.main(["--only", "int8_decode", "serve_load", *args]) == 1
    (result_file,) = out.glob("*.json")
    result = json.loads(result_file.read_text())
    assert result_file.name == f"{result['date']}-{result['machine_class']}.json"
    int8, serve = result["benchmarks"]
    assert int8["results"] == {"ratio_batch1": 1.7, "ratio_batch16": 0.61} and int8["records"] == ["int8-x.json"]
    assert int8["status"] == "ok" and serve["status"] == "failed (exit 3)" and serve["records"] == []
    md = result_file.with_suffix(".md").read_text()
    assert "| int8_decode | int8 / fp32 decoding tokens/s | fp32 decoding | ratio_batch1 1.7, ratio_batch16 0.61 |" in md
    table = page.read_text()
    assert f"| {result['machine_class']} | int8_decode |" in table and "serve_load" not in table  # failed: not shown

    # a later run the same day: its rows replace theirs, the others stay
    (scripts / "serve_load.py").write_text("print('ratio 6.5')\n")
    assert bench.main(["--only", "serve_load", *args]) == 0
    again = json.loads(result_file.read_text())
    assert [r["name"] for r in again["benchmarks"]] == ["int8_decode", "serve_load"]
    assert again["benchmarks"][1]["results"] == {"ratio": 6.5}
    assert "| serve_load |" in page.read_text()
    assert bench.main(["--only", "nothing", *args]) == 2
