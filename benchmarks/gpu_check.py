"""GPU checks, in one prepared run (benchmarks/gpu_check.sh; < 10 minutes on one NVIDIA GPU).

``reference OUT``  (run with CUDA hidden) trains the tiny parity model 3 steps on CPU and saves
                   losses, first-step gradients and final weights.
``compare OUT``    does the same on the GPU (fp32, TF32 off) and compares: loss within 1e-4
                   relative, gradients 1e-3 relative, weights 1e-3 absolute; KV-cached decoding
                   equals full recomputation on the GPU.
``throughput``     bf16 tokens/s and MFU (against a measured bf16 matmul peak) of a ~1B-param
                   PaLM (d=2048, 16 layers, 16 heads of 128, vocab 32768, seq 2048).
Every line that matters starts with PASS, FAIL or RESULT; the exit code is non-zero on FAIL.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm.decode.generate import generate  # noqa: E402
from palm.model import parallel  # noqa: E402
from palm.model.network import ModelConfig, PaLM  # noqa: E402
from palm.train.engine import Engine, OptimConfig, random_batches  # noqa: E402
from palm.train.metrics import matmul_peak_flops  # noqa: E402
from palm.train.pretrain import lm_forward_step  # noqa: E402

TINY = ModelConfig(vocab_size=250, d_model=64, n_layers=4, n_heads=4, head_dim=16, seq_len=32)
OPTIM = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, clip_grad=1.0)
BIG = ModelConfig(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, head_dim=128, seq_len=2048)


def train_tiny() -> dict:
    eng = Engine(TINY, OPTIM, forward_step=lm_forward_step(1e-4), train_steps=3, micro_batch_size=2,
                 num_microbatches=4, seed=7)
    losses, grads = [], {}
    for i, step in enumerate(random_batches(TINY, steps=3, num_microbatches=4, micro_batch_size=2, seed=3)):
        losses.append(eng.train_step(step)["loss"])
        if i == 0:
            grads = {n: p.main_grad.detach().float().cpu().clone() for n, p in eng.named_parameters()}
    weights = {n: p.detach().float().cpu().clone() for n, p in eng.named_parameters()}
    return {"losses": losses, "grads": grads, "weights": weights}


def reference(out: Path) -> None:
    assert not torch.cuda.is_available(), "run the reference with CUDA_VISIBLE_DEVICES="
    parallel.init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(train_tiny(), out / "cpu.pt")
    parallel.teardown()
    print("RESULT cpu reference saved")


def compare(out: Path) -> int:
    assert torch.cuda.is_available(), "no GPU visible"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    parallel.init_distributed()
    cpu, gpu = torch.load(out / "cpu.pt"), train_tiny()
    fails = 0

    def report(ok: bool, what: str) -> None:
        nonlocal fails
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'} {what}")

    for i, (a, b) in enumerate(zip(gpu["losses"], cpu["losses"])):
        report(abs(a - b) <= 1e-4 * abs(b), f"step {i} loss gpu {a:.7f} cpu {b:.7f}")
    g = max(((gpu["grads"][k] - v).norm() / v.norm().clamp(min=1e-30)).item() for k, v in cpu["grads"].items())
    report(g <= 1e-3, f"first-step gradients, worst relative difference {g:.2e}")
    w = max((gpu["weights"][k] - v).abs().max().item() for k, v in cpu["weights"].items())
    report(w <= 1e-3, f"weights after 3 steps, max abs difference {w:.2e}")

    model = PaLM(TINY, seed=7).cuda().eval()
    prompts = [torch.randint(0, TINY.vocab_size, (n,)) for n in (6, 3)]  # left-padded: per-row masks
    cached, uncached = generate(model, prompts, 16), generate(model, prompts, 16, use_cache=False)
    report(torch.equal(cached.tokens, uncached.tokens),
           "KV-cached greedy decoding of a padded batch equals full recomputation on the GPU")
    parallel.teardown()
    return 1 if fails else 0


def throughput(micro_batch: int = 2, steps: int = 6) -> None:
    parallel.init_distributed()
    print(f"RESULT config: {BIG.num_params() / 1e9:.2f}B params, seq {BIG.seq_len}, micro-batch {micro_batch}, "
          f"GPU {torch.cuda.get_device_name()}")
    eng = Engine(BIG, OPTIM, forward_step=lm_forward_step(1e-4), train_steps=100,
                 micro_batch_size=micro_batch, num_microbatches=1, dtype=torch.bfloat16, seed=0)
    batches = random_batches(BIG, steps=steps + 2, num_microbatches=1, micro_batch_size=micro_batch, seed=0)
    for b in batches[:2]:
        eng.train_step(b)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches[2:]:
        eng.train_step(b)
    torch.cuda.synchronize()
    tps = steps * micro_batch * BIG.seq_len / (time.perf_counter() - t)
    peak = matmul_peak_flops(torch.bfloat16, n=8192, device="cuda")
    print(f"RESULT bf16 tokens/s {tps:.0f}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; "
          f"MFU {tps * BIG.flops_per_token() / peak:.1%}; max memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    parallel.teardown()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "reference":
        reference(Path(sys.argv[2]))
    elif cmd == "compare":
        sys.exit(compare(Path(sys.argv[2])))
    elif cmd == "throughput":
        throughput()
    else:
        sys.exit(f"unknown command {cmd!r}")
