"""`make bench`: every benchmark in turn, then one dated result file for this machine class.

    python benchmarks/bench.py [--only NAME ...] [--list] [--out benchmarks/results]

Each benchmark (:data:`BENCHMARKS`) runs as its own process, its output shown as it comes; the
lines it ends with, ``<name>ratio <x>`` (``ratio``, ``time_ratio``, ``ratio_batch1``…), are its
results, and the records it writes under ``benchmarks/records/`` are linked. Then
``benchmarks/results/<date>-<machine class>.json`` and a Markdown summary beside it are written
(a later run on the same day and machine class updates them: its benchmarks' rows replace
the earlier ones), and the performance table of
every machine class's latest result is regenerated (``docs/reference/benchmarks.md``).

The machine class names what the numbers depend on: the CPU model, its cores and its widest
matrix ISA (``avx512bf16``, ``amx``, ``avx512``, ``avx2``), or the GPU. One benchmark failing does
not stop the others; the exit status is then 1 and its row says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records"
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "reference" / "benchmarks.md"
RESULT_LINE = re.compile(r"^([a-z0-9_]*ratio[a-z0-9_]*) (-?[0-9.]+(?:e-?\d+)?|nan|inf)$")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str  # benchmarks/<name>.py
    measures: str  # what its ratio is
    anchor: str  # what it is measured against, in the same run


BENCHMARKS = (
    Benchmark("tokenize_throughput", "tokenize stage tokens/s", "a tokenizers encode loop and datasets.map"),
    Benchmark("train_throughput", "training step tokens/s", "palm-rlhf-pytorch 0.8.0 PaLM"),
    Benchmark("generate_throughput", "batched generation tokens/s", "palm-rlhf-pytorch 0.8.0 PaLM.generate"),
    Benchmark("ppo_throughput", "one PPO iteration, speed", "palm-rlhf-pytorch 0.8.0 RLHFTrainer"),
    Benchmark("time_to_loss", "time to a held-out loss (lower: faster)", "the previous pretrain recipe (AdamW)"),
    Benchmark("ranking_value", "reward accuracy per ranking", "prompts picked at random"),
    Benchmark("gold_levers", "PPO vs SFT on the gold judge, per lever", "the default PPO"),
    Benchmark("lora_memory", "PPO peak RSS, LoRA / full (lower: smaller)", "full fine-tuning"),
    Benchmark("rule_reward", "rule pass rate gain over SFT", "SFT"),
    Benchmark("data_scaling", "data stages at 1x/4x/16x", "the pre-datatrove stages (8d8385f)"),
    Benchmark("data_default", "default scrape + tokenize time (lower: faster)", "the pre-datatrove stages (8d8385f)"),
    Benchmark("int8_decode", "int8 / fp32 decoding tokens/s", "fp32 decoding"),
    Benchmark("serve_load", "palm serve throughput, 32 clients / 1", "one client, requests in turn"),
    Benchmark("lm_eval_check", "lm-eval log-likelihoods vs the project's", "the project's own scoring"),
)


# --- the machine ----------------------------------------------------------------------------

def machine() -> dict:
    """What the numbers depend on: CPU model, cores (usable by this process), matrix ISA, GPU."""
    flags, model = set(), "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = next((name for name, flag in (("amx", "amx_tile"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"),
                                        ("avx2", "avx2")) if flag in flags), "generic")
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "isa": isa, "gpu": gpu}


def machine_class(m: dict) -> str:
    """A file-name-safe name of the machine class: ``amd-epyc-2c-avx512bf16``, ``gpu-nvidia-h100-80gb-hbm3``."""
    def slug(text: str) -> str:
        text = re.sub(r"\((r|tm)\)|\bprocessor\b|\b\d+-core\b", "", text.lower())
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-")

    if m.get("gpu"):
        return f"gpu-{slug(m['gpu'])}"
    return f"{slug(m['cpu'])}-{m['cores']}c-{m['isa']}"


# --- running ------------------------------------------------------------------------------------

def run_one(bench: Benchmark, script: Path, records: Path = RECORDS) -> dict:
    """Run one benchmark, its output passed through; its result lines, time, status and the records
    it wrote."""
    before = {p: p.stat().st_mtime for p in records.glob("*")} if records.is_dir() else {}
    start = time.monotonic()
    results: dict[str, float] = {}
    print(f"\n=== {bench.name}: {bench.measures} (against {bench.anchor})", flush=True)
    with subprocess.Popen([sys.executable, "-W", "ignore", str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            found = RESULT_LINE.match(line.strip())
            if found:
                results[found.group(1)] = float(found.group(2))
        rc = proc.wait()
    written = sorted(p.name for p in records.glob("*") if before.get(p) != p.stat().st_mtime) if records.is_dir() else []
    return {"name": bench.name, "measures": bench.measures, "anchor": bench.anchor, "results": results,
            "seconds": round(time.monotonic() - start, 1), "status": "ok" if rc == 0 else f"failed (exit {rc})",
            "records": written}


def summary(result: dict) -> str:
    m = result["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores, {m['isa']}"
    lines = [f"# Benchmarks, {result['date']}, {result['machine_class']}", "",
             f"{where}; commit {result['commit']}; {result['seconds'] / 60:.0f} min.", "",
             "| benchmark | measures | against | result | s | status | records |", "|---|---|---|---|---|---|---|"]
    for r in result["benchmarks"]:
        values = ", ".join(f"{k} {v:.3g}" for k, v in r["results"].items()) or "-"
        records = ", ".join(f"[{n}](../records/{n})" for n in r["records"]) or "-"
        lines.append(f"| {r['name']} | {r['measures']} | {r['anchor']} | {values} | {r['seconds']:.0f} | "
                     f"{r['status']} | {records} |")
    return "\n".join(lines) + "\n"


def latest_page(results_dir: Path) -> str:
    """The performance table: each machine class's latest result of each benchmark."""
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted(results_dir.glob("*.json")):  # dated names: later files win
        result = json.loads(path.read_text())
        for r in result["benchmarks"]:
            if r["status"] == "ok" and r["results"]:
                rows[(result["machine_class"], r["name"])] = {**r, "date": result["date"], "file": path.name}
    lines = ["# Benchmark results", "",
             "Generated by `make bench` (`benchmarks/bench.py`) from `benchmarks/results/`: each machine class's",
             "latest result of each benchmark, with the baseline it ran against in the same run. Ratios",
             "are ours over the anchor unless the measure says lower is better.", "",
             "| machine class | benchmark | measures | against | result | date |", "|---|---|---|---|---|---|"]
    for (klass, name), r in sorted(rows.items()):
        values = ", ".join(f"{k} {v:.3g}" for k, v in r["results"].items())
        lines.append(f"| {klass} | {name} | {r['measures']} | {r['anchor']} | {values} | {r['date']} |")
    if not rows:
        lines.append("| (none yet) | | | | | |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these benchmarks only (names: --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--out", type=Path, default=RESULTS, help="the folder of dated results")
    p.add_argument("--page", type=Path, default=PAGE, help="the generated performance table")
    p.add_argument("--script-dir", type=Path, default=ROOT / "benchmarks", help=argparse.SUPPRESS)
    p.add_argument("--records", type=Path, default=RECORDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = {b.name: b for b in BENCHMARKS}
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name}: {b.measures} (against {b.anchor})")
        return 0
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        print(f"error: bench: unknown benchmark(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.only] if args.only else list(BENCHMARKS)
    start, m = time.monotonic(), machine()
    rows = [run_one(b, args.script_dir / f"{b.name}.py", args.records) for b in chosen]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": dt.date.today().isoformat(), "machine_class": machine_class(m), "machine": m,
              "commit": commit or "unknown", "seconds": round(time.monotonic() - start, 1), "benchmarks": rows}
    stem = args.out / f"{result['date']}-{result['machine_class']}"
    if stem.with_suffix(".json").is_file():  # the same day and machine class: this run's rows replace theirs
        earlier = json.loads(stem.with_suffix(".json").read_text())
        ran = {r["name"] for r in rows}
        result["benchmarks"] = [r for r in earlier["benchmarks"] if r["name"] not in ran] + rows
        result["seconds"] = round(earlier.get("seconds", 0) + result["seconds"], 1)
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), summary(result))
    write_atomic(args.page, latest_page(args.out))
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    print(f"\nbench: {stem}.json and .md written; {args.page} regenerated"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
