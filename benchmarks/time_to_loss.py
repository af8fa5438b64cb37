"""Time to a target held-out loss: today's pretraining recipe against params.yaml's, in one run.

Every recipe trains the default model on the default token shards (``data/tokens``, from `make
run`) in this one process, from the same seed, interleaved: each recipe takes ``--eval-every``
steps in turn, so drift of the host's speed hits all alike. Only the training steps are timed;
every ``--eval-every`` steps (and at each recipe's end) each recipe is validated, untimed, on the
same held-out sequences (``--eval-seqs`` of ``seq_len`` tokens from the valid split).

The target is today's recipe's final held-out loss in this run (``--target`` overrides it). A
recipe's time to target is its training time up to the first validation at or below the target
(between validations the time is interpolated linearly on the loss; a recipe that never gets
there has none). Reported per recipe: time and tokens to target and their ratios to today's,
the final loss, and today's loss at the recipe's training time ("equal time"). A dated JSON record
and a loss-against-time plot go to ``benchmarks/records/``.

``--recipe NAME=BASE:key=value,...`` adds a recipe: ``BASE`` (``today`` or ``new``) with dotted
overrides of its pretrain section (``optim.lr=0.01``, ``train_steps=200``), for a table of levers.

The last line is ``time_ratio R``: params.yaml's recipe's time to target over today's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_runs import cpu, override, save_figure  # noqa: E402

from palm.core.config import from_dict, read_params  # noqa: E402
from palm.core.process import default_threads, flush_denormals  # noqa: E402
from palm.model import parallel  # noqa: E402
from palm.model.network import ModelConfig  # noqa: E402
from palm.train import data  # noqa: E402
from palm.train.engine import Engine  # noqa: E402
from palm.train.metrics import dtype_name, resolve_dtype  # noqa: E402
from palm.train.pretrain import PretrainConfig, lm_forward_step, load_batches, shards_sha256  # noqa: E402

ISA_ENV = ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")

# The recipe params.yaml's pretrain section had until the muon recipe became the default
# (AdamW, cosine decay, 400 steps of 6 x 256 tokens): selectable by setting these fields back.
TODAY: dict[str, Any] = {
    "train_steps": 400, "micro_batch_size": 6, "num_microbatches": 1, "z_loss_weight": 1e-4,
    "optim": {"name": "adamw", "schedule": "cosine", "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20,
              "weight_decay": 0.1, "clip_grad": 1.0},
}


class Run:
    """One recipe: its engine, data, timing and validation curve."""

    def __init__(self, name: str, section: dict[str, Any], model: ModelConfig, tokens: Path, meta: dict,
                 data_sha: str, cache: Path, dtype: torch.dtype):
        self.name, self.section = name, section
        self.cfg = from_dict(PretrainConfig, section, "pretrain")
        # the pretrain stage's own batches of this recipe (its validation ones go unused here)
        self.batches, _ = load_batches(tokens, model, self.cfg, meta["tokenizer_sha256"], data_sha, cache,
                                       dp_rank=0, dp_size=1)
        self.engine = Engine(model, self.cfg.optim, forward_step=lm_forward_step(self.cfg.z_loss_weight),
                             train_steps=self.cfg.train_steps, micro_batch_size=self.cfg.micro_batch_size,
                             num_microbatches=self.cfg.num_microbatches, dtype=dtype, seed=self.cfg.seed)
        self.tokens_per_step = self.cfg.global_batch * model.seq_len
        self.step, self.seconds = 0, 0.0
        self.curve: list[dict[str, float]] = []  # {step, seconds, tokens, val_loss}

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.train_steps

    def train(self, steps: int) -> None:
        for _ in range(min(steps, self.cfg.train_steps - self.step)):
            batch = self.batches.step(self.step)
            t0 = time.perf_counter()
            stats = self.engine.train_step(batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            self.step += 1
            if not math.isfinite(stats["loss"]):
                raise SystemExit(f"time_to_loss: recipe {self.name} diverged at step {self.step} "
                                 f"(loss {stats['loss']}); lower its optim.lr")

    def validate(self, valid: list) -> None:
        loss = self.engine.evaluate(valid, step=lm_forward_step(0.0))["loss"]  # the nll alone
        self.curve.append({"step": self.step, "seconds": self.seconds,
                           "tokens": self.step * self.tokens_per_step, "val_loss": loss})

    def to_target(self, target: float) -> tuple[float, float]:
        """(seconds, tokens) at the first crossing of ``target`` (interpolated), or (nan, nan)."""
        prev = None
        for point in self.curve:
            if point["val_loss"] <= target:
                if prev is None or prev["val_loss"] == point["val_loss"]:
                    return point["seconds"], point["tokens"]
                f = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
                return (prev["seconds"] + f * (point["seconds"] - prev["seconds"]),
                        prev["tokens"] + f * (point["tokens"] - prev["tokens"]))
            prev = point
        return math.nan, math.nan

    def loss_at(self, seconds: float) -> float:
        """Validation loss at ``seconds`` of training, interpolated on the curve (nan past its end)."""
        points = self.curve
        for a, b in zip(points, points[1:]):
            if a["seconds"] <= seconds <= b["seconds"]:
                f = (seconds - a["seconds"]) / max(b["seconds"] - a["seconds"], 1e-12)
                return a["val_loss"] + f * (b["val_loss"] - a["val_loss"])
        return math.nan


def machine() -> dict[str, Any]:
    return {"cpu": cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            # kernels held to an instruction set (e.g. AVX2 on a newer CPU) say so here
            "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}


def plot(runs: list[Run], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.plot([p["seconds"] for p in r.curve], [p["val_loss"] for p in r.curve], marker=".", label=r.name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.5))
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, default=ROOT / "data" / "tokens")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=BASE:key=value,...")
    ap.add_argument("--model", default="", metavar="key=value,...",
                    help="model overrides, e.g. a GPU-sized d_model=768,n_layers=12,n_heads=12")
    ap.add_argument("--only", action="store_true", help="run only the --recipe ones besides today's")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-seqs", type=int, default=96)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--dtype", default=None, help="auto | bf16 | fp32 (default: params.yaml's pretrain.dtype)")
    ap.add_argument("--record", type=Path, default=None, help="JSON record (default benchmarks/records/time-to-loss-DATE.json)")
    args = ap.parse_args(argv)

    flush_denormals()
    torch.set_num_threads(default_threads())
    params = read_params(args.params)
    model = from_dict(ModelConfig, override(params["model"], args.model), "model")
    new = params["pretrain"]
    dtype = resolve_dtype(args.dtype or new.get("dtype", "auto"))
    if not (args.tokens / "meta.json").is_file():
        raise SystemExit(f"time_to_loss: no token shards at {args.tokens}; run `make run` (or dvc repro tokenize) first")
    meta = data.check_shards(args.tokens)
    data_sha = shards_sha256(args.tokens)
    recipes = {"today": {**new, **copy.deepcopy(TODAY), "optim": {**new.get("optim", {}), **TODAY["optim"]}}}
    if not args.only:
        recipes["new"] = new
    for spec in args.recipe:
        name, _, rest = spec.partition("=")
        base, _, assignments = rest.partition(":")
        if base not in ("today", "new"):
            raise SystemExit(f"time_to_loss: --recipe {spec!r}: base must be today or new")
        recipes[name] = override(recipes["today"] if base == "today" else new, assignments)

    with tempfile.TemporaryDirectory() as tmp, parallel.process_groups():
        cache = Path(tmp)
        _, valid_ds = data.build_datasets(args.tokens, meta, seq_len=model.seq_len, train_samples=1,
                                          valid_samples=args.eval_seqs, seed=1234, cache_dir=cache / "valid")
        valid = data.Batches(valid_ds, micro_batch_size=8, num_microbatches=math.ceil(args.eval_seqs / 8),
                             dp_rank=0, dp_size=1).step(0)
        runs = [Run(name, section, model, args.tokens, meta, data_sha, cache, dtype)
                for name, section in recipes.items()]
        print(f"time_to_loss: {len(runs)} recipes, dtype {dtype_name(dtype)}, "
              f"{torch.get_num_threads()} threads, eval every {args.eval_every} steps on "
              f"{len(valid) * 8} held-out sequences", flush=True)
        for r in runs:
            r.validate(valid)
        while not all(r.done for r in runs):
            for r in runs:
                if not r.done:
                    r.train(args.eval_every)
                    r.validate(valid)
                    print(f"  {r.name:>20} step {r.step:4d}  {r.seconds:7.1f} s  val {r.curve[-1]['val_loss']:.4f}",
                          flush=True)

    today = runs[0]
    target = args.target if args.target is not None else today.curve[-1]["val_loss"]
    t_today, n_today = today.to_target(target)
    rows = []
    for r in runs:
        t, n = r.to_target(target)
        equal = min(r.seconds, today.seconds)  # both recipes have trained this long
        rows.append({"recipe": r.name, "pretrain": r.section, "steps": r.cfg.train_steps,
                     "train_seconds": r.seconds, "final_val_loss": r.curve[-1]["val_loss"],
                     "seconds_to_target": t, "tokens_to_target": n,
                     "time_ratio": t / t_today, "tokens_ratio": n / n_today,
                     "equal_time_s": equal, "loss_at_equal_time": r.loss_at(equal),
                     "today_loss_at_equal_time": today.loss_at(equal), "curve": r.curve})
    print(f"\ntarget held-out loss {target:.4f} (today's final)" if args.target is None else f"\ntarget {target:.4f}")
    print(f"{'recipe':>20} {'steps':>6} {'train s':>8} {'final':>7} {'s→target':>9} {'time×':>6} "
          f"{'tokens×':>7} {'=t s':>6} {'loss@=t':>8} {'today@=t':>9}")
    for row in rows:
        print(f"{row['recipe']:>20} {row['steps']:6d} {row['train_seconds']:8.1f} {row['final_val_loss']:7.4f} "
              f"{row['seconds_to_target']:9.1f} {row['time_ratio']:6.3f} {row['tokens_ratio']:7.3f} "
              f"{row['equal_time_s']:6.1f} {row['loss_at_equal_time']:8.4f} {row['today_loss_at_equal_time']:9.4f}")
    date = datetime.date.today().isoformat()
    record = args.record or ROOT / "benchmarks" / "records" / f"time-to-loss-{date}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": "time_to_loss", "date": date, "machine": machine(), "dtype": dtype_name(dtype),
            "model": dataclasses.asdict(model), "params": model.num_params(), "eval_every": args.eval_every, "eval_seqs": len(valid) * 8,
            "target": target, "recipes": rows}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(record)
    plot(runs, target, record.with_suffix(".png"))
    print(f"record: {record} (+ .png)")
    ratio = next((row["time_ratio"] for row in rows if row["recipe"] == "new"), math.nan)
    print(f"time_ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
