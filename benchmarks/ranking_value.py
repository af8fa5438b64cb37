"""What a ranking is worth: held-out reward accuracy against the number of rankings, for prompts
picked at random versus by ``palm feedback sample --select uncertain``, with the gold rule judge
as the labeler (``palm feedback simulate``).

On the default data (``data/sft``, ``models/sft``, ``models/reward`` from `make run`), in one process:

1. Candidates: the train split's prompts of ``data/sft`` with their reference answers, shuffled
   (seed 0); the first ``--candidates`` get ``--k`` replies each from ``models/sft`` (the sampling
   of ``palm feedback sample``), and ``models/reward`` scores them: each candidate's spread
   (``palm/apps/feedback/sample.py``: :func:`reward_scores`, :func:`spread`).
2. Held-out pairs: the valid split's prompts get K replies the same way; every two replies of a
   prompt whose gold scores (:func:`palm.data.rules.judge`) differ make a pair, the better one
   chosen; ties are left out.
3. For every seed ``s``, number of rankings ``n`` and arm: a pool of ``--pool-factor`` x ``n``
   candidates drawn at random (seed ``s``); the ``random`` arm ranks its first ``n``, the
   ``uncertain`` arm the ``n`` the reward model separates least (:func:`least_separated`, what
   ``--select uncertain`` keeps of its ``--pool``). The gold labeler ranks them
   (:func:`palm.apps.feedback.simulate.judgement`, ``--noise``, seed ``s``) into a rankings file,
   which the prefs stage's reader turns into pairs (:func:`palm.data.chat.build_chat_data`,
   ``format: rankings``; every split of it trains here: the held-out pairs are other prompts').
   A reward model starts from ``models/sft`` and trains ``--steps`` steps on them with the reward
   stage's objective and batches (:mod:`palm.train.reward`; params.yaml's ``reward`` section,
   seed ``s``). Its held-out accuracy: the share of held-out pairs it orders as the gold rule does.

Both arms of a seed share the labeler's noise seed, the head's initialisation and the batch order
seed. Also measured on the same pairs: the fresh head on ``models/sft`` (no training, per seed)
and ``models/reward`` (the pipeline's, trained on the default automatic pairs). A dated JSON
record and a plot (accuracy against rankings, both arms, ± one standard error over seeds) go to
``benchmarks/records/ranking-value-DATE.{json,png}``. The last line is ``uncertain_minus_random
D`` at the largest ``n``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_runs import cpu, save_figure  # noqa: E402

from palm.apps.feedback.sample import (  # noqa: E402
    SampleSettings,
    batch_items,
    least_separated,
    model_identity,
    reward_scores,
    sample_replies,
    split_prompts,
    spread,
)
from palm.apps.feedback.simulate import gold_scores, judgement  # noqa: E402
from palm.apps.feedback.store import RankingsFile  # noqa: E402
from palm.core.config import from_dict, read_params  # noqa: E402
from palm.core.errors import UserError  # noqa: E402
from palm.core.process import default_threads, flush_denormals  # noqa: E402
from palm.data.chat import ChatDataConfig, ChatTemplate, build_chat_data  # noqa: E402
from palm.decode.generate import SamplingConfig  # noqa: E402
from palm.eval.evaluate import scores  # noqa: E402
from palm.model import parallel  # noqa: E402
from palm.model.export import load_model, load_tokenizer, read_export, same_tokenizer  # noqa: E402
from palm.model.reward import HEAD, RewardModel  # noqa: E402
from palm.train.engine import Engine  # noqa: E402
from palm.train.finetune import load_parent  # noqa: E402
from palm.train.metrics import dtype_name, resolve_dtype  # noqa: E402
from palm.train.reward import COLUMNS, Pairs, RewardConfig, pair_length, read_rows, reward_forward_step  # noqa: E402

ARMS = ("random", "uncertain")


class Replies:
    """Prompts with their reference answers and K sampled replies each, as batch items, and
    every reply's token ids as the prefs stage writes them (prompt + reply)."""

    def __init__(self, name: str, prompts: list, references: list[str], replies: list[list[str]], sampling: dict,
                 model: dict, tokenizer: Any, seq_len: int):
        self.items = batch_items(name, prompts, replies, model, sampling, references)
        self.prompts, self.replies = prompts, replies
        template = ChatTemplate(tokenizer)
        self.seqs = [[(template.render_prompt(p) + template.render_reply(r))[-seq_len:] for r in rs]
                     for p, rs in zip(prompts, replies)]
        self.gold = [gold_scores(item) for item in self.items]

    def gold_pairs(self) -> list[tuple[int, int, int]]:
        """``(prompt, better, worse)``: every two replies of a prompt whose gold scores differ."""
        return [(p, a, b) if g[a] > g[b] else (p, b, a) for p, g in enumerate(self.gold)
                for a in range(len(g)) for b in range(a + 1, len(g)) if g[a] != g[b]]


def sample(export: Any, tokenizer: Any, pairs: list, k: int, max_new_tokens: int, seed: int) -> list[list[str]]:
    with parallel.process_groups():
        model = load_model(export)
        return sample_replies(model, tokenizer, [p for p, _ in pairs], SamplingConfig(1.0),
                              SampleSettings(k=k, max_new_tokens=max_new_tokens, seed=seed), progress=None)


def accuracy(model: Any, held: Replies, pairs: list[tuple[int, int, int]], batch_size: int = 32) -> float:
    """Share of the held-out pairs ``model`` (a whole RewardModel) scores strictly in gold order."""
    flat = [s for seqs in held.seqs for s in seqs]
    with torch.no_grad():
        r = scores(model, flat, batch_size).tolist()
    k = len(held.seqs[0])
    return sum(r[p * k + a] > r[p * k + b] for p, a, b in pairs) / len(pairs)


def rank_into_pairs(items: list[dict], noise: float, seed: int, tokenizer_dir: Path, seq_len: int, sha: str,
                    tmp: Path) -> tuple[list[dict], dict[str, int]]:
    """The gold labeler's rankings of ``items`` through the prefs stage's reader: the pair rows."""
    tmp.mkdir(parents=True)
    rankings = RankingsFile(tmp / "rankings.jsonl")
    tied = 0
    for item in items:
        record = judgement(item, "gold", noise, seed)
        tied += len(record["order"]) < len(item["replies"])
        rankings.append(record)
    out = tmp / "prefs"
    out.mkdir()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its note that few pairs are held out: all train here
            m = build_chat_data("prefs", ChatDataConfig(path=str(rankings.path), format="rankings", seed=seed),
                                corpus=tmp, tokenizer=tokenizer_dir, seq_len=seq_len, out=out)
    except UserError:  # every ranking all ties: no pair
        return [], {"pairs": 0, "rankings_with_ties": tied}
    rows = [r for f in sorted(out.glob("*.parquet")) for r in read_rows(out, f.stem, sha, COLUMNS)]  # every split
    return rows, {"pairs": m["kept"], "rankings_with_ties": tied}


def fresh(model_cfg: Any, sft: Path, cfg: RewardConfig, dtype: torch.dtype, optim: bool) -> Engine:
    engine = Engine(model_cfg, cfg.optim if optim else None, forward_step=reward_forward_step(cfg.margin),
                    chunk=RewardModel, train_steps=cfg.train_steps, micro_batch_size=cfg.micro_batch_size,
                    num_microbatches=cfg.num_microbatches, dtype=dtype, seed=cfg.seed)
    load_parent(engine, sft, new=[HEAD])  # the head starts from its seeded init, as in the reward stage
    return engine


def train(rows: list[dict], model_cfg: Any, sft: Path, cfg: RewardConfig, dtype: torch.dtype) -> Any:
    engine = fresh(model_cfg, sft, cfg, dtype, optim=True)
    batches = Pairs(rows, cfg, pair_length(rows, model_cfg.seq_len), dp_rank=0, dp_size=1)
    for step in range(cfg.train_steps):
        engine.train_step(batches.step(step))
    return engine.chunks[0].eval()


def summary(runs: list[dict], counts: list[int]) -> list[dict]:
    out = []
    for n in counts:
        row: dict[str, Any] = {"rankings": n}
        by_seed = {}
        for arm in ARMS:
            mine = [r for r in runs if r["arm"] == arm and r["rankings"] == n]
            by_seed[arm] = {r["seed"]: r["accuracy"] for r in mine}
            row[arm] = mean_se([r["accuracy"] for r in mine])
            row[f"{arm}_pairs"] = sum(r["pairs"] for r in mine) / len(mine)
            row[f"{arm}_gold_spread"] = sum(r["mean_gold_spread"] for r in mine) / len(mine)
        diff = [by_seed["uncertain"][s] - by_seed["random"][s] for s in by_seed["random"]]
        row["uncertain_minus_random"] = mean_se(diff)  # paired by seed
        out.append(row)
    return out


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson's r (nan when either side is constant)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def mean_se(xs: list[float]) -> dict[str, float]:
    mean = sum(xs) / len(xs)
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else math.nan
    return {"mean": mean, "se": se, "n": len(xs)}


def plot(rows: list[dict], baselines: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r["rankings"] for r in rows]
    for arm, shift in zip(ARMS, (0.97, 1.03)):
        ax.errorbar([x * shift for x in xs], [r[arm]["mean"] for r in rows],
                    yerr=[0 if math.isnan(r[arm]["se"]) else r[arm]["se"] for r in rows], marker="o", capsize=3,
                    label=f"{arm} prompts")
    for (name, value), style in zip(baselines.items(), (":", "--")):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=f"{name} {value:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("rankings (prompts ranked, K replies each)")
    ax.set_ylabel("held-out reward accuracy (gold order)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-data", type=Path, default=ROOT / "data" / "sft")
    ap.add_argument("--sft", type=Path, default=ROOT / "models" / "sft")
    ap.add_argument("--reward", type=Path, default=ROOT / "models" / "reward")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--counts", default="8,16,32,64,128", help="numbers of rankings, comma-separated")
    ap.add_argument("--k", type=int, default=4, help="replies per prompt")
    ap.add_argument("--pool-factor", type=int, default=4,
                    help="uncertain: candidates per kept prompt (--pool / --limit)")
    ap.add_argument("--candidates", type=int, default=0,
                    help="train prompts sampled and scored once (0: --pool-factor x the largest count)")
    ap.add_argument("--held-out", type=int, default=0, help="valid-split prompts (0: all)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="reward training steps per run")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="the gold labeler's noise (palm feedback simulate --noise)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--record", type=Path, default=None,
                    help="JSON record (default benchmarks/records/ranking-value-DATE.json; the plot beside it)")
    args = ap.parse_args(argv)
    counts = sorted(int(c) for c in args.counts.split(","))
    t0 = time.perf_counter()

    flush_denormals()
    torch.set_num_threads(default_threads())
    for path in (args.sft_data / "meta.json", args.sft / "config.json", args.reward / "config.json"):
        if not path.is_file():
            raise SystemExit(f"ranking_value: {path} missing; run `make run` first")
    sft, reward = read_export(args.sft, ("sft", "ppo", "pretrain")), read_export(args.reward, ("reward",))
    same_tokenizer([sft, reward])
    tokenizer, sha, model_cfg = load_tokenizer(sft), sft.tokenizer_sha256, sft.model
    base = read_params(args.params)["reward"]
    dtype = resolve_dtype(base.get("dtype", "auto"))
    sampling = {"temperature": 1.0, "top_k": None, "top_p": None, "max_new_tokens": args.max_new_tokens, "k": args.k}
    ident = model_identity(args.sft, sft)

    train_prompts = split_prompts(args.sft_data, tokenizer, sha, 0)
    random.Random(0).shuffle(train_prompts)
    candidates = train_prompts[:args.candidates or args.pool_factor * counts[-1]]
    if len(candidates) < args.pool_factor * counts[-1]:
        raise SystemExit(f"ranking_value: {len(candidates)} candidates, {args.pool_factor} x {counts[-1]} needed; "
                         "raise --candidates or lower --counts")
    held_prompts = split_prompts(args.sft_data, tokenizer, sha, args.held_out, split="valid")
    print(f"ranking_value: {len(candidates)} candidate and {len(held_prompts)} held-out prompts x {args.k} replies "
          f"from {args.sft}; counts {counts}, {args.seeds} seeds, {args.steps} steps, dtype {dtype_name(dtype)}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def replies_of(name: str, pairs: list, seed: int) -> Replies:
        got = sample(sft, tokenizer, pairs, args.k, args.max_new_tokens, seed)
        return Replies(name, [p for p, _ in pairs], [r for _, r in pairs], got, {**sampling, "seed": seed}, ident,
                       tokenizer, model_cfg.seq_len)

    pool = replies_of("candidates", candidates, 0)
    held = replies_of("held-out", held_prompts, 10_000)
    held_pairs = held.gold_pairs()
    if not held_pairs:
        raise SystemExit("ranking_value: the gold rule ties every two held-out replies; raise --held-out or --k")
    ties = sum(len(g) * (len(g) - 1) // 2 for g in held.gold) - len(held_pairs)
    with parallel.process_groups():
        spreads_of = reward_scores(load_model(reward), tokenizer, pool.prompts, pool.replies, reward.config["reward"],
                                   progress=None)
        reward_acc = accuracy(load_model(reward), held, held_pairs)
    sample_s = time.perf_counter() - t0
    gold_spread = [spread(g) for g in pool.gold]  # how far apart the gold rule puts a candidate's replies
    reward_spread = [spread(r) for r in spreads_of]
    agreement = correlation(reward_spread, gold_spread)
    print(f"  held-out pairs {len(held_pairs)} ({ties} tied left out); models/reward accuracy {reward_acc:.3f}; "
          f"sampling and scoring {sample_s:.0f} s; candidates' reward vs gold spread: correlation {agreement:.3f}",
          flush=True)

    runs: list[dict] = []
    fresh_acc = []
    with tempfile.TemporaryDirectory() as tmp, parallel.process_groups():
        for seed in range(args.seeds):
            cfg = from_dict(RewardConfig, {**base, "train_steps": args.steps, "seed": seed}, "reward")
            fresh_acc.append(accuracy(fresh(model_cfg, args.sft, cfg, dtype, optim=False).chunks[0], held, held_pairs))
            for n in counts:
                drawn = random.Random(seed).sample(range(len(candidates)), args.pool_factor * n)
                picks = {"random": drawn[:n],
                         "uncertain": [drawn[i] for i in least_separated([spreads_of[j] for j in drawn], n)]}
                for arm in ARMS:
                    t = time.perf_counter()
                    items = [pool.items[i] for i in picks[arm]]
                    rows, seen = rank_into_pairs(items, args.noise, seed, args.sft, model_cfg.seq_len, sha,
                                                 Path(tmp) / f"{seed}-{n}-{arm}")
                    acc = accuracy(train(rows, model_cfg, args.sft, cfg, dtype), held, held_pairs) if rows \
                        else fresh_acc[-1]
                    spread_mean = sum(reward_spread[i] for i in picks[arm]) / n
                    gold_mean = sum(gold_spread[i] for i in picks[arm]) / n
                    runs.append({"seed": seed, "rankings": n, "arm": arm, "accuracy": acc, **seen,
                                 "mean_spread": spread_mean, "mean_gold_spread": gold_mean,
                                 "seconds": time.perf_counter() - t})
                    print(f"  seed {seed} n {n:4d} {arm:>9}: {seen['pairs']:4d} pairs, spread {spread_mean:.3f} "
                          f"(gold {gold_mean:.3f}), accuracy {acc:.3f} ({runs[-1]['seconds']:.0f} s)", flush=True)

    rows = summary(runs, counts)
    baselines = {"fresh head on models/sft": sum(fresh_acc) / len(fresh_acc),
                 "models/reward (default pairs)": reward_acc}
    print(f"\n{'rankings':>8} {'random':>15} {'uncertain':>15} {'uncertain-random':>17} {'pairs r/u':>11} "
          f"{'gold spread r/u':>15}")
    for r in rows:
        f = lambda m: f"{m['mean']:.3f} ± {m['se']:.3f}"  # noqa: E731
        print(f"{r['rankings']:8d} {f(r['random']):>15} {f(r['uncertain']):>15} {f(r['uncertain_minus_random']):>17} "
              f"{r['random_pairs']:5.0f}/{r['uncertain_pairs']:<5.0f} "
              f"{r['random_gold_spread']:7.3f}/{r['uncertain_gold_spread']:<7.3f}")
    for name, value in baselines.items():
        print(f"{name}: {value:.3f}")
    date = datetime.date.today().isoformat()
    record = args.record or ROOT / "benchmarks" / "records" / f"ranking-value-{date}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": "ranking_value", "date": date,
            "machine": {"cpu": cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "dtype": dtype_name(dtype), "models": {"sft": ident, "reward": model_identity(args.reward, reward)},
            "settings": {k: v for k, v in vars(args).items() if k not in ("record",)} | {"counts": counts},
            "reward_config": {**base, "train_steps": args.steps},
            "candidates": len(candidates), "held_out_prompts": len(held_prompts), "held_out_pairs": len(held_pairs),
            "held_out_ties_left_out": ties, "baselines": baselines,
            "candidates_reward_vs_gold_spread_correlation": agreement, "summary": rows, "runs": runs,
            "seconds": {"sampling_and_scoring": sample_s, "total": time.perf_counter() - t0}}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=str) + "\n")
    tmp.replace(record)
    plot(rows, baselines, record.with_suffix(".png"))
    print(f"record: {record} (+ .png), {body['seconds']['total']:.0f} s")
    print(f"uncertain_minus_random {rows[-1]['uncertain_minus_random']['mean']:.4f}")


if __name__ == "__main__":
    main()
