"""lm-evaluation-harness on the exports of ``make run`` (issue 35, part 2): each model is written
as a transformers folder (``palm export hf``), scored by ``lm_eval --model hf`` (a subprocess,
offline) on the ``palm eval-task`` task of ``data/tokens``' valid split, and every choice's
log-likelihood is compared with the project's own (:func:`palm.eval.lm_eval_task.project_loglikelihoods`).

Writes ``benchmarks/records/lm-eval-DATE.json``: per model lm-eval's ``acc``/``acc_norm`` (and
stderr), the true continuation's mean log-likelihood (per item and per token), the largest
log-likelihood difference to the project's, and the seconds of each side. Prints ``max_abs_diff``
last (the largest over the models).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check(model: Path, tokens: Path, work: Path, cfg) -> dict:
    from palm.eval.lm_eval_task import (build_task, harness_command, harness_loglikelihoods, project_loglikelihoods,
                                        read_items)
    from palm.model.hf import export_hf

    task, n = build_task(model, tokens, work / "task", cfg)
    hf = export_hf(model, work / "hf")
    env = {**os.environ, "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", *harness_command(hf, task, cfg.name, work / "results", batch_size=16)],
                         cwd=work, env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"lm_eval failed on {model}:\n{run.stderr[-3000:]}")
    harness_s = time.perf_counter() - started
    [samples] = (work / "results").rglob(f"samples_{cfg.name}_*.jsonl")
    [results] = (work / "results").rglob("results_*.json")
    theirs = harness_loglikelihoods(samples)
    items = read_items(task, cfg.name)
    started = time.perf_counter()
    ours = project_loglikelihoods(model, items)
    project_s = time.perf_counter() - started
    diffs = [abs(a - b) for i in range(n) for a, b in zip(theirs[i]["ll"], ours[i])]
    same_args = all(theirs[i]["args"] == [[it["context"], c] for c in it["choices"]] for i, it in enumerate(items))
    true_ll = [ours[i][it["label"]] for i, it in enumerate(items)]
    r = json.loads(results.read_text())["results"][cfg.name]
    return {"items": n, "choices": cfg.choices, "acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"],
            "acc_norm": r["acc_norm,none"], "acc_norm_stderr": r["acc_norm_stderr,none"],
            "chance": 1 / cfg.choices, "true_ll_mean": sum(true_ll) / n,
            "true_ll_per_token": sum(true_ll) / (n * cfg.target_tokens),
            "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "same_strings": same_args, "lm_eval_s": round(harness_s, 1), "project_s": round(project_s, 1)}


def main(argv: list[str] | None = None) -> int:
    from palm.eval.lm_eval_task import TaskConfig

    d = TaskConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["pretrain", "sft", "ppo"], help="exports under models/")
    p.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--record", type=Path, help="default: benchmarks/records/lm-eval-DATE.json")
    args = p.parse_args(argv)
    missing = [m for m in args.models if not (ROOT / "models" / m / "config.json").is_file()]
    if missing or not (args.tokens / "valid.idx").is_file():
        raise SystemExit(f"lm_eval_check: needs `make run` outputs: models/{', models/'.join(missing) or '…'} and "
                         f"{args.tokens}/valid.{{bin,idx}}")

    import lm_eval

    cfg = TaskConfig(items=args.items)
    runs = {}
    for m in args.models:
        with tempfile.TemporaryDirectory(prefix="palm-lm-eval-") as tmp:
            runs[m] = check(ROOT / "models" / m, args.tokens, Path(tmp), cfg)
        r = runs[m]
        print(f"{m:9} acc {r['acc']:.3f} ± {r['acc_stderr']:.3f}  acc_norm {r['acc_norm']:.3f}  "
              f"true ll {r['true_ll_mean']:.2f} ({r['true_ll_per_token']:.3f}/token)  "
              f"max |diff| {r['max_abs_diff']:.2g}  same strings {r['same_strings']}")
    record = {"date": datetime.date.today().isoformat(), "lm_eval": lm_eval.__version__,
              "task": {**vars(cfg), "tokens": str(args.tokens.relative_to(ROOT) if args.tokens.is_relative_to(ROOT)
                                                   else args.tokens)},
              "cpu_cores": os.cpu_count(), "models": runs}
    path = args.record or ROOT / "benchmarks" / "records" / f"lm-eval-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")
    print(f"max_abs_diff {max(r['max_abs_diff'] for r in runs.values()):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
