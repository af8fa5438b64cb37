"""The default data stages before and after datatrove (issue 34, acceptance 3): ``scrape`` and
``tokenize`` of ``make run``'s embedded default (the pydoc site), today's tree against a baseline
commit (default 8d8385f, the last one before datatrove), interleaved in one run.

Each side is a fresh clone of this repository at its commit, with this checkout's ``.venv``. Each
round runs, on one side then the other (the order alternates between rounds, the host's speed
drifts), ``dvc repro -f -s scrape`` and ``dvc repro -f -s tokenize`` (the tokenizer stage once, the
first time, untimed), timing each command's wall clock and CPU seconds (DVC, the stage and the
workers it waited for: robust to other jobs on the host). It reports the medians, the ratios
new/baseline, the documents kept and whether both sides kept the same URLs, and writes the record
``benchmarks/records/data-default-DATE.json`` (or ``--record PATH``). Its last lines:
``scrape_ratio R``, ``tokenize_ratio R``, ``same_documents true|false``.

    python benchmarks/data_default.py [--rounds 2] [--baseline 8d8385f]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clone(commit: str, dst: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
    subprocess.run(["git", "-C", str(dst), "checkout", "-q", commit], check=True)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return dst


def repro(root: Path, stage: str, force: bool = True) -> tuple[float, float]:
    """``dvc repro -s stage``: (wall seconds, CPU seconds of DVC, the stage and its workers). The
    CPU time is what other jobs on the host leave untouched; the wall clock is what a user waits."""
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro", *(["-f"] if force else []), "-s", stage],
                          cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: data_default: `dvc repro -s {stage}` failed in {root}:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - started, cpu


def urls(root: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(u for p in sorted((root / "data" / "corpus").glob("part-*.parquet"))
                  for u in pq.read_table(p, columns=["url"]).column("url").to_pylist())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="8d8385f")
    ap.add_argument("--record", type=Path, default=None)
    args = ap.parse_args(argv)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    times: dict[str, dict[str, list[float]]] = {s: {"scrape": [], "tokenize": []} for s in ("baseline", "new")}
    cpu: dict[str, dict[str, list[float]]] = {s: {"scrape": [], "tokenize": []} for s in ("baseline", "new")}
    with tempfile.TemporaryDirectory(prefix="palm-data-default-") as tmp:
        sides = {"baseline": clone(args.baseline, Path(tmp) / "baseline"), "new": clone(head, Path(tmp) / "new")}
        for r in range(args.rounds):
            order = ("baseline", "new") if r % 2 == 0 else ("new", "baseline")
            for side in order:
                root = sides[side]
                for stage in ("scrape", "tokenize"):
                    if stage == "tokenize" and r == 0:
                        repro(root, "tokenizer", force=False)
                    wall, used = repro(root, stage)
                    times[side][stage].append(wall)
                    cpu[side][stage].append(used)
                print(f"round {r + 1} {side}: scrape {times[side]['scrape'][-1]:.1f} s ({cpu[side]['scrape'][-1]:.1f} "
                      f"CPU s), tokenize {times[side]['tokenize'][-1]:.1f} s ({cpu[side]['tokenize'][-1]:.1f} CPU s)",
                      flush=True)
        kept = {s: urls(root) for s, root in sides.items()}
    med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    ratios = {k: med["new"][k] / med["baseline"][k] for k in ("scrape", "tokenize")}
    cpu_med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in cpu.items()}
    cpu_ratios = {k: cpu_med["new"][k] / cpu_med["baseline"][k] for k in ("scrape", "tokenize")}
    same = kept["baseline"] == kept["new"]
    record = {
        "benchmark": "data_default",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "baseline": args.baseline, "new": head, "rounds": args.rounds,
        "seconds": times, "median_seconds": med, "ratio_new_over_baseline": ratios,
        "cpu_seconds": cpu, "median_cpu_seconds": cpu_med, "cpu_ratio_new_over_baseline": cpu_ratios,
        "load_average_at_end": os.getloadavg(),
        "documents": {s: len(v) for s, v in kept.items()}, "same_documents": same,
    }
    path = args.record or ROOT / "benchmarks" / "records" / f"data-default-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    for side in ("baseline", "new"):
        print(f"{side}: scrape {med[side]['scrape']:.1f} s, tokenize {med[side]['tokenize']:.1f} s (median of "
              f"{args.rounds}), {len(kept[side])} documents")
    print(f"record: {path}")
    print(f"cpu: scrape ratio {cpu_ratios['scrape']:.3f}, tokenize ratio {cpu_ratios['tokenize']:.3f}")
    print(f"scrape_ratio {ratios['scrape']:.3f}")
    print(f"tokenize_ratio {ratios['tokenize']:.3f}")
    print(f"same_documents {str(same).lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
