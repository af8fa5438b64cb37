"""Tokenize-stage throughput against two baselines, on the same corpus, in one run.

    python benchmarks/tokenize_throughput.py [--corpus data/corpus] [--tokenizer artifacts/tokenizer/tokenizer.json]

Methods (each in a fresh child process, so peak memory is its own; repetitions interleaved):
- ``stage``: ``palm.data.tokenize.tokenize_corpus``: streams the corpus in batches, encodes on
  all cores, and writes the Megatron ``.bin/.idx`` shards (the baselines only encode).
- ``encode_loop``: a plain single-process ``Tokenizer.encode`` loop over the texts.
- ``datasets_map``: ``datasets.Dataset.map(batched=True, num_proc=N)`` with ``encode_batch``.

Prints tokens/s and peak RSS of each, then the ratios; the last line is ``ratio <stage over the
faster baseline>``. Needs the default pipeline's outputs (``make run``) or the paths given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_method(method: str, corpus: Path, tokenizer: Path, workers: int) -> dict:
    from palm.data.corpus import read_corpus

    if method == "stage":
        import megatron.core.datasets.indexed_dataset  # noqa: F401 - imports are not the work timed
        import torch  # noqa: F401

        from palm.data.tokenize import TokenizeConfig, tokenize_corpus

        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            m = tokenize_corpus(corpus, tokenizer, Path(out), TokenizeConfig(), progress=False)
            seconds = time.perf_counter() - t0
        tokens = m["tokens"]
    elif method == "encode_loop":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        texts = [t for b in read_corpus(corpus, ["text"]) for t in b.column("text").to_pylist()]
        t0 = time.perf_counter()
        tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
        seconds = time.perf_counter() - t0
    elif method == "datasets_map":
        import datasets
        from tokenizers import Tokenizer

        datasets.disable_progress_bars()
        with tempfile.TemporaryDirectory() as cache:
            parts = [str(p) for p in sorted(corpus.glob("part-*.parquet"))]
            ds = datasets.Dataset.from_parquet(parts, cache_dir=cache, columns=["text"])
            tok_path = str(tokenizer)

            def encode(batch, _tok=[]):  # noqa: B006 - one tokenizer per worker process
                if not _tok:
                    _tok.append(Tokenizer.from_file(tok_path))
                return {"ids": [e.ids for e in _tok[0].encode_batch(batch["text"], add_special_tokens=False)]}

            t0 = time.perf_counter()
            out = ds.map(encode, batched=True, batch_size=128, num_proc=workers, remove_columns=["text"])
            tokens = sum(len(x) + 1 for x in out["ids"])
            seconds = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown method {method}")
    return {"tokens": tokens, "seconds": seconds, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "artifacts" / "tokenizer" / "tokenizer.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--copies", type=int, default=2, help="repeat the corpus this many times (a longer, steadier run)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_method(args.child, args.corpus, args.tokenizer, args.workers)))
        return
    if not args.tokenizer.is_file() or not list(args.corpus.glob("part-*.parquet")):
        raise SystemExit(f"error: need a corpus at {args.corpus} and a tokenizer at {args.tokenizer}: run `make run` first")
    tmp = tempfile.TemporaryDirectory()
    if args.copies > 1:  # the same documents K times, as K times as many parts
        parts = sorted(args.corpus.glob("part-*.parquet"))
        for k in range(args.copies):
            for i, part in enumerate(parts):
                os.symlink(part.resolve(), Path(tmp.name) / f"part-{k * len(parts) + i:05d}.parquet")
        args.corpus = Path(tmp.name)
    corpus_mb = sum(p.stat().st_size for p in args.corpus.glob("part-*.parquet")) / 2**20
    methods = ["stage", "encode_loop", "datasets_map"]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for m in methods:  # interleaved: stage, loop, map, stage, loop, map, …
            out = subprocess.run([sys.executable, __file__, "--child", m, "--corpus", str(args.corpus),
                                  "--tokenizer", str(args.tokenizer), "--workers", str(args.workers)],
                                 capture_output=True, text=True, check=True)
            results[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {m:13s} {results[m][-1]['tokens'] / results[m][-1]['seconds']:12,.0f} tokens/s", flush=True)
    print(f"\ncorpus: {corpus_mb:.1f} MB Parquet, {results['stage'][0]['tokens']:,} tokens, {args.workers} workers")
    speed = {}
    for m in methods:
        speed[m] = statistics.median(r["tokens"] / r["seconds"] for r in results[m])
        rss = max(r["max_rss_mb"] for r in results[m])
        print(f"{m:13s} median {speed[m]:12,.0f} tokens/s   peak RSS {rss:7.0f} MB")
    assert len({r["tokens"] for rs in results.values() for r in rs}) == 1, "methods disagree on the token count"
    print(f"stage / encode_loop  = {speed['stage'] / speed['encode_loop']:.2f}")
    print(f"stage / datasets_map = {speed['stage'] / speed['datasets_map']:.2f}")
    print(f"ratio {speed['stage'] / max(speed['encode_loop'], speed['datasets_map']):.3f}")


if __name__ == "__main__":
    main()
