"""Two runs of the pipeline, side by side: is every stage's metric and every model's weights the same?

For a change that must not change the numbers (a refactor): run `make run` in a clone of the code
before and in a clone of the code after, on the same machine, then

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR [--record benchmarks/records/NAME.json]

It prints, per stage, the metrics of ``reports/<stage>/metrics.json`` that differ (timings left
out: they differ between any two runs) and, per model, whether ``models/<m>/model.safetensors`` is
byte-identical; exit 1 when anything but timing differs. ``--record`` writes the comparison with
the date and the CPU as a JSON record.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

STAGES = ("scrape", "tokenizer", "tokenize", "sft_data", "prefs", "pretrain", "sft", "reward", "ppo", "evaluate")
MODELS = ("pretrain", "sft", "reward", "ppo")
TIMING = ("seconds", "tokens_per_s", "mfu", "peak_flops", "checkpoint", "rollout_s", "update_s")


def cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info.split()]
    return f"{name}, {len([ln for ln in info.splitlines() if ln.startswith('processor')])} cores" + (
        f", {' '.join(flags)}" if flags else ", AVX2-only bf16")


def commit(root: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def override(section: dict[str, Any], assignments: str) -> dict[str, Any]:
    """A deep copy of ``section`` with dotted ``key=value,...`` assignments (JSON values, else strings)."""
    out = copy.deepcopy(section)
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        *path, leaf = key.strip().split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:  # a bare word: muon, wsd, fp32
            node[leaf] = value.strip()
    return out



def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure whole (a temp file, then rename)."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def compare(before: Path, after: Path) -> dict:
    stages = {}
    for stage in STAGES:
        a, b = (json.loads((root / "reports" / stage / "metrics.json").read_text()) for root in (before, after))
        stages[stage] = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
                         if not any(t in k for t in TIMING) and a.get(k) != b.get(k)}
    models = {}
    for m in MODELS:
        a, b = (hashlib.sha256((root / "models" / m / "model.safetensors").read_bytes()).hexdigest()
                for root in (before, after))
        models[m] = {"before": a, "after": b, "identical": a == b}
    headline = {s: json.loads((after / "reports" / s / "metrics.json").read_text()) for s in ("pretrain", "reward",
                                                                                             "evaluate")}
    return {"stages_differing": {s: d for s, d in stages.items() if d}, "models": models,
            "headline": {"pretrain_val_loss": headline["pretrain"].get("val_loss"),
                         "reward_val_accuracy": headline["reward"].get("val_accuracy"),
                         "win_rate": headline["evaluate"].get("win_rate"), "kl": headline["evaluate"].get("kl")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--record", type=Path, help="write the comparison as a dated JSON record here")
    args = p.parse_args(argv)
    out = compare(args.before, args.after)
    for stage in STAGES:
        diff = out["stages_differing"].get(stage)
        print(f"{stage:10s} {'same metrics' if not diff else diff}")
    for m, r in out["models"].items():
        print(f"{m:10s} weights {'identical' if r['identical'] else 'DIFFER'} ({r['after'][:16]})")
    print("headline:", out["headline"])
    same = not out["stages_differing"] and all(r["identical"] for r in out["models"].values())
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"date": datetime.date.today().isoformat(), "cpu": cpu(),
                                           "before_commit": commit(args.before), "after_commit": commit(args.after),
                                           "same": same, **out}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
