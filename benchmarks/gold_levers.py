"""What moves PPO against SFT on the gold judge: a table of levers, each a full ppo stage run and
an evaluation, on the models and data `make run` left (``models/sft``, ``models/reward``,
``data/sft``, ``data/prefs``, ``data/tokens``).

A lever is ``NAME=section.key=value,...``: dotted overrides of params.yaml's ``ppo`` (or
``evaluate``) section; a lever that overrides ``dpo.*`` trains the ``dpo`` stage instead and is
judged the same way (its rows read "PPO" as "the lever's policy"). The inputs are copied once at the start (a `dvc repro` meanwhile cannot
change them). Each lever runs ``stages.ppo`` in a scratch project (its own params file,
checkpoints and reports, no MLflow), then the
``evaluate`` library on the same held-out prompts with params.yaml's evaluate settings. Reported
per lever: the gold score of PPO and SFT and their difference with its standard error (prompts
are the units), the gold win rate, F1, names, the proxy win rate and the KL; a lever "beats SFT"
when the gold difference exceeds 2 standard errors.

    python benchmarks/gold_levers.py                       # params.yaml's ppo, plus the default levers
    python benchmarks/gold_levers.py --lever kl=ppo.kl.coef=0.3 --only kl

A dated JSON record and a Markdown table go to ``benchmarks/records/gold-levers-DATE.*``. The last
line is ``best_gold_gain_over_se G``: the largest gold difference over its standard error.
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
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_runs import cpu, override  # noqa: E402

LEVERS = {  # the default table
    "as-is": "",
    "no-end-penalty-0": "ppo.no_end_penalty=0.0",
    "kl-0.3": "ppo.kl.coef=0.3,ppo.kl.target=0.3",
    "10-iterations": "ppo.train_steps=10",
    "no-end-0-kl-0.3": "ppo.no_end_penalty=0.0,ppo.kl.coef=0.3,ppo.kl.target=0.3",
    "grpo-4": "ppo.advantage=grpo,ppo.samples_per_prompt=4,ppo.prompts_per_rollout=4",
    "best-gold": "ppo.select=best_gold",
    "dpo-beta-0.1": "dpo.beta=0.1",
    "dpo-beta-0.5": "dpo.beta=0.5",
}
INPUTS = ("models/pretrain", "models/sft", "models/reward", "models/gold_reward", "models/ppo", "data/sft", "data/prefs",
          "data/tokens")


def snapshot(scratch: Path) -> Path:
    """A copy of the inputs, so that a `dvc repro` while the levers run cannot change them."""
    import shutil

    base = scratch / "inputs"
    for d in INPUTS:
        shutil.copytree(ROOT / d, base / d)
    return base


def run_lever(name: str, spec: str, scratch: Path, params: dict[str, Any], base: Path) -> dict[str, Any]:
    from palm.core.config import from_dict
    from palm.eval.evaluate import EvaluateConfig, evaluate, policy_view

    work = scratch / name
    work.mkdir(parents=True)
    for d in ("data", "models"):
        (work / d).symlink_to(base / d)
    mine = override(params, spec)
    (work / "params.yaml").write_text(yaml.safe_dump(mine))
    t0 = time.time()
    policy = "dpo" if any(a.split("=")[0].startswith("dpo.") for a in spec.split(",") if a) else "ppo"
    cmd = ([sys.executable, "-m", "stages.ppo", "--no-mlflow", "--data", "data/sft", "--policy", "models/sft",
            "--reward", "models/reward", "--checkpoints", "ckpt", "--out", "out/ppo"] if policy == "ppo" else
           [sys.executable, "-m", "stages.dpo", "--no-mlflow", "--data", "data/prefs", "--parent", "models/sft",
            "--checkpoints", "ckpt", "--out", "out/dpo"])
    res = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"gold_levers: lever {name}: {policy} failed:\n{res.stderr[-3000:]}")
    ppo_seconds = time.time() - t0
    ppo_metrics = json.loads((work / "reports" / policy / "metrics.json").read_text())
    cfg = from_dict(EvaluateConfig, mine["evaluate"], "evaluate")
    ev = evaluate(cfg, models={"pretrain": base / "models/pretrain", "sft": base / "models/sft",
                               "ppo": work / "out/ppo" if policy == "ppo" else base / "models/ppo",
                               **({"dpo": work / "out/dpo"} if policy == "dpo" else {}),
                               "reward": base / "models/reward", "gold_reward": base / "models/gold_reward"},
                  sft_data=base / "data/sft", prefs=base / "data/prefs", tokens=base / "data/tokens")
    m = policy_view(ev.metrics, policy)  # the lever's policy under PPO's names
    keys = [k for k in m if k.startswith("gold_")] + ["win_rate", "win_rate_se", "kl", "length_ppo", "length_sft",
                                                       "reward_ppo", "reward_sft", "prompts", "eval_set"]
    row = {"lever": name, "policy": policy, "overrides": spec, "ppo_seconds": round(ppo_seconds, 1),
           **{k: m[k] for k in keys if k in m}, **{k: m[k] for k in ("dpo_pref_accuracy",) if k in m},
           "probe_gold_best_iteration": ppo_metrics.get("gold_best_iteration"),
           "probe_gold_warnings": ppo_metrics.get("gold_warnings")}
    se = row.get("gold_score_gain_se") or float("nan")
    row["gold_gain_over_se"] = row["gold_score_gain"] / se if se == se and se > 0 else None
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| lever | gold score PPO / SFT | gold gain ± SE | gain / SE | gold win rate | F1 PPO / SFT | "
            "names PPO / SFT | proxy win rate | KL | PPO s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['lever']} (`{r['overrides'] or 'as is'}`) | {r['gold_score_ppo']:.4f} / {r['gold_score_sft']:.4f} | "
        f"{r['gold_score_gain']:+.4f} ± {r.get('gold_score_gain_se', float('nan')):.4f} | "
        f"{(r['gold_gain_over_se'] or float('nan')):+.1f} | {r['gold_win_rate']:.3f} ± {r.get('gold_win_rate_se', float('nan')):.3f} | "
        f"{r['gold_f1_ppo']:.3f} / {r['gold_f1_sft']:.3f} | {r.get('gold_names_ppo', float('nan')):.3f} / "
        f"{r.get('gold_names_sft', float('nan')):.3f} | {r['win_rate']:.3f} | {r['kl']:.2f} | {r['ppo_seconds']:.0f} |\n"
        for r in rows)
    return head + body


def write(record: Path, date: str, rows: list[dict[str, Any]]) -> str:
    """The JSON record and its Markdown table, each written whole (temp file, then rename)."""
    md = table(rows)
    for path, text in ((record, json.dumps({"date": date, "cpu": cpu(), "levers": rows}, indent=2) + "\n"),
                       (record.with_suffix(".md"),
                        f"# Gold levers, {date}\n\n{cpu()}; `python benchmarks/gold_levers.py`.\n\n{md}")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lever", action="append", default=[], help="NAME=section.key=value,... (repeatable)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these levers (names)")
    ap.add_argument("--record", type=Path, default=None, help="JSON record (default benchmarks/records/gold-levers-DATE.json)")
    args = ap.parse_args(argv)
    for d in INPUTS:
        if not (ROOT / d).exists():
            raise SystemExit(f"gold_levers: {ROOT / d} not found; run `make run` first")
    levers = dict(LEVERS)
    for item in args.lever:
        name, _, spec = item.partition("=")
        levers[name] = spec
    if args.only is not None:
        levers = {k: v for k, v in levers.items() if k in args.only}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    date = datetime.date.today().isoformat()
    record = args.record or ROOT / "benchmarks" / "records" / f"gold-levers-{date}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gold-levers-") as scratch:
        base = snapshot(Path(scratch))
        for name, spec in levers.items():
            print(f"gold_levers: {name} ({spec or 'params.yaml as is'})", file=sys.stderr, flush=True)
            rows.append(run_lever(name, spec, Path(scratch), params, base))
            r = rows[-1]
            print(f"gold_levers: {name}: gold gain {r['gold_score_gain']:+.4f} ± {r.get('gold_score_gain_se', 0):.4f}, "
                  f"proxy win rate {r['win_rate']:.3f}, KL {r['kl']:.2f}", file=sys.stderr, flush=True)
            write(record, date, rows)  # after every lever: a long run that stops keeps what it measured
    md = write(record, date, rows)
    print(md)
    best = max((r["gold_gain_over_se"] for r in rows if r["gold_gain_over_se"] is not None), default=float("nan"))
    print(f"best_gold_gain_over_se {best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
