"""The default pretrain run's process layout on this machine: one process with a thread per core
(``data_parallel: 1``) against one single-threaded process per core (``data_parallel: <cores>``,
``micro_batch_size`` divided by as much, so the global batch and the data order stay the same).

Each variant runs the real ``pretrain`` stage (``python -m stages.pretrain``, MLflow off) for
``--steps`` steps on the token shards of ``make run`` (``data/tokens``, ``artifacts/tokenizer``), in
a scratch folder, alternating A B A B ... so drift of a shared machine hits both alike. Printed per
variant: the median ``tokens_per_s`` of its training steps (the stage's own metric) and the
median wall time of the stage; the two runs must reach the same loss (they train the same model on
the same batches; only the order of floating-point sums differs). The last line is
``ratio <tokens/s of one process per core / tokens/s of one process>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(variant: dict, steps: int, tmp: Path, tokens: Path, tokenizer: Path) -> tuple[float, float, float]:
    """(tokens/s, wall seconds, final train loss) of one fresh stage run."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    section = {**params["pretrain"], **variant, "train_steps": steps, "eval_interval": steps,
               "checkpoint_interval": steps, "log_interval": min(10, steps)}
    (tmp / "params.yaml").write_text(yaml.safe_dump({"model": params["model"], "pretrain": section}))
    for p in ("checkpoints", "out", "reports"):
        shutil.rmtree(tmp / p, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # threads: 0 -> cores / processes
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.pretrain", "--no-mlflow", "--tokens", str(tokens),
                    "--tokenizer", str(tokenizer), "--checkpoints", "checkpoints", "--out", "out"],
                   cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    metrics = json.loads((tmp / "reports" / "pretrain" / "metrics.json").read_text())
    return metrics["tokens_per_s"], wall, metrics["final_train_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "artifacts" / "tokenizer")
    args = ap.parse_args()
    if not (args.tokens / "meta.json").is_file():
        sys.exit(f"error: {args.tokens}: no token shards; run `make run` (or `dvc repro tokenize`) first")
    cores = os.cpu_count() or 1
    mbs = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain"]["micro_batch_size"]
    if cores < 2 or mbs % cores:
        sys.exit(f"skip: {cores} cores and micro_batch_size {mbs}: no per-core layout to compare")
    variants = {f"1 process x {cores} threads": {"data_parallel": 1, "micro_batch_size": mbs},
                f"{cores} processes x 1 thread": {"data_parallel": cores, "micro_batch_size": mbs // cores}}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    print(f"default pretrain, {args.steps} steps a run, {args.reps} runs each, {cores} cores; "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for _ in range(args.reps):
            for name, variant in variants.items():
                results[name].append(run(variant, args.steps, tmp, args.tokens.resolve(), args.tokenizer.resolve()))
    tps = {}
    for name, rs in results.items():
        tps[name] = statistics.median(r[0] for r in rs)
        print(f"{name:26s} {tps[name]:8.0f} tokens/s (runs: {', '.join(f'{r[0]:.0f}' for r in rs)})   "
              f"stage wall {statistics.median(r[1] for r in rs):6.1f} s   final train loss "
              f"{', '.join(f'{r[2]:.4f}' for r in rs)}")
    a, b = tps.values()
    print(f"ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
