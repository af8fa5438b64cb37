"""Does a ``rule`` term in ``ppo.reward`` raise the rule's own pass rate over SFT's on held-out
prompts (issue 33, acceptance 3)? On the models and data `make run` left (``models/sft``,
``models/reward``, ``data/sft``), copied once at the start (a `dvc repro` meanwhile cannot change
them, and no DVC output is written), each arm runs ``stages.ppo`` in a scratch project (its own
params file, checkpoints and reports, no MLflow) with params.yaml's ``ppo`` section and the arm's
overrides; then SFT and every arm's policy answer the same held-out prompts (the valid split, as
``evaluate`` takes them: :func:`palm.eval.evaluate.held_out_prompts`, cut from the left to leave
``max_new_tokens``), ``--samples`` replies per prompt, batch ``j`` sampled with seed ``seed + j``
for every policy. Each reply is judged by :mod:`palm.data.rules`: ``graded`` (the rule term's
value), and the binary ``names`` and ``signature`` checks. Reported per policy: the mean over
prompts with its standard error (prompts are the units), and for each arm the paired difference
to SFT with its standard error.

    python benchmarks/rule_reward.py                       # the DEFAULT arms
    python benchmarks/rule_reward.py --only model+rule "rule (rloo, 90 it.)" --samples 4
    python benchmarks/rule_reward.py --sft-steps 600 --only "rule (rloo)" "name (rloo)" --samples 4

``--sft-steps N`` first trains a longer SFT from ``models/pretrain`` (params.yaml's ``sft`` section,
``train_steps: N``) in the scratch project; it is then the SFT row and every arm's start.
``--pretrain-steps N`` pretrains anew first (from ``data/tokens``), and SFT starts from that.

A dated JSON record and a Markdown table go to ``benchmarks/records/rule-reward-DATE.*``; the last
line is ``rule_gain_over_se G``: the arm with the largest graded gain over its standard error.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shutil
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

from compare_runs import cpu  # noqa: E402

# each arm: overrides of params.yaml's ppo section for a ppo run, or "export": a policy the default
# chain already trained, evaluated as it is. The probe is off in the runs (gold_interval: 0): it
# does not change training but costs generation time.
ARMS: dict[str, dict[str, Any]] = {
    "model (models/ppo)": {"export": "models/ppo"},  # the default chain's PPO: the reward model alone
    "rule (rloo)": {"reward": [{"name": "rule", "weight": 4.0}], "advantage": "rloo", "samples_per_prompt": 4,
                    "prompts_per_rollout": 4, "gold_interval": 0},
    "model+rule": {"reward": [{"name": "model", "weight": 1.0}, {"name": "rule", "weight": 10.0}], "gold_interval": 0},
    "rule (rloo, 90 it.)": {"reward": [{"name": "rule", "weight": 4.0}], "advantage": "rloo", "samples_per_prompt": 4,
                            "prompts_per_rollout": 4, "gold_interval": 0, "train_steps": 90},
    "model+rule (rloo)": {"reward": [{"name": "model", "weight": 1.0}, {"name": "rule", "weight": 10.0}],
                          "advantage": "rloo", "samples_per_prompt": 4, "prompts_per_rollout": 4, "gold_interval": 0},
    "rule (dr_grpo)": {"reward": [{"name": "rule", "weight": 4.0}], "advantage": "dr_grpo", "whiten": False,
                       "samples_per_prompt": 4, "prompts_per_rollout": 4, "gold_interval": 0},
    # the name half of the rule alone, with more samples per prompt to find the rare reply that names it
    "name (rloo)": {"reward": [{"name": "python:palm.data.rules:name_share", "weight": 4.0}], "advantage": "rloo",
                    "samples_per_prompt": 8, "prompts_per_rollout": 4, "gold_interval": 0, "train_steps": 60},
    "rule (rloo, 8 samples, lr 3e-4)": {
        "reward": [{"name": "rule", "weight": 4.0}], "advantage": "rloo", "samples_per_prompt": 8, "prompts_per_rollout": 4,
        "gold_interval": 0, "train_steps": 40,
        "optim": {"lr": 3e-4, "min_lr": 3e-4, "warmup_steps": 0, "weight_decay": 0.0, "clip_grad": 1.0}},
    # wider and longer: 8 prompts x 8 samples for 120 iterations (7,680 replies, 16x the 30-iteration
    # arms), for a start that writes the whole name now and then (--sft-steps 1500)
    "rule (rloo, 8x8, 120 it.)": {"reward": [{"name": "rule", "weight": 4.0}], "advantage": "rloo",
                                  "samples_per_prompt": 8, "prompts_per_rollout": 8, "gold_interval": 0,
                                  "train_steps": 120},
    "name (rloo, 8x8, 120 it.)": {"reward": [{"name": "python:palm.data.rules:name_share", "weight": 4.0}],
                                  "advantage": "rloo", "samples_per_prompt": 8, "prompts_per_rollout": 8,
                                  "gold_interval": 0, "train_steps": 120},
}
# the same two, with a smaller step and no penalty for a reply cut at max_new_tokens: the name term
# fell on train prompts (0.26 -> 0.17) while the KL grew past 4 nats with the default step
SMALL_STEP = {"no_end_penalty": 0.0, "optim": {"lr": 3e-5, "min_lr": 3e-5, "warmup_steps": 0, "weight_decay": 0.0,
                                               "clip_grad": 1.0}}
ARMS.update({f"{term} (rloo, 8x8, 120 it., lr 3e-5, no end penalty)": {**ARMS[f"{term} (rloo, 8x8, 120 it.)"],
                                                                        **SMALL_STEP} for term in ("name", "rule")})
# what `make bench` runs (about 10 minutes on 2 idle cores); the others by name with --only
DEFAULT = ("model (models/ppo)", "model+rule", "rule (rloo)", "rule (dr_grpo)")
INPUTS = ("models/sft", "models/reward", "data/sft", "models/ppo")
MEASURES = ("graded", "name_share", "param_share", "names", "signature")


def snapshot(scratch: Path, extra: tuple[str, ...] = ()) -> Path:
    base = scratch / "inputs"
    for d in INPUTS + extra:
        shutil.copytree(ROOT / d, base / d)
    return base


def run_stage(work: Path, stage: str, args: list[str], what: str) -> float:
    """``stages.<stage> --no-mlflow ARGS`` in the scratch project ``work``; the seconds it took."""
    t0 = time.time()
    cmd = [sys.executable, "-m", f"stages.{stage}", "--no-mlflow", *args]
    res = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"rule_reward: {what}: {stage} failed:\n{res.stderr[-3000:]}")
    return round(time.time() - t0, 1)


def retrain(base: Path, scratch: Path, params: dict[str, Any], pretrain_steps: int | None,
            sft_steps: int | None) -> dict[str, float]:
    """A new start in a scratch project: ``stages.pretrain`` for ``pretrain_steps`` (when given; else
    the snapshot's ``models/pretrain``), then ``stages.sft`` from it (``sft_steps``, else the
    section's own), params.yaml's sections otherwise. Its export replaces the snapshot's
    ``models/sft``. Returns each stage's seconds."""
    work = scratch / "start"
    (work / "models").mkdir(parents=True)
    for d in ("data", "artifacts"):
        (work / d).symlink_to(base / d)
    mine = copy.deepcopy(params)
    for section, steps in (("pretrain", pretrain_steps), ("sft", sft_steps)):
        if steps:
            mine[section]["train_steps"] = steps
    (work / "params.yaml").write_text(yaml.safe_dump(mine))
    seconds, parent = {}, "models/pretrain"
    runs = [("pretrain", ["--tokens", "data/tokens", "--tokenizer", "artifacts/tokenizer"])] if pretrain_steps else []
    if not pretrain_steps:
        (work / "models" / "pretrain").symlink_to(base / "models" / "pretrain")
    for stage, inputs in runs + [("sft", ["--data", "data/sft", "--parent", parent])]:
        seconds[f"{stage}_seconds"] = run_stage(work, stage, [*inputs, "--checkpoints", f"ckpt/{stage}",
                                                              "--out", f"models/{stage}"], "the new start")
    shutil.rmtree(base / "models" / "sft")
    shutil.copytree(work / "models" / "sft", base / "models" / "sft")
    return seconds


def run_arm(name: str, overrides: dict[str, Any], scratch: Path, params: dict[str, Any], base: Path) -> dict[str, Any]:
    """``stages.ppo`` with the arm's ppo overrides in a scratch project; its export and metrics."""
    work = scratch / "".join(c if c.isalnum() else "_" for c in name)
    work.mkdir(parents=True)
    for d in ("data", "models"):
        (work / d).symlink_to(base / d)
    mine = copy.deepcopy(params)
    mine["ppo"].update(copy.deepcopy(overrides))
    (work / "params.yaml").write_text(yaml.safe_dump(mine))
    ppo_seconds = run_stage(work, "ppo", ["--data", "data/sft", "--policy", "models/sft", "--reward", "models/reward",
                                          "--checkpoints", "ckpt", "--out", "out/ppo"], f"arm {name}")
    metrics = json.loads((work / "reports" / "ppo" / "metrics.json").read_text())
    curve = (work / "reports" / "ppo" / "curve.csv").read_text().splitlines()
    head = curve[0].split(",")
    rows = [dict(zip(head, line.split(","))) for line in curve[1:]]
    # the rule's term (the rule, or the name half as a python term)
    term = next((c for c in head if c == "reward_rule" or c.startswith("reward_palm_data_rules_")), None)
    if term is not None:  # where it started (the first iteration's rollout, the SFT policy) and ended
        metrics["reward_rule_first"], metrics["reward_rule"] = float(rows[0][term]), float(rows[-1][term])
    # the run's course every 10 iterations: does the term rise on train prompts, and what moves with it
    keep = [c for c in head if c in ("step", "kl", "kl_coef", "response_length", "ended", "entropy", term)]
    metrics["course"] = [{c: float(r[c]) for c in keep} for r in rows[::10] + rows[-1:]]
    return {"export": work / "out" / "ppo", "ppo_seconds": ppo_seconds, "metrics": metrics}


def held_out(base: Path, evaluate: dict[str, Any]) -> tuple[list[list[int]], list[str], list[str]]:
    """The valid split's prompts (as ``evaluate`` takes them) as ids, their text with the chat
    markers, and their documented answers."""
    from palm.core.tokenizer import load_tokenizer
    from palm.data.chat import load_sft
    from palm.eval.evaluate import held_out_prompts

    sha = json.loads((base / "models/sft/config.json").read_text())["tokenizer_sha256"]
    tok = load_tokenizer(base / "models/sft/tokenizer.json", sha)
    valid = load_sft(base / "data/sft", "valid", sha).select(["input_ids", "loss_mask"]).to_pylist()
    prompts = held_out_prompts(valid, evaluate["prompts"])
    seq_len = json.loads((base / "models/sft/config.json").read_text())["model"]["seq_len"]
    room = seq_len - evaluate["max_new_tokens"]
    ids = [p["prompt_ids"][-room:] for p in prompts]
    return (ids, [tok.decode(p["prompt_ids"], skip_special_tokens=False) for p in prompts],
            [tok.decode(p["reply_ids"], skip_special_tokens=True) for p in prompts])


def judge_policy(export: Path, prompts: list[list[int]], texts: list[str], answers: list[str], *, samples: int,
                 evaluate: dict[str, Any]) -> dict[str, list[float]]:
    """Each prompt's mean of every measure over its ``samples`` replies (seeded as ``evaluate``)."""
    import torch

    from palm.core.tokenizer import load_tokenizer, special_ids
    from palm.data import rules
    from palm.decode.generate import generate
    from palm.model import parallel
    from palm.model.weights import load_exported

    tok = load_tokenizer(export / "tokenizer.json")
    ids = special_ids(tok)
    rows = [p for p in prompts for _ in range(samples)]  # reply i * samples + j: draw j of prompt i
    t0 = time.time()
    parallel.init_distributed()
    try:
        model, _ = load_exported(export)
        model.eval()
        replies = []
        batch = evaluate["batch_size"]
        with torch.no_grad():
            for j, i in enumerate(range(0, len(rows), batch)):
                g = generate(model, rows[i:i + batch], evaluate["max_new_tokens"], temperature=evaluate["temperature"],
                             top_k=evaluate["top_k"], top_p=evaluate["top_p"], stop_ids=(ids["end_turn_id"], ids["eod_id"]),
                             pad_id=ids["pad_id"], generator=torch.Generator().manual_seed(evaluate["seed"] + j))
                replies += [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(g.response, g.response_mask)]
    finally:
        parallel.teardown()
    t1 = time.time()
    out: dict[str, list[float]] = {m: [] for m in MEASURES}
    for i, (text, answer) in enumerate(zip(texts, answers)):
        mine = replies[i * samples:(i + 1) * samples]
        judged = [rules.judge(text, answer, r) for r in mine]
        out["graded"].append(sum(rules.graded(text, answer, r) or 0.0 for r in mine) / samples)
        parts = [rules.graded_parts(text, answer, r) or (0.0, None) for r in mine]
        out["name_share"].append(sum(n for n, _ in parts) / samples)
        out["param_share"].append(sum(p or 0.0 for _, p in parts) / samples)
        out["names"].append(sum(j["names"] or 0.0 for j in judged) / samples)
        out["signature"].append(sum(j["signature"] or 0.0 for j in judged) / samples)
    out["example"] = replies[:2]  # the first prompt's first replies, to show what the policy writes
    print(f"rule_reward: {export}: {len(rows)} replies sampled in {t1 - t0:.0f} s, judged in {time.time() - t1:.0f} s",
          file=sys.stderr, flush=True)
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(n - 1, 1)
    return m, math.sqrt(var / n)


def summary(per_prompt: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    rows = {}
    sft = per_prompt["sft"]
    for name, got in per_prompt.items():
        row: dict[str, float] = {}
        for m in MEASURES:
            row[m], row[f"{m}_se"] = mean_se(got[m])
            if name != "sft":
                row[f"{m}_gain"], row[f"{m}_gain_se"] = mean_se([a - b for a, b in zip(got[m], sft[m])])
        rows[name] = row
    return rows


def table(rows: dict[str, dict[str, float]], arms: dict[str, dict[str, Any]]) -> str:
    head = ("| policy | ppo.reward | graded (rule term) | gain over SFT ± SE | name share | parameter share | "
            "names pass rate | signature pass rate | PPO KL | reward_rule first → last iteration | PPO s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for name, r in rows.items():
        arm = arms.get(name, {})
        terms = ", ".join(f"{t['name']}×{t['weight']:g}" for t in arm.get("reward", [])) if name != "sft" else "—"
        extra = {k: v for k, v in arm.get("overrides", {}).items() if k not in ("reward", "export", "gold_interval")}
        terms += "".join(f", {k}: {v}" for k, v in extra.items())
        gain = f"{r['graded_gain']:+.4f} ± {r['graded_gain_se']:.4f}" if name != "sft" else "—"
        m = arm.get("metrics", {})
        label = name if name != "sft" or "sft_steps" not in arm else "sft ({}{} steps)".format(
            f"pretrain {arm['pretrain_steps']}, " if "pretrain_steps" in arm else "", arm["sft_steps"])
        body += (f"| {label} | {terms} | {r['graded']:.4f} ± {r['graded_se']:.4f} | {gain} | "
                 f"{r['name_share']:.4f} ± {r['name_share_se']:.4f} | {r['param_share']:.4f} ± {r['param_share_se']:.4f} | "
                 f"{r['names']:.3f} ± {r['names_se']:.3f} | {r['signature']:.3f} ± {r['signature_se']:.3f} | "
                 f"{_num(m.get('kl')):.2f} | {_num(m.get('reward_rule_first')):.3f} → {_num(m.get('reward_rule')):.3f} | "
                 f"{_num(arm.get('ppo_seconds')):.0f} |\n")
    return head + body


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="run these arms (names of ARMS; default: DEFAULT)")
    ap.add_argument("--samples", type=int, default=None, help="replies per prompt (default evaluate.samples_per_prompt)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a record of this benchmark with the same prompts and samples: its per-prompt values of SFT "
                         "and of the export arms are taken instead of sampling them again (the draws are seeded)")
    ap.add_argument("--sft-steps", type=int, default=None,
                    help="train SFT this many steps first; it replaces models/sft as the start")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="pretrain this many steps first (from data/tokens), then SFT from it: the new start")
    ap.add_argument("--record", type=Path, default=None, help="JSON record (default benchmarks/records/rule-reward-DATE.json)")
    args = ap.parse_args(argv)
    fresh = args.sft_steps or args.pretrain_steps  # a new start, trained here
    extra = ("data/tokens", "artifacts/tokenizer") if args.pretrain_steps else ("models/pretrain",) if fresh else ()
    for d in INPUTS + extra:
        if not (ROOT / d).exists():
            raise SystemExit(f"rule_reward: {ROOT / d} not found; run `make run` first")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    evaluate = params["evaluate"]
    samples = args.samples or evaluate["samples_per_prompt"]
    arms = {k: v for k, v in ARMS.items() if (k in DEFAULT if args.only is None else k in args.only)}
    if fresh and any("export" in a for a in arms.values()):
        raise SystemExit(f"rule_reward: a new start: {[k for k, a in arms.items() if 'export' in a]} evaluate the "
                         "default chain's export, trained from the default SFT; leave them out with --only")
    if fresh and args.reuse:
        raise SystemExit("rule_reward: a new start trains a new SFT: its replies cannot be reused; drop --reuse")
    date = datetime.date.today().isoformat()
    suffix = (f"-pretrain{args.pretrain_steps}" if args.pretrain_steps else "") + (
        f"-sft{args.sft_steps}" if args.sft_steps else "")
    record = args.record or ROOT / "benchmarks" / "records" / f"rule-reward{suffix}-{date}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rule-reward-") as scratch:
        base = snapshot(Path(scratch), extra)
        if fresh:
            steps = {k: v for k, v in (("pretrain_steps", args.pretrain_steps),
                                       ("sft_steps", args.sft_steps or params["sft"]["train_steps"])) if v}
            print(f"rule_reward: a new start, {steps}", file=sys.stderr, flush=True)
            info["sft"] = {**steps, **retrain(base, Path(scratch), params, args.pretrain_steps, args.sft_steps)}
        prompts, texts, answers = held_out(base, evaluate)
        print(f"rule_reward: {len(prompts)} held-out prompts x {samples} replies", file=sys.stderr, flush=True)
        reused: dict[str, Any] = {}
        if args.reuse is not None:
            old = json.loads(args.reuse.read_text())
            if (old["prompts"], old["samples_per_prompt"]) != (len(prompts), samples):
                raise SystemExit(f"rule_reward: {args.reuse} has {old['prompts']} prompts x {old['samples_per_prompt']} "
                                 f"replies, this run {len(prompts)} x {samples}; drop --reuse")
            reused = old["per_prompt"]
        per_prompt = {"sft": reused.get("sft") or judge_policy(base / "models/sft", prompts, texts, answers,
                                                                samples=samples, evaluate=evaluate)}
        if args.reuse is not None:  # the reused record's other arms stay in the record, after SFT
            kept = [k for k in old["arms"] if k not in arms and k in reused]
            per_prompt.update({k: reused[k] for k in kept})
            info.update({k: old["arms"][k] for k in kept})
        for name, overrides in arms.items():
            if "export" in overrides:  # trained by the default chain: evaluated as it is
                config = json.loads((base / overrides["export"] / "config.json").read_text())
                ran = {"export": base / overrides["export"], "ppo_seconds": None,
                       "metrics": config.get("metrics", {})}
                reward = config.get("reward", [{"name": "model", "weight": 1.0}])
            else:
                print(f"rule_reward: arm {name}: ppo with {overrides}", file=sys.stderr, flush=True)
                ran = run_arm(name, overrides, Path(scratch), params, base)
                reward = overrides.get("reward", params["ppo"]["reward"])
            info[name] = {"overrides": overrides, "reward": reward, "ppo_seconds": ran["ppo_seconds"],
                          "metrics": {k: ran["metrics"].get(k) for k in ("kl", "reward", "reward_rule", "reward_model",
                                                                         "rule_names", "rule_signature", "initial_reward",
                                                                         "reward_rule_first", "course")}}
            per_prompt[name] = (reused.get(name) if "export" in overrides else None) or judge_policy(
                ran["export"], prompts, texts, answers, samples=samples, evaluate=evaluate)
            rows = summary({k: v for k, v in per_prompt.items()})
            r = rows[name]
            print(f"rule_reward: {name}: graded {r['graded']:.4f} (SFT {rows['sft']['graded']:.4f}, gain "
                  f"{r['graded_gain']:+.4f} ± {r['graded_gain_se']:.4f}), names {r['names']:.3f}, signature "
                  f"{r['signature']:.3f}", file=sys.stderr, flush=True)
            _write(record, date, samples, len(prompts), rows, info, per_prompt)
    rows = summary(per_prompt)
    print(_write(record, date, samples, len(prompts), rows, info, per_prompt))
    best = max((r["graded_gain"] / r["graded_gain_se"] for n, r in rows.items() if n != "sft" and r["graded_gain_se"] > 0),
               default=float("nan"))
    print(f"rule_gain_over_se {best:.2f}")
    return 0


def _write(record: Path, date: str, samples: int, n: int, rows: dict, info: dict, per_prompt: dict) -> str:
    """The JSON record (whole, temp file then rename), after every arm: a run that stops keeps what it measured."""
    md = table(rows, info)
    text = json.dumps({"date": date, "cpu": cpu(), "prompts": n, "samples_per_prompt": samples, "policies": rows,
                       "arms": info, "per_prompt": per_prompt}, indent=2) + "\n"
    tmp = record.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(record)
    return md


if __name__ == "__main__":
    sys.exit(main())
