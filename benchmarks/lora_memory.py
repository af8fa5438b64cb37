"""LoRA's memory in PPO (issue 33, acceptance 4): the peak RSS of the ``ppo`` stage's worker process
with LoRA (rank 8 on every block linear) against full fine-tuning, at the default model size
(``params.yaml``'s ``model``) and at ``d_model: 1024`` (the other fields the same).

Each configuration runs PPO for real through :func:`palm.train.rlhf.launch` (the stage's own
launcher: one worker process holding the actor, the reference, the critic and the reward model; a
few iterations on a small rollout, then the final checkpoint) in a fresh Python process of its own,
which reads the worker's peak RSS from ``getrusage(RUSAGE_CHILDREN)`` (the largest reaped
descendant: the worker). The inputs: randomly initialised policy and reward exports of each size
(``export_safetensors``, as the sft and reward stages write them) with the project's tokenizer,
and the ``sft_data`` stage's prompts (``data/sft``: ``dvc repro sft_data`` makes them).

Full fine-tuning keeps four copies of the weights plus the actor's and the critic's gradients and
AdamW moments; LoRA keeps two (the actor, whose base is the reference with adapters off, and the
critic, whose frozen base the reward model shares) and the adapters' small state. Run from the project root:
``python benchmarks/lora_memory.py`` (``make bench`` runs it): prints each run's peak and writes the
record ``benchmarks/records/lora-memory-DATE.md`` (or ``--record PATH``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def make_exports(model: Any, tokenizer: Path, out: Path) -> tuple[Path, Path]:
    """A random-init policy (PaLM) and reward model (PaLM + head) export of ``model``'s size."""
    from palm.core.config import to_dict
    from palm.core.tokenizer import sha256_file
    from palm.model import parallel
    from palm.model.network import PaLM
    from palm.model.reward import RewardModel
    from palm.model.weights import export_safetensors

    base = {"model": to_dict(model), "tokenizer_sha256": sha256_file(tokenizer), "step": 0, "format": "palm-rlhf/1"}
    folders = out / "policy", out / "reward"
    with parallel.process_groups():
        export_safetensors(PaLM(model, seed=1), folders[0], {**base, "kind": "sft"})
        export_safetensors(RewardModel(model, seed=2), folders[1],
                           {**base, "kind": "reward", "reward": {"mean": 0.0, "std": 1.0, "sequences": 0}})
    for folder in folders:
        shutil.copy2(tokenizer, folder / "tokenizer.json")
    return folders


def ppo_config(rank: int | None, iterations: int, prompts: int, new_tokens: int) -> Any:
    from palm.model.lora import LoRAConfig
    from palm.train.rlhf.config import PPOConfig

    return PPOConfig(train_steps=iterations, prompts_per_rollout=prompts, micro_batch_size=prompts // 2,
                     max_new_tokens=new_tokens, ppo_epochs=1, gold_interval=0, checkpoint_interval=iterations,
                     samples_logged=0, dtype="fp32", lora=LoRAConfig(rank=rank) if rank else None)


def child(spec: dict[str, Any]) -> None:
    """One configuration, in a process of its own: PPO through the stage's launcher, then the
    worker's peak RSS (its own process's does not count: it only waits)."""
    from palm.core.config import from_dict
    from palm.model.network import ModelConfig
    from palm.train.rlhf import launch

    model = from_dict(ModelConfig, spec["model"], "model")
    cfg = ppo_config(spec["rank"], spec["iterations"], spec["prompts"], spec["new_tokens"])
    scratch = Path(spec["scratch"])
    t0 = time.perf_counter()
    result = launch(model, cfg, data=Path(spec["data"]), policy=Path(spec["policy"]), reward=Path(spec["reward"]),
                    tokenizer_sha256=spec["sha"], checkpoints=scratch / "ckpt", reports=scratch / "reports",
                    run_dir=scratch / "run", dtype="fp32")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    print(json.dumps({"peak_rss_mib": peak_kib / 1024, "seconds": time.perf_counter() - t0,
                      "iterations": result["iterations"], "reward": result.get("reward")}))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"lora_memory: the {spec['label']} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def params_of(model: Any) -> dict[str, int]:
    """Parameters of the whole model and of rank-8-style adapters on it (counted from the model)."""
    from palm.model import lora, parallel
    from palm.model.network import PaLM

    with parallel.process_groups():
        net = PaLM(model)
        total = sum(p.numel() for p in net.parameters())
        lora.apply([net], lora.LoRAConfig(rank=8), seed=0)
        adapters = sum(p.numel() for n, p in net.named_parameters() if lora.is_adapter(n))
    return {"params": total, "adapter_params": adapters}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX512_BF16" if "avx512_bf16" in flags else "AVX2 only" if "avx2" in flags else "?"
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal")) / 2**20
    import torch

    return f"{cpu}, {os.cpu_count()} cores ({isa}), {mem:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "sft", help="the sft_data stage's folder (prompts)")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "artifacts" / "tokenizer" / "tokenizer.json")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="its model section is the default size")
    p.add_argument("--sizes", default="default,1024", help="comma-separated: default and/or d_model values")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout (mini-batch: half of them)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--record", type=Path, help="the markdown record (default: benchmarks/records/lora-memory-DATE.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    from palm.core.config import from_dict, read_params, to_dict
    from palm.core.tokenizer import sha256_file
    from palm.data.chat import read_chat_meta
    from palm.model.network import ModelConfig

    if not (args.data / "meta.json").is_file() or not args.tokenizer.is_file():
        raise SystemExit(f"lora_memory: {args.data} or {args.tokenizer} missing; run `dvc repro sft_data` first")
    sha = sha256_file(args.tokenizer)
    if read_chat_meta(args.data, "sft_data")["tokenizer_sha256"] != sha:
        raise SystemExit(f"lora_memory: {args.data} was made with another tokenizer than {args.tokenizer}")
    default = from_dict(ModelConfig, read_params(args.params)["model"], "model")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        for size in args.sizes.split(","):
            model = default if size == "default" else dataclasses.replace(default, d_model=int(size))
            exports = make_exports(model, args.tokenizer, Path(tmp) / f"d{model.d_model}")
            row = {"d_model": model.d_model, **params_of(model)}
            for label, rank in (("full", None), ("lora", args.rank)):
                scratch = Path(tmp) / f"d{model.d_model}-{label}"
                spec = {"label": f"d_model {model.d_model} {label}", "model": to_dict(model), "rank": rank,
                        "iterations": args.iterations, "prompts": args.prompts, "new_tokens": args.new_tokens,
                        "data": str(args.data), "policy": str(exports[0]), "reward": str(exports[1]), "sha": sha,
                        "scratch": str(scratch)}
                row[label] = measure(spec)
                shutil.rmtree(scratch, ignore_errors=True)  # checkpoints of a full run are GBs at d 1024
                print(f"d_model {model.d_model:5d} {label:4s}: peak RSS {row[label]['peak_rss_mib']:8.0f} MiB "
                      f"({row[label]['seconds']:.0f} s)", flush=True)
            row["ratio"] = row["lora"]["peak_rss_mib"] / row["full"]["peak_rss_mib"]
            print(f"d_model {model.d_model:5d} ratio lora/full: {row['ratio']:.3f}", flush=True)
            rows.append(row)
    path = args.record or ROOT / "benchmarks" / "records" / f"lora-memory-{datetime.date.today().isoformat()}.md"
    path.write_text(record(rows, args, default))
    print(f"wrote {path}")
    print(f"ratio {rows[-1]['ratio']:.3f}")  # LoRA / full at the last size (d_model 1024 by default)
    return 0


def record(rows: list[dict[str, Any]], args: argparse.Namespace, default: Any) -> str:
    date = datetime.date.today().isoformat()
    table = ["| d_model | params | adapter params (rank {r}) | full FT peak RSS | LoRA peak RSS | LoRA / full |"
             .format(r=args.rank), "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['d_model']} | {r['params'] / 1e6:.1f} M | {r['adapter_params'] / 1e6:.2f} M | "
                     f"{r['full']['peak_rss_mib']:.0f} MiB | {r['lora']['peak_rss_mib']:.0f} MiB | {r['ratio']:.2f} |")
    return "\n".join([
        f"# LoRA memory in PPO ({date})", "",
        f"Machine: {machine()}.", "",
        "What ran: `python benchmarks/lora_memory.py` (issue 33, acceptance 4). For each size, randomly "
        "initialised policy and reward exports, then PPO through `palm.train.rlhf.launch` (the ppo stage's "
        f"launcher; one worker process, fp32, advantage gae, so actor, reference, critic and reward model "
        f"are all resident): {args.iterations} iterations of {args.prompts} prompts from the default "
        f"`data/sft` x {args.new_tokens} new tokens, one PPO epoch in mini-batches of {args.prompts // 2}, "
        "then the final checkpoint. Full fine-tuning (`lora: null`) against `lora: {rank: "
        f"{args.rank}, alpha: 16}}` on all six block linears. Each configuration in a fresh process; the "
        "number is the worker's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`). Model: params.yaml's "
        f"`model` ({default.n_layers} layers, {default.n_heads} heads of {default.head_dim}, vocab "
        f"{default.vocab_size}, seq_len {default.seq_len}) at its d_model {default.d_model} and at 1024.", "",
        *table, "",
        "With LoRA the reference is the actor with its adapters off (no second policy), the reward model "
        "shares the critic's frozen base (both are the reward export), and only the adapters (and the "
        "critic's head) have gradients and AdamW moments: two copies of the weights instead of four, "
        "plus their optimizer state. Both columns include the same fixed cost: Python, torch and "
        "megatron-core, the data, and decoding (the decode plan's measurement and each rollout's fused "
        "weight copies, about one more copy of the blocks). At the default size that fixed cost "
        "dominates, so the ratio is closer to 1; the acceptance bound (<= 0.6) is for d_model 1024.",
        "",
        "Raw numbers:", "", "```json", json.dumps(rows, indent=2), "```", ""])


if __name__ == "__main__":
    sys.exit(main())
