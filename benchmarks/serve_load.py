"""Load test of ``palm serve`` (issue 35): the real command on 127.0.0.1, the default chat model of
``make run`` (``models/ppo``), driven by the pinned ``openai`` client.

1. baseline: one client sends ``--baseline`` chat requests one after another;
2. load: ``--clients`` concurrent clients (threads, a client each) send ``--requests`` each, one
   after another, all released together;

every request a held-out prompt (the first turns of ``data/sft/valid.parquet``'s conversations,
each client starting at another one), ``max_tokens`` ``--max-tokens``, greedy. Reported per side:
whether every request succeeded, p50/p95 latency, and aggregate completion tokens/s (the
server's ``usage``, over the side's wall time). The load side runs on a server with
continuous batching (the default) and one with ``--batching static``, each with ``--max-batch``
as many rows as clients: what continuous batching buys at the same load; and a third time with
``--gather-steps 0`` (every request joins at the next step, one prompt pass each time). The
servers run at once and the sides take turns for ``--rounds`` rounds (a shared host's speed drifts);
each side's tokens/s is its median round, its latencies those of every round; ratios are
medians of the rounds' ratios.

Writes ``benchmarks/records/serve-load-DATE.json`` (or ``--record``) with the load average (other
work shares the cores). The last line: ``ratio R``, continuous load's tokens/s over the
baseline's: the median over rounds of the two measured in the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"


def held_out_prompts(valid: Path) -> list[list[dict]]:
    """The turns before each held-out conversation's first reply, as chat messages."""
    import pandas as pd

    prompts = []
    for text in pd.read_parquet(valid)["text"]:
        head = text.split("<|assistant|>")[0]
        messages = [{"role": role, "content": content}
                    for role, content in re.findall(r"<\|(system|user)\|>(.*?)<\|end\|>", head, re.S)]
        if messages:
            prompts.append(messages)
    return prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``palm serve`` as a user starts it, in a session of its own; killed with its group on exit."""

    def __init__(self, model: Path, max_batch: int, flags: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        palm = Path(sys.executable).with_name("palm")
        cmd = [str(palm)] if palm.exists() else [sys.executable, "-m", "palm.apps.cli"]
        self.argv = [*cmd, "serve", str(model), "--port", str(self.port), "--name", NAME,
                     "--max-batch", str(max_batch), *flags]
        self.log = log

    def __enter__(self) -> "Server":
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"serve_load: palm serve exited (code {self.proc.returncode}): {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        sys.exit(f"serve_load: palm serve did not answer within 300 s (log: {self.log})")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v1/palm/stats", timeout=10) as reply:
            return json.loads(reply.read())

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ranked = sorted(values)
    return ranked[max(0, min(len(ranked) - 1, int(-(-q * len(ranked) // 100)) - 1))]


def drive(url: str, prompts: list[list[dict]], clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` chat requests one after another; latencies,
    completion tokens and the wall time from the common start to the last reply."""
    import openai

    results: list[tuple[float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        start.wait()
        for i in range(requests):
            messages = prompts[(c * requests + i) % len(prompts)]
            t = time.perf_counter()
            try:
                reply = api.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0)
                with lock:
                    results.append((time.perf_counter() - t, reply.usage.completion_tokens))
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests_per_client": requests, "requests": clients * requests,
            "succeeded": len(results), "all_succeeded": not errors and len(results) == clients * requests,
            "errors": errors[:5], "wall_s": round(wall, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
            "latency_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
            "mean_completion_tokens": round(tokens / max(len(results), 1), 1), "_latencies": latencies}


def steps_summary(before: dict, after: dict) -> dict:
    """Decoding steps between two /v1/palm/stats readings, and the requests a step advanced on average."""
    counts = {int(n): c - before["rows_per_step"].get(n, 0) for n, c in after["rows_per_step"].items()}
    steps = sum(counts.values())
    return {"steps": steps, "prompt_passes": after["prompt_passes"] - before["prompt_passes"],
            "mean_rows_per_step": round(sum(n * c for n, c in counts.items()) / max(steps, 1), 2),
            "max_rows_per_step": max((n for n, c in counts.items() if c), default=0)}


def summary(rounds: list[dict], batching: str) -> dict:
    """One side over its rounds: the median round's tokens/s, latency percentiles over every
    request of every round (weighted alike), all succeeded in every round."""
    ranked = sorted(rounds, key=lambda r: r["tokens_per_s"])
    median = ranked[len(ranked) // 2]
    latencies = [x for r in rounds for x in r.pop("_latencies")]
    return {"batching": batching, "clients": median["clients"], "requests_per_client": median["requests_per_client"],
            "requests": sum(r["requests"] for r in rounds), "succeeded": sum(r["succeeded"] for r in rounds),
            "all_succeeded": all(r["all_succeeded"] for r in rounds),
            "tokens_per_s": median["tokens_per_s"], "tokens_per_s_rounds": [r["tokens_per_s"] for r in rounds],
            "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p95_s": round(percentile(latencies, 95), 3),
            "completion_tokens": median["completion_tokens"], "wall_s": median["wall_s"],
            "mean_completion_tokens": median["mean_completion_tokens"],
            "mean_rows_per_step": median["mean_rows_per_step"], "prompt_passes": median["prompt_passes"]}


def line(name: str, r: dict) -> str:
    return (f"{name}: {r['succeeded']}/{r['requests']} succeeded, p50 {r['latency_p50_s']:.3f} s, "
            f"p95 {r['latency_p95_s']:.3f} s, {r['completion_tokens']} completion tokens in {r['wall_s']:.1f} s: "
            f"{r['tokens_per_s']:.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "ppo")
    p.add_argument("--valid", type=Path, default=ROOT / "data" / "sft" / "valid.parquet")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="per client")
    p.add_argument("--baseline", type=int, default=32, help="requests of the one-client baseline")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="rounds of every side, taking turns")
    p.add_argument("--no-static", action="store_true", help="skip the static-batching comparison")
    p.add_argument("--record", type=Path, help="default: benchmarks/records/serve-load-DATE.json")
    args = p.parse_args(argv)
    for path in (args.model / "config.json", args.valid):
        if not path.is_file():
            sys.exit(f"serve_load: {path} is missing: run `make run` first (it makes models/ppo and data/sft)")
    prompts = held_out_prompts(args.valid)
    load_start = os.getloadavg()
    record: dict = {"benchmark": "serve_load", "date": datetime.date.today().isoformat(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": str(args.model.relative_to(ROOT))
                    if args.model.is_relative_to(ROOT) else str(args.model),
                    "max_tokens": args.max_tokens, "temperature": 0, "held_out_prompts": len(prompts),
                    "max_batch": args.clients, "rounds": args.rounds,
                    "load_average_at_start": [round(x, 2) for x in load_start]}
    logs = Path(tempfile.mkdtemp(prefix="serve-load-"))
    # the servers compared: palm serve's defaults, and the same without gathering joins, and static batching
    kinds = {"continuous": [], "continuous_no_gather": ["--gather-steps", "0"], "static": ["--batching", "static"]}
    if args.no_static:
        kinds = {"continuous": []}
    sides = [("baseline", "continuous", 1, args.baseline)] + [(f"load_{k}", k, args.clients, args.requests) for k in kinds]
    rounds: dict[str, list[dict]] = {name: [] for name, *_ in sides}
    record["servers"] = {k: ["palm", "serve", "MODEL", "--max-batch", str(args.clients), *f] for k, f in kinds.items()}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(Server(args.model, args.clients, f, logs / f"{k}.log"))
                   for k, f in kinds.items()}
        for server in servers.values():
            drive(server.url, prompts, 1, 2, args.max_tokens)  # warm-up: first calls, kernels built
        # the sides take turns, round after round: a shared host's speed drifts over a minute
        for i in range(args.rounds):
            for name, kind, clients, requests in sides:
                before = servers[kind].stats()
                r = drive(servers[kind].url, prompts, clients, requests, args.max_tokens)
                rounds[name].append({**r, **steps_summary(before, servers[kind].stats()),
                                     "load_average": round(os.getloadavg()[0], 2)})
                print(f"round {i + 1}, " + line(f"{name} ({clients} x {requests})", r), flush=True)
    for name, kind, clients, requests in sides:
        record[name] = summary(rounds[name], kind)
        print(line(f"{name}, median of {args.rounds} rounds", record[name]), flush=True)
    def paired(top: str, bottom: str) -> tuple[float, float]:
        """The median over rounds of ``top``'s tokens/s over ``bottom``'s in the same round (the
        host's drift cancels), and the ratio of the two sides' medians."""
        each = sorted(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rounds[top], rounds[bottom]))
        return round(each[len(each) // 2], 2), round(record[top]["tokens_per_s"] / record[bottom]["tokens_per_s"], 2)

    record["ratio"], record["ratio_of_medians"] = paired("load_continuous", "baseline")
    if "load_static" in record:
        record["ratio_static"], record["ratio_static_of_medians"] = paired("load_static", "baseline")
        record["continuous_over_static"], _ = paired("load_continuous", "load_static")
        record["ratio_no_gather"], _ = paired("load_continuous_no_gather", "baseline")
        record["gather_over_no_gather"], _ = paired("load_continuous", "load_continuous_no_gather")
    record["all_succeeded"] = all(record[name]["all_succeeded"] for name, *_ in sides)
    record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    record["rounds_detail"] = rounds
    path = args.record or ROOT / "benchmarks" / "records" / f"serve-load-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")
    print(f"all_succeeded {record['all_succeeded']}")
    if "continuous_over_static" in record:
        print(f"ratio_static {record['ratio_static']}")  # static batching's load over the same baseline
        print(f"continuous_over_static_ratio {record['continuous_over_static']}")
        print(f"gather_over_no_gather_ratio {record['gather_over_no_gather']}")
    print(f"ratio {record['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
