"""Data stages at scale: the ``scrape`` and ``tokenize`` stages on a synthetic corpus of 1×, 4× and
16× ``--base-mb`` MiB of text (64 MiB: 1 GiB at 16×), this working tree's code ("new") against
today's implementation at commit ``8d8385f`` ("baseline") in the same run.

The corpus (``benchmarks/synthetic_corpus.py``) is JSONL files of realistic documents with exact
and near duplicates planted at known rates and at known 5-word-shingle Jaccard similarities
(exact, ≈ 0.95, ≥ 0.9), and distractor pairs at ≈ 0.5 and ≈ 0.3 that must be kept. It is made
once per seed and size and cached (``--cache``, default ``~/.cache/palm-rlhf/data-scaling``).

Each side runs from a code root of its own in a scratch folder (``--work``, default a temporary
folder, removed at the end unless ``--keep``): the baseline's is ``git archive 8d8385f``, the new
side's a copy of this working tree's ``palm/``, ``stages/``, ``params.yaml`` and ``pyproject.toml``
(tracked and untracked, not ignored files), each with ``.venv`` linked to this one's. So the stages'
``reports/`` and MLflow runs (``MLFLOW_TRACKING_URI``: a SQLite file in the scratch folder) never land
in the repository. A stage runs as its DVC command does, from its code root:

    python -m stages.scrape --raw R --out C --params P
    python -m stages.tokenize --corpus C --tokenizer T --out K --params P

where ``P`` is the side's own ``params.yaml`` with the ``scrape`` section set to ``source: files``,
``files_path: <corpus>``, ``workers: --workers`` and the unit of parallel work: ``tasks:
--tasks`` and ``executor: local`` where the side's ``ScrapeConfig`` has a ``tasks`` field (the
datatrove rewrite), else ``shards: --tasks``; ``--new-set``/``--baseline-set KEY=VALUE`` (YAML
values, dotted keys for nested ones) override any scrape key. The tokenizer is one byte-level BPE
trained once (``palm.core.tokenizer.train_tokenizer``, params.yaml's ``tokenizer`` section) on the
1× corpus's first documents, the same for both sides.

Measured per side and size: wall seconds of each stage, documents in and kept, documents/s,
tokens/s (``meta.json`` of the token shards over the tokenize stage's wall time), the peak RSS of
every process of each stage (the process tree polled with psutil every ``--poll`` s: the largest
per-process peak, the sum of the peaks, the heaviest processes; cross-checked by the largest
reaped descendant's ``ru_maxrss``), and dedup precision and recall against the planted duplicates
(a planted exact or Jaccard ≥ 0.9 copy that is dropped is a true positive; any other dropped
document is a false positive; distractors' drop rate is reported apart). The baseline is slow and
its memory grows with the corpus: it runs at 1× and 4× only unless ``--baseline-sizes`` says more.

Output: one table per side, new/baseline ratios at each size, a dated JSON record
(``benchmarks/records/data-scaling-DATE.json``, or ``--record``), and last these lines (new side):

    rss_ratio_16x_4x R          worst stage's largest per-process peak RSS, 16× over 4×
    throughput_ratio_16x_4x R   scrape+tokenize documents per CPU-second (per core), 16× over 4×
    dedup_recall R              at 16×, planted exact and Jaccard >= 0.9 copies
    dedup_precision R

(with ``--sizes`` lacking 16 or 4, the largest size and the one a quarter of it stand in, and a
line before says so). Run from the project root: ``python benchmarks/data_scaling.py``; a quick
check of the harness: ``python benchmarks/data_scaling.py --base-mb 2 --sizes 1,4 --record /tmp/ds.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import synthetic_corpus as sc  # noqa: E402

BASELINE_COMMIT = "8d8385f"
CODE_PATHS = ("palm", "stages", "params.yaml", "pyproject.toml")
MIB = 2**20
# Runs a stage as its child and writes the largest reaped descendant's peak RSS (KiB) to argv[1].
_WRAP = ("import resource,subprocess,sys;rc=subprocess.call(sys.argv[2:]);r=resource.getrusage(resource.RUSAGE_CHILDREN);"
         "open(sys.argv[1],'w').write(f'{r.ru_maxrss} {r.ru_utime + r.ru_stime}');sys.exit(rc)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- metrics


def dedup_metrics(input_urls: Iterable[str], kept_urls: Iterable[str], manifest: list[dict]) -> dict[str, Any]:
    """Precision and recall of the dropped documents against the planted duplicates (exact and
    Jaccard >= 0.9 copies); distractors' and originals' drops apart. NaN where undefined."""
    inputs, kept = set(input_urls), set(kept_urls)
    dropped = inputs - kept
    positives = {r["url"] for r in manifest if r["kind"] in sc.DUPLICATE_KINDS and r["jaccard"] >= 0.9}
    by_kind: dict[str, set[str]] = {}
    for r in manifest:
        by_kind.setdefault(r["kind"], set()).add(r["url"])
    distractors = set().union(*(by_kind.get(k, set()) for k in sc.DISTRACTOR_KINDS))
    planted = set().union(*by_kind.values()) if by_kind else set()
    tp = len(dropped & positives)
    nan = float("nan")
    return {
        "documents_in": len(inputs),
        "kept": len(kept & inputs),
        "dropped": len(dropped),
        "planted_duplicates": len(positives),
        "true_positives": tp,
        "false_positives": len(dropped) - tp,
        "recall": tp / len(positives) if positives else nan,
        "precision": tp / len(dropped) if dropped else nan,
        "recall_by_kind": {k: len(dropped & by_kind[k]) / len(by_kind[k])
                           for k in sc.DUPLICATE_KINDS if by_kind.get(k)},
        "distractors": len(distractors),
        "distractor_drop_rate": len(dropped & distractors) / len(distractors) if distractors else nan,
        "distractor_drop_rate_by_kind": {k: len(dropped & by_kind[k]) / len(by_kind[k])
                                         for k in sc.DISTRACTOR_KINDS if by_kind.get(k)},
        "originals_dropped": len(dropped - planted),
        "unknown_kept": len(kept - inputs),  # kept URLs that were never put in: a harness or stage bug
    }


def per_core(docs: int, seconds: float, cores: int) -> float:
    """Documents per second per core."""
    return docs / seconds / cores if seconds > 0 and cores > 0 else float("nan")


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def summary_lines(new_runs: dict[int, dict], big: int = 16, small: int = 4) -> tuple[list[str], str | None]:
    """The machine-readable lines from the new side's runs by size multiple; sizes ``big`` and
    ``small`` when run, else the largest and a quarter of it (named in the note)."""
    note = None
    ok = {m: r for m, r in new_runs.items() if r.get("ok")}
    if big not in ok or small not in ok:
        cands = [m for m in sorted(ok, reverse=True) if m % 4 == 0 and m // 4 in ok]
        if cands:
            big, small = cands[0], cands[0] // 4
            note = f"note: sizes {big}x and {small}x stand in for 16x and 4x"
        else:
            note = "note: no pair of sizes 4x apart finished: the ratios are nan"
    b, s = ok.get(big), ok.get(small)
    rss = max((ratio(b["stages"][st]["peak_max_mib"], s["stages"][st]["peak_max_mib"])
               for st in ("scrape", "tokenize")), default=float("nan")) if b and s else float("nan")
    thr = ratio(b["docs_per_cpu_s"], s["docs_per_cpu_s"]) if b and s else float("nan")
    at = b if b else (ok[max(ok)] if ok else {})
    d = at.get("dedup", {})
    lines = [f"rss_ratio_16x_4x {rss:.4f}", f"throughput_ratio_16x_4x {thr:.4f}",
             f"dedup_recall {d.get('recall', float('nan')):.4f}", f"dedup_precision {d.get('precision', float('nan')):.4f}"]
    return lines, note


# ----------------------------------------------------------------------------- code roots and params


def git(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, **kw)


def snapshot_tree(dst: Path) -> str:
    """Copy this working tree's code (tracked and untracked, not ignored) into ``dst``."""
    files = git("ls-files", "-co", "--exclude-standard", "-z", "--", *CODE_PATHS).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    head = git("rev-parse", "HEAD").stdout.decode().strip()
    dirty = git("status", "--porcelain", "--", *CODE_PATHS).stdout.decode().strip()
    return head + ("-dirty" if dirty else "")


def archive_tree(commit: str, dst: Path) -> str:
    """Today's implementation: ``git archive <commit>`` of the code paths into ``dst``."""
    full = git("rev-parse", commit).stdout.decode().strip()
    arch = git("archive", "--format=tar", full, "--", *CODE_PATHS).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=arch, check=True)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return full


def scrape_fields(code_root: Path, env: dict) -> list[str] | None:
    """The fields of the code root's ``ScrapeConfig`` (None when it cannot be imported)."""
    probe = ("import dataclasses,json;from palm.data.scrape import ScrapeConfig;"
             "print(json.dumps([f.name for f in dataclasses.fields(ScrapeConfig)]))")
    p = subprocess.run([sys.executable, "-c", probe], cwd=code_root, env=env, capture_output=True, text=True)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    except (ValueError, IndexError):
        return None


def parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--*-set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def scrape_section(base: dict, corpus_docs: Path, style: str, tasks: int, workers: int,
                   overrides: dict[str, Any]) -> dict:
    """The side's ``scrape`` section for the files source; ``style`` is ``tasks`` or ``shards``."""
    s = copy.deepcopy(base)
    s.update(source="files", files_path=str(corpus_docs), workers=workers)
    if style == "tasks":
        s.pop("shards", None)
        s.update(tasks=tasks, executor="local")
    else:
        s.pop("tasks", None)
        s.pop("executor", None)
        s["shards"] = tasks
    for key, value in overrides.items():
        node = s
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return s


class Side:
    """One implementation: its code root, params style and overrides."""

    def __init__(self, name: str, root: Path, version: str, style: str, overrides: dict[str, Any],
                 owned: bool = True):
        self.name, self.root, self.version, self.style, self.overrides = name, root, version, style, overrides
        self.owned = owned  # a code root this benchmark made (not --new-root)

    def params(self, corpus_docs: Path, out: Path, tasks: int, workers: int) -> Path:
        import yaml

        p = yaml.safe_load((self.root / "params.yaml").read_text())
        p["scrape"] = scrape_section(p.get("scrape") or {}, corpus_docs, self.style, tasks, workers, self.overrides)
        out.write_text(yaml.safe_dump(p, sort_keys=False))
        return out


# ----------------------------------------------------------------------------- running a stage


def _label(p: Any) -> str:
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours
        cmd = []
    joined = " ".join(cmd)
    if "spawn_main" in joined or "forkserver" in joined:
        return "multiprocessing worker"
    if "resource_tracker" in joined:
        return "multiprocessing resource_tracker"
    if "-m" in cmd[:-1]:
        return "python -m " + cmd[cmd.index("-m") + 1]
    try:
        return p.name() if not cmd else (Path(cmd[0]).name + " " + " ".join(Path(c).name for c in cmd[1:3]))[:80]
    except Exception:  # noqa: BLE001
        return "?"


def run_monitored(cmd: list[str], cwd: Path, env: dict, log_path: Path, poll: float) -> dict[str, Any]:
    """Run ``cmd``; poll its process tree's RSS every ``poll`` s. Wall time, exit code and peaks."""
    import psutil

    rusage_file = log_path.with_suffix(".maxrss")
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-c", _WRAP, str(rusage_file), *cmd], cwd=cwd, env=env,
                                stdout=logf, stderr=subprocess.STDOUT)
        wrapper = psutil.Process(proc.pid)
        peaks: dict[tuple[int, float], list] = {}
        while proc.poll() is None:
            try:
                procs = wrapper.children(recursive=True)
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    key = (p.pid, p.create_time())
                except psutil.Error:
                    continue
                entry = peaks.get(key)
                if entry is None:
                    peaks[key] = [rss, _label(p)]
                elif rss > entry[0]:
                    entry[0] = rss
            time.sleep(poll)
    wall = time.perf_counter() - t0
    try:  # the stage's and every descendant's it waited for (its pool workers): max RSS, CPU seconds
        maxrss, cpu = rusage_file.read_text().split()
        rusage_mib, cpu_s = int(maxrss) / 1024, float(cpu)
    except (OSError, ValueError):
        rusage_mib = cpu_s = float("nan")
    ranked = sorted(peaks.values(), key=lambda e: -e[0])
    return {
        "rc": proc.returncode, "seconds": round(wall, 3),
        "peak_max_mib": round(ranked[0][0] / MIB, 1) if ranked else float("nan"),
        "peak_sum_mib": round(sum(e[0] for e in ranked) / MIB, 1),
        "processes": len(ranked),
        "top": [[label, round(rss / MIB, 1)] for rss, label in ranked[:4]],
        "every_process": [[label, round(rss / MIB, 1)] for rss, label in ranked],  # peak RSS, MiB
        "rusage_max_mib": round(rusage_mib, 1),
        "cpu_seconds": round(cpu_s, 2),
        "log": str(log_path),
    }


def kept_urls(corpus: Path) -> list[str]:
    import pyarrow.parquet as pq

    parts = sorted(p for p in corpus.rglob("*.parquet") if not any(x.startswith(".") for x in p.relative_to(corpus).parts))
    return [u for p in parts for u in pq.read_table(p, columns=["url"]).column("url").to_pylist()]


def run_side(side: Side, mult: int, corpus: Path, info: dict, manifest: list[dict], tokenizer: Path,
             work: Path, env: dict, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = work / f"{side.name}-{mult}x"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    params = side.params(corpus / "docs", run_dir / "params.yaml", args.tasks, args.workers)
    raw, out, tokens = run_dir / "raw", run_dir / "corpus", run_dir / "tokens"
    result: dict[str, Any] = {"side": side.name, "mult": mult, "mib": round(info["text_bytes"] / MIB, 1),
                              "documents_in": info["documents"], "ok": False, "stages": {}}
    cmds = {
        "scrape": ["-m", "stages.scrape", "--raw", str(raw), "--out", str(out), "--params", str(params)],
        "tokenize": ["-m", "stages.tokenize", "--corpus", str(out), "--tokenizer", str(tokenizer),
                     "--out", str(tokens), "--params", str(params)],
    }
    if side.owned:  # a crashed earlier run's resumable work folder (the datatrove scrape) must not be reused
        shutil.rmtree(side.root / ".work", ignore_errors=True)
    for stage, cmd in cmds.items():
        log(f"{mult}x {side.name}: {stage} ...")
        r = run_monitored([sys.executable, *cmd], side.root, env, run_dir / f"{stage}.log", args.poll)
        result["stages"][stage] = r
        log(f"{mult}x {side.name}: {stage} {r['seconds']:.1f} s, exit {r['rc']}, peak RSS {r['peak_max_mib']:.0f} MiB "
            f"(sum of {r['processes']} processes' peaks {r['peak_sum_mib']:.0f} MiB)")
        if r["rc"] != 0:
            tail = Path(r["log"]).read_text(errors="replace").splitlines()[-15:]
            log(f"{mult}x {side.name}: {stage} FAILED; log tail:\n    " + "\n    ".join(tail))
            return result
    docs_in = info["documents"]
    dd = dedup_metrics(sc.all_urls(info), kept_urls(out), manifest)
    meta = json.loads((tokens / "meta.json").read_text())
    n_tokens = int(sum(meta["tokens"].values()))
    stats_path = out / "stats.json"
    drops = json.loads(stats_path.read_text()).get("dropped", {}) if stats_path.is_file() else {}
    s_sec, t_sec = result["stages"]["scrape"]["seconds"], result["stages"]["tokenize"]["seconds"]
    cores = max(1, min(args.workers or os.cpu_count() or 1, os.cpu_count() or 1))
    result.update(
        ok=True, kept=dd["kept"], tokens=n_tokens, cores=cores, drops=drops, dedup=dd,
        scrape_docs_per_s=round(docs_in / s_sec, 1),
        tokenize_docs_per_s=round(dd["kept"] / t_sec, 1),
        tokens_per_s=round(n_tokens / t_sec, 1),
        docs_per_s=round(docs_in / (s_sec + t_sec), 1),
        docs_per_s_per_core=round(per_core(docs_in, s_sec + t_sec, cores), 2),
        # per core, by CPU time (user + sys of both stages' processes): what other load on the host
        # does to the wall clock (it drifts 40 %, and other jobs run) does not enter it
        cpu_seconds=round(result["stages"]["scrape"]["cpu_seconds"] + result["stages"]["tokenize"]["cpu_seconds"], 2),
        docs_per_cpu_s=round(docs_in / max(1e-9, result["stages"]["scrape"]["cpu_seconds"]
                                           + result["stages"]["tokenize"]["cpu_seconds"]), 2),
        mib_per_s=round(info["text_bytes"] / MIB / (s_sec + t_sec), 3),
    )
    quality = {k: v for k, v in drops.items() if "duplicate" not in k and v}
    log(f"{mult}x {side.name}: kept {dd['kept']}/{docs_in}, {result['docs_per_s']:.0f} docs/s, "
        f"{result['tokens_per_s']:.0f} tokens/s; dedup recall {dd['recall']:.4f} "
        f"({', '.join(f'{k} {v:.3f}' for k, v in dd['recall_by_kind'].items())}) precision {dd['precision']:.4f}, "
        f"distractors dropped {dd['distractor_drop_rate']:.4f}" + (f"; NON-DEDUP DROPS {quality}" if quality else ""))
    if not args.keep:
        for d in (raw, out, tokens):
            shutil.rmtree(d, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- tokenizer, machine, report


def make_tokenizer(corpus: Path, cache: Path, n_docs: int) -> Path:
    """One BPE for both sides, trained on the first ``n_docs`` documents of ``corpus`` (cached)."""
    import yaml

    from palm.core.tokenizer import TokenizerConfig, train_tokenizer

    section = yaml.safe_load((ROOT / "params.yaml").read_text()).get("tokenizer") or {}
    cfg = TokenizerConfig(**section)
    path = cache / f"tokenizer-{corpus.name}-{n_docs}d-{cfg.vocab_size}v.json"
    if path.is_file():
        return path

    def texts():
        n = 0
        for f in sorted((corpus / "docs").glob("*.jsonl")):
            with open(f) as fh:
                for line in fh:
                    yield json.loads(line)["text"]
                    n += 1
                    if n >= n_docs:
                        return

    t0 = time.perf_counter()
    tok = train_tokenizer(texts(), cfg, length=n_docs, progress=False)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    log(f"tokenizer: {tok.get_vocab_size()} tokens, trained on {n_docs} docs in {time.perf_counter() - t0:.1f} s")
    return path


def machine() -> dict[str, Any]:
    import numpy
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "numpy": numpy.__version__, "psutil": psutil.__version__,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _no_nan(v: Any) -> Any:
    """NaN as null (JSON has no NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


def fmt(v: Any, spec: str = ".1f") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_tables(results: list[dict], sides: list[str], mults: list[int]) -> None:
    head = (f"{'size':>5} {'MiB':>7} {'docs in':>8} {'kept':>8} {'scrape s':>9} {'tok s':>7} {'docs/s':>8} "
            f"{'/core':>7} {'tokens/s':>9} {'RSS scrape':>10} {'RSS tok':>8} {'sum scr':>8} {'recall':>7} "
            f"{'prec':>7} {'distr':>6}  heaviest scrape processes (MiB)")
    for side in sides:
        print(f"\n{side}:")
        print(head)
        for r in (r for r in results if r["side"] == side):
            st = r["stages"]
            sc_, tk = st.get("scrape", {}), st.get("tokenize", {})
            dd = r.get("dedup", {})
            print(f"{str(r['mult']) + 'x':>5} {r['mib']:>7.1f} {r['documents_in']:>8} {r.get('kept', 0):>8} "
                  f"{fmt(sc_.get('seconds')):>9} {fmt(tk.get('seconds')):>7} {fmt(r.get('docs_per_s')):>8} "
                  f"{fmt(r.get('docs_per_s_per_core')):>7} {fmt(r.get('tokens_per_s'), '.0f'):>9} "
                  f"{fmt(sc_.get('peak_max_mib'), '.0f'):>10} {fmt(tk.get('peak_max_mib'), '.0f'):>8} "
                  f"{fmt(sc_.get('peak_sum_mib'), '.0f'):>8} {fmt(dd.get('recall'), '.4f'):>7} "
                  f"{fmt(dd.get('precision'), '.4f'):>7} {fmt(dd.get('distractor_drop_rate'), '.3f'):>6}  "
                  + ", ".join(f"{l} {m:.0f}" for l, m in sc_.get("top", [])[:3])
                  + ("" if r["ok"] else "  FAILED"))


def side_ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """new / baseline at each size both ran at."""
    by = {(r["side"], r["mult"]): r for r in results if r["ok"]}
    out = {}
    for (side, m), new in sorted(by.items()):
        base = by.get(("baseline", m))
        if side != "new" or base is None:
            continue
        out[f"{m}x"] = {
            "docs_per_s": ratio(new["docs_per_s"], base["docs_per_s"]),
            "scrape_docs_per_s": ratio(new["scrape_docs_per_s"], base["scrape_docs_per_s"]),
            "tokens_per_s": ratio(new["tokens_per_s"], base["tokens_per_s"]),
            "peak_rss_scrape": ratio(new["stages"]["scrape"]["peak_max_mib"], base["stages"]["scrape"]["peak_max_mib"]),
            "peak_rss_tokenize": ratio(new["stages"]["tokenize"]["peak_max_mib"], base["stages"]["tokenize"]["peak_max_mib"]),
            "peak_rss_sum_scrape": ratio(new["stages"]["scrape"]["peak_sum_mib"], base["stages"]["scrape"]["peak_sum_mib"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-mb", type=float, default=64.0, help="MiB of text at 1x (default %(default)s)")
    ap.add_argument("--sizes", default="1,4,16", help="size multiples (default %(default)s)")
    ap.add_argument("--baseline-sizes", default="1,4",
                    help="multiples the baseline runs at (default %(default)s; it is slow and grows in memory)")
    ap.add_argument("--no-baseline", action="store_true", help="run the new side only")
    ap.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    ap.add_argument("--new-root", type=Path, help="run the new side from this code root in place (default: a "
                    "copy of this working tree; in place, its reports/ get the stages' metrics)")
    ap.add_argument("--new-style", choices=("auto", "tasks", "shards"), default="auto",
                    help="scrape's unit of work key for the new side: auto = tasks when its ScrapeConfig has it")
    ap.add_argument("--new-set", action="append", default=[], metavar="KEY=VALUE", help="scrape override, new side")
    ap.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE", help="scrape override, baseline")
    ap.add_argument("--tasks", type=int, default=32, help="scrape tasks (new) / shards (baseline) (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="scrape worker processes (default %(default)s)")
    ap.add_argument("--files", type=int, default=32, help="JSONL files per corpus (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tokenizer-docs", type=int, default=4000, help="documents the shared BPE is trained on")
    ap.add_argument("--poll", type=float, default=0.1, help="RSS polling interval in seconds")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "palm-rlhf" / "data-scaling", help="generated corpora and the tokenizer (default %(default)s)")
    ap.add_argument("--work", type=Path, help="scratch folder for code roots and stage outputs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs and the scratch folder")
    ap.add_argument("--record", type=Path, help="JSON record (default benchmarks/records/data-scaling-DATE.json)")
    args = ap.parse_args(argv)

    mults = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    base_mults = set() if args.no_baseline else {int(x) for x in args.baseline_sizes.split(",") if x.strip()}
    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="palm-data-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    log(f"data scaling: sizes {', '.join(f'{m}x' for m in mults)} of {args.base_mb:g} MiB; baseline "
        f"({args.baseline_commit}) at {', '.join(f'{m}x' for m in sorted(base_mults & set(mults))) or 'none'}"
        f"{'' if not base_mults or max(mults) in base_mults else f' (not at {max(mults)}x: --baseline-sizes adds it)'}; "
        f"scratch {work}")

    sides: list[Side] = []
    if base_mults & set(mults):
        broot = work / "code-baseline"
        shutil.rmtree(broot, ignore_errors=True)
        broot.mkdir()
        version = archive_tree(args.baseline_commit, broot)
        style = "tasks" if "tasks" in (scrape_fields(broot, env) or []) else "shards"
        sides.append(Side("baseline", broot, version, style, parse_sets(args.baseline_set)))
    if args.new_root:
        nroot, version = args.new_root.resolve(), "in place"
    else:
        nroot = work / "code-new"
        shutil.rmtree(nroot, ignore_errors=True)
        nroot.mkdir()
        version = snapshot_tree(nroot)
    style = args.new_style
    if style == "auto":
        fields = scrape_fields(nroot, env)
        if fields is None:
            import yaml

            fields = list((yaml.safe_load((nroot / "params.yaml").read_text()).get("scrape") or {}))
        style = "tasks" if "tasks" in fields else "shards"
    sides.append(Side("new", nroot, version, style, parse_sets(args.new_set), owned=not args.new_root))
    for s in sides:
        log(f"{s.name}: code {s.version} in {s.root}; scrape params: "
            f"{'tasks' if s.style == 'tasks' else 'shards'} {args.tasks}, workers {args.workers}"
            + (f", overrides {s.overrides}" if s.overrides else ""))
    # the MLflow store made before any timing (its schema migrations take seconds)
    subprocess.run([sys.executable, "-c", "import mlflow,os;mlflow.MlflowClient(os.environ['MLFLOW_TRACKING_URI'])"
                    ".search_experiments()"], env=env, check=False, capture_output=True)

    corpora: dict[int, dict] = {}
    results: list[dict] = []
    tokenizer: Path | None = None
    for m in mults:
        spec = sc.CorpusSpec(target_bytes=int(args.base_mb * m * MIB), seed=args.seed, files=args.files)
        folder, info = sc.ensure(spec, args.cache, log=log)
        corpora[m] = {"folder": str(folder), **info}
        manifest = sc.read_manifest(folder)
        if tokenizer is None:
            tokenizer = make_tokenizer(folder, args.cache, args.tokenizer_docs)
        for side in sides:
            if side.name == "baseline" and m not in base_mults:
                continue
            results.append(run_side(side, m, folder, info, manifest, tokenizer, work, env, args))

    names = [s.name for s in sides]
    print_tables(results, names, mults)
    ratios = side_ratios(results)
    if ratios:
        print("\nnew / baseline:")
        for m, r in ratios.items():
            print(f"  {m}: " + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in r.items()))
    new_runs = {r["mult"]: r for r in results if r["side"] == "new"}
    lines, note = summary_lines(new_runs)

    date = datetime.date.today().isoformat()
    record = args.record or ROOT / "benchmarks" / "records" / f"data-scaling-{date}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": "data_scaling", "date": date, "machine": machine(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "sides": {s.name: {"code": s.version, "scrape_style": s.style, "overrides": s.overrides} for s in sides},
            "corpora": corpora, "runs": results, "new_over_baseline": ratios,
            "summary": dict(l.split(" ", 1) for l in lines), "summary_note": note,
            "seconds": round(time.perf_counter() - started, 1)}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(_no_nan(body), indent=1, default=str) + "\n")
    tmp.replace(record)
    print(f"\nrecord: {record}; total {time.perf_counter() - started:.0f} s")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif args.keep:
        print(f"outputs kept in {work}")
    if note:
        print(note)
    for line in lines:
        print(line)
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
