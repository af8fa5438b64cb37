"""Hostile neighbours: property-based fuzzing (Hypothesis) of every reader and parser that takes
outside input.

    python benchmarks/fuzz.py [--examples 2000] [--target NAME ...] [--seed N] [--no-record]   (make fuzz)

Targets (:data:`TARGETS`), each fed near-valid, mutated and random inputs:

- ``chat_readers``: ``palm.data.chat_readers.read_examples`` over .jsonl/.jsonl.gz/.json/.parquet
  files (and folders of them) of the oasst, hh-rlhf, pairs, chat, instruction and rankings formats;
- ``rankings``: ``palm.data.rankings`` (``places``, ``latest``, ``agreement``, ``RankingStats``) on
  judgements as a rankings file holds them;
- ``warc``: ``palm.data.warc.read_warc`` on WARC/WET bytes (gzip and not), mutated or random;
- ``scrape_files``: the scrape stage's ``files`` source (``.txt/.md/.html/.jsonl/.parquet/.warc``…
  files) into raw WARC shards, then each shard cleaned into its Parquet part;
- ``config``: ``palm.core.config.from_dict`` of each stage's config class (the classes of every
  ``run_stage(...)`` call in ``stages/*.py``) and ``load_section`` of a params file;
- ``feedback``: the ranking page's Flask app (``create_app``: a batch file, then requests with
  random JSON bodies to each endpoint);
- ``registry``: what ``palm.ops.registry`` parses of an MLflow server's answers (registry URIs,
  versions, tags, MLmodel files, lineage tags), against a fake client.

The property of every target: nothing escapes but a :class:`palm.core.errors.UserError` (or its
:class:`~palm.core.errors.ConfigError`) whose message is one line, bad data otherwise counted as a
skip; and nothing is written outside the call's output folder (each call runs in a fresh folder
as its cwd; the files there are compared before and after, the output folder left out). Targets
add their own checks (the app: never a 5xx, every 4xx a JSON ``error`` message).

Each target runs under Hypothesis (``settings(max_examples=N, deadline=None, database=None)``).
A failure does not stop a target: its minimal input (Hypothesis shrinks it) is recorded under a
signature (exception type and the innermost ``palm/`` frame, or the property broken), later inputs
failing the same way are only counted, and the search goes on with the rest of the budget. Prints a
table of inputs tried (the shrinking's included) and failures per target, writes
``benchmarks/records/fuzz-YYYY-MM-DD.json``, and exits 1 when anything failed.
``tests/test_fuzz.py`` runs every target with a few derandomized examples inside ``make test``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import functools
import gc
import gzip
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
import typing
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis.errors import FlakyFailure, HypothesisWarning
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECORDS = ROOT / "benchmarks" / "records"
MAX_ROUNDS = 25  # new failures searched for per target (each one found is shrunk, then skipped)


# ============================================================================ the harness

class Violation(Exception):
    """A broken property; ``signature`` names the failure (same signature, same failure)."""

    def __init__(self, signature: str, detail: str):
        super().__init__(f"{signature}: {detail}")
        self.signature = signature
        self.detail = detail


_KINDS: dict[str, type] = {}


def violation(signature: str, detail: str) -> Violation:
    """A Violation of a class of its own per signature: Hypothesis tells failures apart by their
    exception type, so it shrinks each without sliding into another."""
    kind = _KINDS.setdefault(signature, type("Violation", (Violation,), {}))
    return kind(signature, detail)


class Hang(BaseException):
    """One call ran past its time limit (a BaseException: the code under test catches Exception)."""


@functools.cache
def _in_library(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(ROOT / "palm")


def where(err: BaseException) -> str:
    """``Type at palm/x.py:123 in fn``: the innermost frame in the library (else the innermost)."""
    tb = traceback.extract_tb(err.__traceback__)
    mine = [f for f in tb if _in_library(f.filename)]
    frame = mine[-1] if mine else (tb[-1] if tb else None)
    kind = type(err).__name__ if type(err).__module__ == "builtins" else f"{type(err).__module__}.{type(err).__name__}"
    if frame is None:
        return kind
    try:
        name = Path(frame.filename).resolve().relative_to(ROOT)
    except ValueError:
        name = Path(frame.filename).name
    return f"{kind} at {name}:{frame.lineno} in {frame.name}"


def judge_escape(err: BaseException) -> Violation | None:
    """What escaping ``err`` breaks: nothing for a UserError whose message is one non-empty line.
    (Returned, not raised: a Violation raised here would keep ``err`` and the whole stack it
    unwound alive through its traceback, for every failing input Hypothesis holds on to.)"""
    from palm.core.errors import UserError

    if isinstance(err, UserError):
        msg = str(err)
        if msg.strip() and "\n" not in msg and "\r" not in msg:
            return None
        return violation(f"UserError message not one line ({where(err)})", repr(msg[:300]))
    return violation(where(err), " ".join(f"{type(err).__name__}: {_str(err)}".split())[:300])


def _str(err: BaseException) -> str:
    try:
        return str(err)
    except RecursionError:
        return "<message too deep>"


def snapshot(folder: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            p = here / name
            try:
                st_ = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(folder))] = (st_.st_size, st_.st_mtime_ns)
    return out


def allowed(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, or None where it raised a one-line UserError (a target of several steps
    goes on with the next one)."""
    from palm.core.errors import UserError

    found = None
    try:
        return fn(*args)
    except UserError as err:
        found = judge_escape(err)
    if found is not None:
        raise found
    return None


@dataclasses.dataclass
class Target:
    """``prepare(value, work)`` writes the inputs into ``work`` and returns what ``run`` needs;
    ``run(prepared, work)`` calls the code under test (cwd ``work``) and raises
    :class:`Violation` for a broken target-specific property. ``outputs``: the folders (relative
    to ``work``) the call may write into."""

    name: str
    strategy: Callable[[], st.SearchStrategy]
    prepare: Callable[[Any, Path], Any]
    run: Callable[[Any, Path], None]
    outputs: tuple[str, ...] = ("out",)
    doc: str = ""


def call_once(target: Target, value: Any, time_limit: float | None = None) -> None:
    """One input through ``target``: raises :class:`Violation` if a property breaks."""
    found = _call_once(target, value, time_limit)
    if found is not None:
        # raised here, from a small frame, and not inside an except: Hypothesis keeps the exception
        # of every failing input it tries (with the frames its traceback holds), and tells failures
        # apart by their type, place and context (a context's place, as where a RecursionError is
        # raised, moves with the stack depth: a replay would look like another failure, Flaky)
        raise found


def _call_once(target: Target, value: Any, time_limit: float | None) -> Violation | None:
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-"))
    old_cwd = os.getcwd()
    old_env = dict(os.environ)
    alarm = time_limit and hasattr(signal, "SIGALRM")
    old_handler = None
    try:
        prepared = target.prepare(value, work)
        skip = [work / o for o in target.outputs]
        before = snapshot(work, skip)
        os.chdir(work)
        if alarm:
            def on_alarm(signum, frame):  # noqa: ANN001
                raise Hang()
            old_handler = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, time_limit)
        started = time.perf_counter()
        found: Violation | None = None
        try:
            target.run(prepared, work)
        except KeyboardInterrupt:
            raise
        except Violation as v:  # a target's own check
            found = v
        except Hang:
            found = violation("hang", f"no answer in {time.perf_counter() - started:.0f} s")
        except BaseException as err:  # noqa: BLE001 - what escaped is the finding
            found = judge_escape(err)
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler)
            os.chdir(old_cwd)
        if found is not None:
            found.__traceback__ = found.__context__ = None
            return found
        after = snapshot(work, skip)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            return violation("wrote outside the output folder", ", ".join(changed[:5]))
        return None
    finally:
        os.chdir(old_cwd)
        if os.environ != old_env:
            os.environ.clear()
            os.environ.update(old_env)
        shutil.rmtree(work, ignore_errors=True)


@dataclasses.dataclass
class Failure:
    signature: str
    detail: str
    minimal: str  # repr of the shrunk input
    count: int = 1  # inputs that failed this way (those tried while shrinking it included)


@dataclasses.dataclass
class Result:
    target: str
    inputs: int
    seconds: float
    failures: list[Failure]
    stopped: str = ""  # why the search ended early (a harness problem), if it did


def run_target(name: str, examples: int, *, derandomize: bool = False, seed: int | None = None,
               time_limit: float | None = 60.0, shrink: bool = True,
               log: Callable[[str], None] | None = None) -> Result:
    """Run ``examples`` inputs through target ``name``; every distinct failure once, shrunk
    (``shrink=False``: as first met, which is quicker). ``time_limit``: seconds one input may
    take before it counts as a hang (SIGALRM; None inside pytest, whose timeout uses it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypothesisWarning)  # "overly large repr" of deep inputs
        return _run_target(name, examples, derandomize, seed, time_limit, shrink, log)


def _run_target(name: str, examples: int, derandomize: bool, seed: int | None, time_limit: float | None,
                shrink: bool, log: Callable[[str], None] | None) -> Result:
    from hypothesis import Phase
    from hypothesis import seed as hyp_seed

    target = TARGETS[name]
    strategy = target.strategy()
    found: dict[str, Failure] = {}
    last: dict[str, tuple[Any, str]] = {}
    # every failure met, with its first input: one met while Hypothesis shrank another is not
    # reported by it (it reports one per run); if no later round shrinks it, it is kept unshrunk
    seen: dict[str, tuple[Any, str, int]] = {}
    latest: list[str] = []
    calls = 0

    def body(value: Any) -> None:
        nonlocal calls
        calls += 1
        if calls % 100 == 0:  # tracebacks of what escaped are cycles (frames <-> exceptions) that
            gc.collect()      # hold whole stacks: collected now, not at the GC's rare full pass
        try:
            call_once(target, value, time_limit)
        except Violation as v:
            if v.signature in found:  # reported already: counted, not raised again
                found[v.signature].count += 1
                return
            # (the detail only, never the exception: its traceback, once Hypothesis re-raises it,
            # holds Hypothesis's frames and with them all it cached in the run)
            first, detail, count = seen.get(v.signature, (value, v.detail, 0))
            seen[v.signature] = (first, detail, count + 1)
            last[v.signature] = (value, v.detail)  # the last failing call of a shrink is the minimal input
            latest.append(v.signature)
            raise

    started = time.perf_counter()
    stopped = ""
    for round_ in range(MAX_ROUNDS):
        remaining = examples - calls
        if remaining <= 0:
            break
        test = given(strategy)(body)
        test = settings(max_examples=remaining, deadline=None, database=None, derandomize=derandomize,
                        suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                        verbosity=Verbosity.quiet, print_blob=False,
                        phases=list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate])(test)
        if seed is not None and not derandomize:
            test = hyp_seed(seed + round_)(test)
        try:
            test()
            break  # the budget is spent (or Hypothesis ran out of distinct inputs) with no new failure
        except Violation as v:
            value, _ = last.get(v.signature, (None, ""))
            found[v.signature] = Failure(v.signature, v.detail, _short_repr(value), seen.get(v.signature, (0, 0, 1))[2])
            if log:
                log(f"  {name}: {v.signature}\n    {v.detail[:200]}\n    minimal input: {_short_repr(value)[:500]}")
        except FlakyFailure:  # a failure that did not replay the same way: kept, unshrunk
            if latest:
                sig = latest[-1]
                value, detail = last[sig]
                found[sig] = Failure(sig, detail + " (did not replay the same way)", _short_repr(value),
                                     seen[sig][2])
                if log:
                    log(f"  {name}: {sig} (did not replay the same way)\n    minimal input: {_short_repr(value)[:500]}")
                continue
            stopped = "Flaky failure without a recorded input"
            break
        except Exception as err:  # noqa: BLE001 - the harness's problem, say so
            stopped = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            if log:
                log(f"  {name}: search stopped: {stopped}")
            break
    for sig, (value, detail, count) in seen.items():
        if sig not in found:
            found[sig] = Failure(sig, detail, _short_repr(value) + "  (not shrunk)", count)
            if log:
                log(f"  {name}: {sig} (met while shrinking another, not shrunk)\n    {detail[:200]}\n"
                    f"    input: {_short_repr(value)[:500]}")
    return Result(name, calls, round(time.perf_counter() - started, 1), list(found.values()), stopped)


def _short_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except RecursionError:
        text = "<too deep to repr>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ============================================================================ shared strategies

# text, now and then with what a JSON "\\ud800" escape gives: lone surrogates (not UTF-8)
TEXT = st.one_of(st.text(max_size=24), st.text(max_size=24),
                 st.text(st.characters(exclude_categories=()), max_size=8))
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                    max_leaves=12)


def near(good: st.SearchStrategy, junk: st.SearchStrategy = JSON) -> st.SearchStrategy:
    """Mostly ``good``, sometimes anything."""
    return st.one_of(good, good, good, junk)


def _depth(max_depth: int) -> st.SearchStrategy:
    return st.sampled_from([d for d in (5, 900, 1100, 3000, 20_000) if d <= max_depth]) | st.integers(1, max_depth)


def deep_json(max_depth: int = 20_000) -> st.SearchStrategy:
    """JSON text nested very deep (a list or an object per level)."""
    return st.tuples(_depth(max_depth), st.booleans()).map(
        lambda t: ("[" * t[0] + "]" * t[0]) if t[1] else ('{"a":' * t[0] + "1" + "}" * t[0]))


# YAML nested deep (PyYAML's composer recurses per level: past ~300 it raises RecursionError). A
# few fixed depths: each deep parse is slow in pure Python, and a shrink that tried every depth
# on the way down would spend minutes on one failure
DEEP_YAML = st.tuples(st.sampled_from([50, 400, 1200]), st.booleans()).map(
    lambda t: ("[" * t[0] + "]" * t[0]) if t[1] else ("{a: " * t[0] + "1" + "}" * t[0]))


def nested(depth: int, as_dict: bool) -> Any:
    """The value ``deep_json`` writes, built without recursion."""
    value: Any = 1 if as_dict else []
    for _ in range(depth - (0 if as_dict else 1)):
        value = {"a": value} if as_dict else [value]
    return value


def deep_value(max_depth: int = 5000) -> st.SearchStrategy:
    return st.tuples(_depth(max_depth), st.booleans()).map(lambda t: nested(*t))


def dumps(value: Any, ascii_: bool = True) -> str:
    """JSON text of ``value``, which may be nested deeper than the recursion limit."""
    try:
        return json.dumps(value, ensure_ascii=ascii_)
    except RecursionError:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 50_000)
        try:
            return json.dumps(value, ensure_ascii=ascii_)
        finally:
            sys.setrecursionlimit(limit)


MUTATION = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("dup"), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 200)),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    """``data`` with a Hypothesis-drawn mutation applied (positions as fractions of its length)."""
    kind, *args = mutation
    n = len(data)
    at = (lambda f: min(n, int(f * n))) if n else (lambda f: 0)
    if kind == "flip" and n:
        b = bytearray(data)
        for f, v in args[0]:
            b[min(n - 1, int(f * n))] = v
        return bytes(b)
    if kind == "truncate":
        return data[:at(args[0])]
    if kind == "insert":
        i = at(args[0])
        return data[:i] + args[1] + data[i:]
    if kind == "dup":
        i, j = sorted((at(args[0]), at(args[1])))
        return data[:j] + data[i:j] + data[j:]
    if kind == "delete":
        i = at(args[0])
        return data[:i] + data[i + args[1]:]
    return data


# ============================================================================ chat readers

ROLE = st.sampled_from(["user", "assistant", "system", "prompter", "human", " User ", "bot", ""])
MESSAGE = st.fixed_dictionaries({"role": near(ROLE), "content": near(TEXT)})
MESSAGES = near(st.lists(near(MESSAGE, JSON), max_size=4))
HH = st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "human", "Bot"]), TEXT), max_size=4).map(
    lambda turns: "".join(f"\n\n{who}: {text}" for who, text in turns))
SMALL_ID = st.sampled_from(["b1", "b2", "i1", "i2", "alice", "bob", ""]) | st.integers(0, 3)
ORDER = st.one_of(
    st.none(),
    st.lists(st.integers(-1, 4) | st.lists(st.integers(-1, 4), max_size=3), max_size=5),
    st.permutations([0, 1, 2]).map(list),
    JSON,
    st.integers(0, 9).flatmap(lambda i: deep_value() if i == 0 else st.just([0, 1])),
)


def _grouped(perm: list[int], cuts: list[int], empties: list[int], listify: bool) -> list:
    groups, start = [], 0
    for c in sorted(set(cuts)) + [len(perm)]:
        if c > start:
            groups.append(perm[start:c])
            start = c
    out: list = [g if (len(g) > 1 or listify) else g[0] for g in groups]
    for e in empties:
        out.insert(min(e, len(out)), [])
    return out


def order_for(k: int) -> st.SearchStrategy:
    """An order of ``k`` replies, best first: ties grouped, sometimes an empty group in it."""
    return st.builds(_grouped, st.permutations(list(range(k))), st.lists(st.integers(0, k), max_size=k),
                     st.integers(0, 2).flatmap(lambda i: st.just([]) if i else st.lists(
                         st.sampled_from([0, 0, k]) | st.integers(0, k + 1), min_size=1, max_size=2)),
                     st.booleans())


def _oasst_tree() -> st.SearchStrategy:
    base = st.fixed_dictionaries(
        {"role": near(st.sampled_from(["prompter", "assistant"])), "text": near(TEXT)},
        optional={"rank": near(st.integers(0, 3)), "deleted": near(st.booleans()),
                  "synthetic": near(st.booleans()), "review_result": near(st.booleans())})
    return st.recursive(base, lambda c: st.tuples(base, near(st.lists(c, max_size=3))).map(
        lambda t: {**t[0], "replies": t[1]}), max_leaves=8)


RECORDS_BY_FORMAT = {
    "oasst": st.fixed_dictionaries({"prompt": near(_oasst_tree())}),
    "hh": st.fixed_dictionaries({"chosen": near(HH), "rejected": near(HH)}),
    "pairs": st.fixed_dictionaries({"prompt": near(TEXT), "chosen": near(TEXT), "rejected": near(TEXT)}),
    "chat": st.fixed_dictionaries({"messages": MESSAGES}),
    "instruction": st.fixed_dictionaries(
        {"instruction": near(TEXT)},
        optional={"context": near(TEXT), "input": near(TEXT), "response": near(TEXT), "output": near(TEXT)}),
    "rankings": st.integers(0, 4).flatmap(lambda k: st.fixed_dictionaries(
        {"replies": near(st.lists(near(TEXT), min_size=k, max_size=k)),
         "verdict": near(st.sampled_from(["ranked", "ranked", "all_bad", "skip"])),
         "order": st.one_of(order_for(k), order_for(k), ORDER),
         "prompt": st.one_of(st.just([{"role": "user", "content": "q?"}]), MESSAGES)},
        optional={"format": st.just("palm-rankings/1"), "batch": near(SMALL_ID), "item": near(SMALL_ID),
                  "labeler": near(SMALL_ID)})),
}


def _line() -> st.SearchStrategy:
    """One line of a .jsonl file: a record, JSON junk, a deep nesting, or not JSON at all."""
    record = st.sampled_from(list(RECORDS_BY_FORMAT)).flatmap(lambda f: RECORDS_BY_FORMAT[f])
    return st.one_of(
        record.map(dumps), record.map(dumps), record.map(lambda r: dumps(r, False)), JSON.map(dumps),
        deep_json(), TEXT,
        st.sampled_from(['{"text": "\\ud800"}', '{"messages": [{"role": "user", "content": "\\udfff"}]}',
                         "1" * 5000, "[" * 10, '{"a": NaN}', "\x00\x00", "\ufeff{}"]))


def _one_format_lines(fmt: str) -> st.SearchStrategy:
    return st.lists(st.one_of(RECORDS_BY_FORMAT[fmt].map(dumps), RECORDS_BY_FORMAT[fmt].map(dumps), _line()),
                    max_size=6)


DATA_FILE = st.fixed_dictionaries({
    "suffix": st.sampled_from([".jsonl", ".jsonl.gz", ".json", ".parquet"]),
    "lines": st.sampled_from(list(RECORDS_BY_FORMAT)).flatmap(_one_format_lines) | st.lists(_line(), max_size=6),
    "mutation": st.one_of(st.just(("none",)), st.just(("none",)), MUTATION),
})


# a rankings file as palm feedback serve writes it (the format with the most structure: judgements
# whose order must name each reply once), each line a judgement, near-valid
RANKINGS_FILE = st.fixed_dictionaries({
    "suffix": st.just(".jsonl"),
    "lines": st.lists(RECORDS_BY_FORMAT["rankings"].map(dumps), min_size=1, max_size=4),
    "mutation": st.just(("none",)),
})


def chat_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "files": st.lists(st.one_of(DATA_FILE, DATA_FILE, RANKINGS_FILE), min_size=1, max_size=3),
        "folder": st.booleans(),
        "fmt": st.sampled_from(["auto", "auto", "auto", "oasst", "hh", "pairs", "chat", "instruction", "rankings"]),
        "kind": st.sampled_from(["sft", "prefs"]),
        "missing": st.integers(0, 20).map(lambda i: i == 0),
    })


def _parquet_bytes(lines: list[str]) -> bytes:
    """A Parquet file of the lines' JSON objects (of those that make one table), else of junk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for line in lines:
        if _depth_of(line) > 64:  # pyarrow takes GBs to write a struct nested hundreds deep
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        records.append(value if isinstance(value, dict) else {"value": line})
    buf = io.BytesIO()
    for attempt in (records, records[:1], [{"junk": "x"}]):
        try:
            pq.write_table(pa.Table.from_pylist(attempt), buf)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - records of mixed types make no one table: fewer then
            buf = io.BytesIO()
    return b""


def _depth_of(text: str) -> int:
    """How deep the brackets of ``text`` nest (strings not told apart: an upper bound)."""
    depth = top = 0
    for c in text:
        if c in "[{":
            depth += 1
            top = max(top, depth)
        elif c in "]}":
            depth -= 1
    return top


def file_bytes(spec: dict) -> bytes:
    suffix, lines = spec["suffix"], spec["lines"]
    if suffix == ".parquet":
        data = _parquet_bytes(lines)
    elif suffix == ".json":
        data = ("[" + ",".join(lines) + "]").encode("utf-8", "surrogatepass")
    else:
        data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
        if suffix.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
    return mutate(data, spec["mutation"])


def chat_prepare(value: dict, work: Path) -> dict:
    folder = work / "in"
    folder.mkdir()
    for i, spec in enumerate(value["files"]):
        (folder / f"part{i}{spec['suffix']}").write_bytes(file_bytes(spec))
    source = "in" if value["folder"] else f"in/part0{value['files'][0]['suffix']}"
    if value["missing"]:
        source = "in/nothing-here.jsonl"
    return {**value, "source": source}


def chat_run(p: dict, work: Path) -> None:
    from palm.data.chat_readers import DROP_REASONS, Pair, read_examples
    from palm.data.rankings import RankingStats

    counts: Counter = Counter()
    stats = RankingStats()
    out = list(read_examples(p["source"], p["fmt"], p["kind"], counts, root=work, stats=stats))
    unknown = set(counts) - set(DROP_REASONS) - {"read"}
    if unknown:
        raise violation("count outside DROP_REASONS", str(sorted(unknown)))
    for ex in out:
        ok = isinstance(ex, Pair) if p["kind"] == "prefs" else isinstance(ex, tuple)
        if not ok:
            raise violation("an example of the wrong type", repr(ex)[:200])
    stats.metrics()


# ============================================================================ rankings

def rankings_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "records": st.lists(near(RECORDS_BY_FORMAT["rankings"], JSON | deep_value()),
                            max_size=8),
        "k": st.integers(-1, 6),
    })


def rankings_prepare(value: dict, work: Path) -> dict:
    return value


def rankings_run(p: dict, work: Path) -> None:
    from palm.data import rankings

    counts: Counter = Counter()
    stats = rankings.RankingStats()
    for record in p["records"]:
        if isinstance(record, dict):
            k = len(record["replies"]) if isinstance(record.get("replies"), list) and p["k"] >= 0 else p["k"]
            try:
                place = rankings.places(record.get("verdict"), record.get("order"), k)
            except ValueError as err:
                if "\n" in str(err):
                    raise violation("places: ValueError message not one line", repr(str(err))[:200]) from None
                continue
            if place is not None:
                if sorted(set(place)) != list(range(len(set(place)))) or len(place) != max(k, 0):
                    raise violation("places: places not 0..m without gaps", f"{record.get('order')!r} -> {place}")
                rankings.ordered_pairs(place)
    kept = list(rankings.latest(p["records"], counts, stats))
    if len(kept) > len(p["records"]):
        raise violation("latest: more records out than in", f"{len(kept)} > {len(p['records'])}")
    stats.metrics()
    rankings.agreement(stats.orders)
    rankings.run_tags({"rankings": {"rankings": stats.judgements, "labelers": sorted(stats.labelers),
                                    "batches": sorted(stats.batches)}})


# ============================================================================ WARC / WET

WARC_RECORD = st.fixed_dictionaries({
    "type": st.sampled_from(["response", "resource", "conversion", "warcinfo", "request", "metadata"]),
    "url": st.sampled_from(["http://a.example/x", "https://b.example/", "file:///tmp/x.txt", ""]) | TEXT,
    "ctype": st.sampled_from(["text/html; charset=utf-8", "text/plain", "application/octet-stream", ""]) | TEXT,
    "body": st.binary(max_size=200) | TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
    "headers": st.dictionaries(st.sampled_from(["WARC-Title", "Palm-Seq", "WARC-Date", "X-Junk"]),
                               st.sampled_from(["-1", "--1", "7", "1e3", "²", ""]) | TEXT, max_size=3),
})


def warc_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "records": st.lists(WARC_RECORD, max_size=5),
        "gzip": st.booleans(),
        "mutations": st.lists(MUTATION, max_size=3),
        "raw": st.integers(0, 9).flatmap(lambda i: st.binary(max_size=400) if i == 0 else st.none()),
        "max_bytes": st.none() | st.integers(0, 300),
        "suffix": st.sampled_from([".warc", ".warc.gz", ".wet", ".wet.gz"]),
    })


def warc_bytes(records: list[dict], gzipped: bool) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gzipped)
    for r in records:
        headers = {k: v for k, v in r["headers"].items() if _header_safe(k) and _header_safe(v)}
        url = r["url"] if _header_safe(r["url"]) else "http://x.example/"
        ctype = r["ctype"] if _header_safe(r["ctype"]) else "text/plain"
        try:
            if r["type"] == "response":
                http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
                rec = writer.create_warc_record(url, "response", payload=io.BytesIO(r["body"]),
                                                http_headers=http, warc_headers_dict=headers)
            else:
                rec = writer.create_warc_record(url, r["type"], payload=io.BytesIO(r["body"]),
                                                warc_content_type=ctype, warc_headers_dict=headers)
            writer.write_record(rec)
        except Exception:  # noqa: BLE001 - warcio refuses to write some; the reader gets the rest
            continue
    return buf.getvalue()


def _header_safe(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\n" not in s and "\r" not in s


def warc_prepare(value: dict, work: Path) -> dict:
    data = value["raw"] if value["raw"] is not None else warc_bytes(value["records"], value["gzip"])
    for m in value["mutations"]:
        data = mutate(data, m)
    path = work / f"in{value['suffix']}"
    path.write_bytes(data)
    return {"path": path, "max_bytes": value["max_bytes"]}


def warc_run(p: dict, work: Path) -> None:
    from palm.data.warc import WARC_SKIPS, RawRecord, read_warc

    skipped: Counter = Counter()
    with contextlib.redirect_stderr(io.StringIO()):  # warcio's own warnings about bad records
        out = list(read_warc(p["path"], p["max_bytes"], skipped))
    if set(skipped) - set(WARC_SKIPS):
        raise violation("skip reason outside WARC_SKIPS", str(sorted(set(skipped) - set(WARC_SKIPS))))
    for rec in out:
        if not (isinstance(rec, RawRecord) and isinstance(rec.body, bytes) and isinstance(rec.url, str)
                and isinstance(rec.seq, int)):
            raise violation("read_warc: a record of the wrong type", repr(rec)[:200])
        if p["max_bytes"] is not None and len(rec.body) > p["max_bytes"]:
            raise violation("read_warc: a record over max_bytes", f"{len(rec.body)} > {p['max_bytes']}")


# ============================================================================ scrape: files source

HTML = st.tuples(TEXT, st.lists(TEXT, max_size=6), st.sampled_from(["", "<meta charset='latin-1'>",
                                                                    "<meta charset=bogus>", "<table><tr><td>"])).map(
    lambda t: f"<!doctype html><html><head>{t[2]}<title>{t[0]}</title></head><body>"
              + "".join(f"<p>{p}</p>" for p in t[1]) + "</body></html>")
ENCODING = st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16", "cp1252", "surrogatepass"])
SCRAPE_ROW = st.fixed_dictionaries({}, optional={
    "text": near(TEXT), "url": near(st.sampled_from(["", "http://a.example/", "https://b.example/p"]) | TEXT),
    "title": near(TEXT)})
SCRAPE_FILE = st.one_of(
    st.tuples(st.sampled_from([".txt", ".md", ".rst", ".TXT", ".html", ".htm", ".xhtml", ".bin", ""]),
              st.one_of(TEXT, HTML, st.binary(max_size=300).map(lambda b: b.decode("latin-1"))), ENCODING),
    st.tuples(st.just(".jsonl"), st.lists(st.one_of(SCRAPE_ROW.map(dumps), SCRAPE_ROW.map(dumps), _line()),
                                          max_size=5).map("\n".join), ENCODING),
    st.tuples(st.just(".parquet"), st.lists(SCRAPE_ROW, max_size=4), st.just("")),
    st.tuples(st.sampled_from([".warc", ".warc.gz", ".wet"]), st.lists(WARC_RECORD, max_size=3), st.just("")),
)


def scrape_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "files": st.lists(st.tuples(SCRAPE_FILE, MUTATION, st.sampled_from(["", "", "sub/", ".hidden/", "."])),
                          max_size=4),
        "max_bytes": st.sampled_from([2_000_000, 50, 1]),
        "min_words": st.sampled_from([0, 1, 50]),
        "missing": st.integers(0, 20).map(lambda i: i == 0),
    })


def _encode(text: str, encoding: str) -> bytes:
    if encoding == "surrogatepass":
        return text.encode("utf-8", "surrogatepass")
    return text.encode(encoding, "replace")


def scrape_prepare(value: dict, work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "in"
    folder.mkdir()
    for i, ((suffix, content, encoding), mutation, prefix) in enumerate(value["files"]):
        path = folder / f"{prefix}f{i}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            buf = io.BytesIO()
            try:
                pq.write_table(pa.Table.from_pylist(content), buf)
            except Exception:  # noqa: BLE001 - rows of mixed types: one column of text then
                buf = io.BytesIO()
                pq.write_table(pa.table({"text": [str(r.get("text")) for r in content]}), buf)
            data = buf.getvalue()
        elif suffix.startswith((".warc", ".wet")):
            data = warc_bytes(content, suffix.endswith(".gz"))
        else:
            data = _encode(content, encoding)
        path.write_bytes(mutate(data, mutation))
    return {**value, "folder": folder / "nothing" if value["missing"] else folder}


def scrape_run(p: dict, work: Path) -> None:
    from palm.data.clean import FilterConfig
    from palm.data.executors import run_inline
    from palm.data.scrape import ScrapeConfig, _collect_files, pipeline_steps
    from palm.data.warc import WarcShardWriter

    cfg = ScrapeConfig(source="files", files_path=str(p["folder"]), tasks=2, workers=1,
                       max_bytes=p["max_bytes"],
                       filters=FilterConfig(min_words=p["min_words"], max_words=max(p["min_words"] + 1, 200_000)))
    out = work / "out"
    with contextlib.redirect_stderr(io.StringIO()):
        with WarcShardWriter(out / "raw", cfg.tasks) as writer:
            stats = _collect_files(cfg, writer, False)
        clean = pipeline_steps(cfg, out / "raw", out / "work")[0].pipeline[:4]  # read, extract, normalise, filter
        read = sum(len(run_inline(clean[:1], i, cfg.tasks)) for i in range(cfg.tasks))
        for i in range(cfg.tasks):
            run_inline(clean, i, cfg.tasks)
    if not all(isinstance(v, int) for v in stats.values()):
        raise violation("collect stats not counts", repr(stats)[:200])
    if read != stats["fetched"]:  # a header value that broke its record (a newline in a title)
        raise violation("shards: records written and read back differ", f"{stats['fetched']} written, {read} read")


# ============================================================================ params.yaml sections

def stage_configs() -> list[tuple[str, str, type]]:
    """``(stage, section, config class)`` of every ``run_stage(...)`` call in ``stages/*.py`` (its
    own section and the further ``sections={...}`` it reads)."""
    import importlib

    out = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage" and len(node.args) >= 2:
                module = importlib.import_module(f"stages.{path.stem}")
                section, cls = node.args[0], node.args[1]
                if isinstance(section, ast.Constant) and isinstance(cls, ast.Name):
                    out.append((path.stem, section.value, getattr(module, cls.id)))
                for kw in node.keywords:
                    if kw.arg == "sections" and isinstance(kw.value, ast.Dict):
                        for k, v in zip(kw.value.keys, kw.value.values):
                            if isinstance(k, ast.Constant) and isinstance(v, ast.Name):
                                out.append((path.stem, k.value, getattr(module, v.id)))
    return out


EDGE_INTS = st.sampled_from([0, 1, -1, 2, 3, 7, 16, 1024, 2**31, 2**63, 10**30, -(10**30)])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e-300, 1e300, 1.7e308, float("inf"),
                               float("-inf"), float("nan")])


def for_type(tp: Any, depth: int = 0) -> st.SearchStrategy:
    """Values of a config field's type, near its edges, sometimes of another type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        good = JSON
    elif origin is typing.Literal:
        good = st.sampled_from(typing.get_args(tp)) | TEXT
    elif origin in (typing.Union, types.UnionType):
        good = st.one_of([for_type(a, depth + 1) for a in typing.get_args(tp)])
    elif origin in (list, tuple):
        good = st.lists(for_type(typing.get_args(tp)[0], depth + 1), max_size=3)
    elif dataclasses.is_dataclass(tp):
        good = section_dict(tp, {}, depth + 1) if depth < 2 else st.just({})
    elif tp is type(None):
        good = st.none()
    elif tp is bool:
        good = st.booleans()
    elif tp is int:
        good = EDGE_INTS | st.integers(-5, 100)
    elif tp is float:
        good = EDGE_FLOATS | st.floats() | st.integers(-5, 5)
    elif tp is str:
        good = TEXT | st.sampled_from(["", " ", "auto", "fp32", "bf16", "max", "min", "hf:", "default", "gae"])
    else:
        good = JSON
    return st.one_of(good, good, good, good, JSON)


def section_dict(cls: type, base: dict, depth: int = 0) -> st.SearchStrategy:
    """A mapping for ``cls``: ``base`` with a few keys overridden, a few dropped, maybe an unknown one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if not names:
        return st.just(dict(base))

    def build(keys: list[str]) -> st.SearchStrategy:
        return st.tuples(
            st.fixed_dictionaries({k: for_type(hints[k], depth) for k in keys}),
            st.lists(st.sampled_from(names), max_size=2),
            st.dictionaries(st.one_of(TEXT, st.sampled_from([n + "s" for n in names] + ["a\nb", "k\r", "\x1b[31m"]),
                                      st.integers(), st.none()),
                            JSON, max_size=1) if depth == 0 else st.just({}),
            st.integers(0, 7),
        ).map(lambda t: {**{k: v for k, v in base.items() if k not in t[1]}, **t[0], **(t[2] if t[3] == 0 else {})})

    return st.lists(st.sampled_from(names), max_size=4, unique=True).flatmap(build)


def config_strategy() -> st.SearchStrategy:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    choices, seen = [], set()
    for stage, section, cls in stage_configs():
        if (section, cls) in seen:  # the model section of several stages: once
            continue
        seen.add((section, cls))
        base = params.get(section) or {}
        choices.append(st.tuples(st.just((stage, section, cls)), section_dict(cls, base if isinstance(base, dict) else {})))
    return st.fixed_dictionaries({
        "config": st.one_of(choices),
        "via": st.sampled_from(["dict", "dict", "file", "junk", "scalar"]),
        "junk": near(JSON, DEEP_YAML),
        "scalar": st.tuples(st.sampled_from(["", "a\nb", "x\r", "\x00", "?", "'a:\\n b'"]) | TEXT, YAML_SCALAR),
        "mutation": MUTATION,
    })


# scalars YAML reads into something odd, or fails to build
YAML_SCALAR = st.sampled_from([
    "2001-13-45", "2001-01-01", "2001-01-01 99:99:99", "1" * 5000, "0x" + "f" * 5000, "1e999", ".inf", "-.inf",
    ".nan", "!!int x", "!!float x", "!!binary x", "!!python/name:os.system", "&a [*a]", "&a {k: *a}", "0o9",
    "1_000", "~", "[[[[[[[[[[]]]]]]]]]]", "{", "'unterminated", "!!str 5", "yes", "on", "0b101", "!!set {a}",
    "<<: {a: 1}", "|\n  block", "*undefined", "!custom x",
]) | DEEP_YAML


def config_prepare(value: dict, work: Path) -> dict:
    import yaml

    (_stage, section, cls), data = value["config"]
    if value["via"] == "dict":
        return {"mode": "dict", "cls": cls, "section": section, "data": data}
    if value["via"] == "scalar":  # one key (a field's or an odd one) set to a tricky YAML scalar
        names = [f.name for f in dataclasses.fields(cls)]
        odd, scalar = value["scalar"]
        key = names[len(odd) % len(names)] if len(odd) % 3 else json.dumps(odd)
        text = f"{section}:\n  {key}: {scalar}\n".encode("utf-8", "surrogatepass")
        (work / "params.yaml").write_bytes(mutate(text, value["mutation"]))
        return {"mode": "file", "cls": cls, "section": section, "path": work / "params.yaml"}
    if value["via"] == "junk":
        data = value["junk"]
    try:
        text = yaml.safe_dump({section: data}, allow_unicode=True).encode("utf-8", "surrogatepass")
    except Exception:  # noqa: BLE001 - a value YAML cannot write (a deep nesting): its JSON, which is YAML
        text = f'{{"{section}": {data if isinstance(data, str) else ""}}}'.encode("utf-8", "surrogatepass")
    (work / "params.yaml").write_bytes(mutate(text, value["mutation"]))
    return {"mode": "file", "cls": cls, "section": section, "path": work / "params.yaml"}


def config_run(p: dict, work: Path) -> None:
    from palm.core.config import from_dict, load_section, to_dict

    if p["mode"] == "dict":
        cfg = from_dict(p["cls"], p["data"], p["section"])
    else:
        cfg = load_section(p["cls"], p["path"], p["section"])
    if not isinstance(cfg, p["cls"]):
        raise violation("from_dict returned another type", type(cfg).__name__)
    to_dict(cfg)


# ============================================================================ the feedback page

BATCH_FORMAT = "palm-feedback-batch/1"
GOOD_ITEMS = [{"format": BATCH_FORMAT, "batch": "batch-1", "item": f"it{i}", "index": i,
               "prompt": [{"role": "user", "content": f"question {i}"}], "replies": ["a", "b", "c"][:2 + i % 2],
               "model": {"ref": "x"}, "sampling": {"k": 3}} for i in range(3)]
BATCH_ITEM = near(st.fixed_dictionaries(
    {"format": near(st.just(BATCH_FORMAT)), "item": near(st.sampled_from(["it0", "it1", "x"])),
     "prompt": near(st.just([{"role": "user", "content": "q"}])), "replies": near(st.lists(TEXT, max_size=4))},
    optional={"batch": near(st.sampled_from(["batch-1", "b2"]))}))
JUDGEMENT = st.fixed_dictionaries(
    {"index": near(st.integers(-1, 3) | st.booleans()), "item": near(st.sampled_from(["it0", "it1", "it2", "x"])),
     "verdict": near(st.sampled_from(["ranked", "all_bad", "skip"])),
     "order": st.one_of(order_for(2), order_for(3), ORDER)})
def _request(method: st.SearchStrategy, path: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "method": method,
        "path": path,
        # mostly a request of the page itself (key cookie, token, its Host), so the views are reached
        "token": st.sampled_from(["good"] * 12 + ["missing", "wrong", "long"]),
        "key": st.sampled_from(["cookie"] * 12 + ["query", "query", "missing", "wrong"]),
        "host": st.sampled_from([None] * 12 + ["127.0.0.1", "evil.example", "localhost:1", ""]),
        "content_type": st.sampled_from(["application/json"] * 4 + ["text/plain", None, "application/json; charset=latin-1"]),
        "body": st.one_of(JUDGEMENT.map(dumps), JUDGEMENT.map(dumps), JSON.map(dumps), deep_json(30_000),
                          st.binary(max_size=60), st.just("x" * 70_000)),
    })


# half of them judgements (the endpoint that parses a body), the rest any method and path
REQUEST = st.one_of(
    _request(st.just("POST"), st.just("/api/judge")),
    _request(st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
             st.one_of(st.sampled_from(["/api/judge", "/api/state", "/"]), st.integers(-3, 5).map(lambda i: f"/api/item/{i}"),
                       TEXT.map(lambda s: "/" + quote(s.encode("utf-8", "surrogatepass"), safe="/")))),
)


def feedback_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "batch": st.integers(0, 5).flatmap(
            lambda i: st.lists(BATCH_ITEM.map(dumps) | deep_json(5000), min_size=0, max_size=3) if i == 0
            else st.just([dumps(it) for it in GOOD_ITEMS])),
        "rankings": st.lists(_line(), max_size=3),
        "requests": st.lists(REQUEST, min_size=1, max_size=4),
    })


def feedback_prepare(value: dict, work: Path) -> dict:
    (work / "batch.jsonl").write_bytes("".join(l + "\n" for l in value["batch"]).encode("utf-8", "surrogatepass"))
    out = work / "out"
    out.mkdir()
    if value["rankings"]:  # what other labelers' servers appended before
        (out / "rankings.jsonl").write_bytes("".join(l + "\n" for l in value["rankings"]).encode("utf-8", "surrogatepass"))
    return value


def feedback_run(p: dict, work: Path) -> None:
    from palm.apps.feedback.app import TOKEN_HEADER, create_app

    import inspect

    keyed = "key" in inspect.signature(create_app).parameters  # every request carries the session's key
    app = create_app(work / "batch.jsonl", work / "out" / "rankings.jsonl", "fuzzer", token="t0k",
                     **({"key": "k3y"} if keyed else {}))
    app.config["PROPAGATE_EXCEPTIONS"] = True  # an exception in a view escapes (with its place) instead of a bare 500
    cookie = app.config.get("COOKIE", "palm_feedback")
    with app.test_client() as c:
        for r in p["requests"]:
            headers = {}
            if r["token"] != "missing":
                headers[TOKEN_HEADER] = {"good": "t0k", "wrong": "t0K", "long": "t0k" * 50}[r["token"]]
            if r["host"] is not None:
                headers["Host"] = r["host"]
            path = r["path"]
            c.delete_cookie(cookie)
            if r["key"] == "cookie":
                c.set_cookie(cookie, "k3y")
            elif r["key"] == "wrong":
                c.set_cookie(cookie, "k3y\x00")
            elif r["key"] == "query":
                path += "?key=k3y"
            body = r["body"] if isinstance(r["body"], bytes) else r["body"].encode("utf-8", "surrogatepass")
            resp = c.open(path, method=r["method"], data=body, headers=headers, content_type=r["content_type"])
            route = (r["path"] if r["path"] in ("/", "/api/judge", "/api/state")
                     else "/api/item/<i>" if r["path"].startswith("/api/item/") else "/<other>")
            where_ = f"{r['method']} {route}"
            if resp.status_code >= 500:
                raise violation(f"HTTP {resp.status_code} from {where_}", resp.get_data(as_text=True)[:200])
            if resp.status_code >= 400:
                data = resp.get_json(silent=True)
                if not (isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"].strip()):
                    raise violation(f"HTTP {resp.status_code} without a JSON error message from {where_}",
                                    resp.get_data(as_text=True)[:200])
            elif route == "/api/judge" and r["method"] == "POST":
                sent = json.loads(body)
                if isinstance(sent.get("index"), bool):
                    raise violation("a judgement with a boolean index accepted", body.decode()[:200])


# ============================================================================ registry answers

NAME = st.sampled_from(["palm-chat", "palm-sft", "m", "a b", "x/y", "..", "../..", "../../a", ".", "", "{WORK}/abs",
                        "n\nm", "%2e%2e"]) | TEXT.filter(lambda s: "/" not in s and ".." not in s)
VERSION = st.sampled_from(["1", "2", "10", "latest", "abc", "", "1.5", "-1", "../..", "1/../.."]) | st.integers(-2, 20).map(str)
TAGS = st.dictionaries(
    st.sampled_from(["dvc.md5", "palm.metric.reward_mean", "palm.metric.kl", "dvc.dep.data/corpus.md5",
                     "dvc.out.data/corpus.md5", "palm.input.data/corpus.run_id", "palm.ops.stage", "git_commit",
                     "dvc.dep..md5", "dvc.dep.md5", "palm.input..run_id"]) | TEXT,
    st.sampled_from(["abc123", "0.5", "nan", "inf", "", "r1", "r2", "r3", "scrape", "../../x"]) | TEXT,
    max_size=5)
# what MLflow's client hands back is typed (its entities): odd values, but of the types it declares
RUN = st.fixed_dictionaries({"status": st.sampled_from(["FINISHED", "FAILED", "RUNNING", ""]) | TEXT,
                             "start_time": st.none() | st.integers(-1, 10**13), "tags": TAGS})
MLMODEL = st.one_of(
    st.tuples(st.sampled_from(["model", "../model", "../../../x", "/etc", "{WORK}/elsewhere", "", ".", "a/../../b"]) | TEXT,
              st.booleans()).map(lambda t: {"flavors": {"python_function": {"artifacts": {"model": {"path": t[0]}}}}}
                                 if t[1] else {"flavors": {"python_function": {"artifacts": {"model": t[0]}}}}),
    JSON, st.integers(0, 9).flatmap(lambda i: DEEP_YAML if i == 0 else st.just("flavors: {}")),
)


def registry_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "uri": st.one_of(
            st.tuples(NAME, st.sampled_from(["@", "/"]), st.sampled_from(["champion", "current", "x-y", "1", "latest", ""])
                      | VERSION).map(lambda t: f"models:/{t[0]}{t[1]}{t[2]}"),
            TEXT, st.just("models:/palm-chat@champion")),
        "server": st.fixed_dictionaries({
            "error": st.none() | st.none() | TEXT,  # the client raises MlflowException(error) on each call
            "version": st.fixed_dictionaries({"name": NAME, "version": VERSION, "run_id": st.sampled_from(["r1", "r2", "r9", "", None]),
                                              "tags": TAGS, "aliases": st.lists(TEXT, max_size=2)}),
            "runs": st.dictionaries(st.sampled_from(["r1", "r2", "r3"]), RUN, max_size=3),
            "champion": st.none() | st.fixed_dictionaries({"version": VERSION, "tags": TAGS}),
            "search": st.lists(st.just(0), max_size=2),
        }),
        "mlmodel": MLMODEL,
        "champion_args": st.tuples(st.integers(-1, 11), EDGE_FLOATS | st.floats(), st.sampled_from(["reward_mean", "kl", ""]),
                                   st.sampled_from(["max", "min", "x"])),
    })


class _Obj(types.SimpleNamespace):
    pass


def _fake_client(server: dict, work: Path) -> Any:
    from mlflow.exceptions import MlflowException

    def fill(s: Any) -> Any:
        return s.replace("{WORK}", str(work)) if isinstance(s, str) else s

    def version_of(v: dict) -> Any:
        return _Obj(name=fill(v["name"]), version=fill(v["version"]), run_id=v["run_id"], tags=dict(v["tags"]),
                    aliases=v["aliases"])

    class Client:
        tracking_uri = "sqlite:///fuzz.db"

        def _fail(self) -> None:
            if server["error"] is not None:
                raise MlflowException(server["error"])

        def get_model_version_by_alias(self, name: str, alias: str) -> Any:
            self._fail()
            if alias == "champion" and server["champion"] is not None:
                return _Obj(name=name, version=server["champion"]["version"], tags=dict(server["champion"]["tags"]),
                            run_id="r1", aliases=["champion"])
            if alias == "champion" and server["champion"] is None:
                raise MlflowException("no alias champion")
            return version_of(server["version"])

        def get_model_version(self, name: str, version: str) -> Any:
            self._fail()
            return version_of(server["version"])

        def search_model_versions(self, query: str, max_results: int | None = None, order_by: Any = None) -> list:
            self._fail()
            return [version_of(server["version"]) for _ in server["search"]]

        def get_run(self, run_id: str) -> Any:
            self._fail()
            if run_id not in server["runs"]:
                raise MlflowException(f"Run '{run_id}' not found")
            r = server["runs"][run_id]
            return _Obj(info=_Obj(status=r["status"], start_time=r["start_time"]), data=_Obj(tags=dict(r["tags"])))

    return Client()


REGISTRY_CACHE = "c1/c2/c3/c4/c5/cache"  # deep, so a name's ../ that escapes it still lands in the work folder


def registry_prepare(value: dict, work: Path) -> dict:
    import yaml

    (work / REGISTRY_CACHE).mkdir(parents=True)
    mlmodel = value["mlmodel"]
    if isinstance(mlmodel, str):
        text = mlmodel
    else:
        try:
            text = yaml.safe_dump(json.loads(json.dumps(mlmodel).replace("{WORK}", str(work))), allow_unicode=True)
        except Exception:  # noqa: BLE001 - NaN and the like: repr is YAML enough
            text = repr(mlmodel)
    return {**value, "mlmodel_text": text}


def _escapes(v: dict) -> bool:
    """Would a name or version lead out of the work folder? (Those are not tried: they could write
    anywhere on this machine; deeper ../ than the cache's depth, or an absolute path.)"""
    parts = f"{v['name']}/{v['version']}".split("/")
    return parts.count("..") > 5 or v["name"].startswith("/")


def registry_run(p: dict, work: Path) -> None:
    with contextlib.redirect_stderr(io.StringIO()):  # the registry's warnings about odd tags
        _registry_run(p, work)


def _registry_run(p: dict, work: Path) -> None:
    import mlflow.artifacts

    from palm.ops import registry

    server = p["server"]
    client = _fake_client(server, work)
    allowed(registry.get_version, client, p["uri"])

    version, value, metric, direction = p["champion_args"]
    alias = allowed(registry.champion_alias, client, version, value, metric, direction)
    if alias not in ("champion", "candidate", None):
        raise violation("champion_alias: neither champion nor candidate", repr(alias))

    # the MLmodel file a downloaded version holds: export_folder must stay inside the model folder
    model_dir = work / "out" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "MLmodel").write_text(p["mlmodel_text"], encoding="utf-8", errors="surrogatepass")
    folder = allowed(registry.export_folder, model_dir)
    if folder is not None and not Path(os.path.normpath(folder)).is_relative_to(model_dir):
        raise violation("export_folder: a path outside the model folder", f"{folder}")

    # resolve: a version's name and number name the cache folder it is downloaded into
    if not _escapes(server["version"]):
        def download(artifact_uri: str, dst_path: str, tracking_uri: str | None = None) -> str:
            Path(dst_path, "MLmodel").write_text(p["mlmodel_text"], encoding="utf-8", errors="surrogatepass")
            return dst_path

        saved = (registry.client, mlflow.artifacts.download_artifacts, os.environ.get(registry.CACHE_ENV))
        registry.client = lambda root=None, existing=False: client
        mlflow.artifacts.download_artifacts = download
        os.environ[registry.CACHE_ENV] = str(work / REGISTRY_CACHE)
        try:
            allowed(registry.resolve, p["uri"], work)
        finally:
            registry.client, mlflow.artifacts.download_artifacts = saved[0], saved[1]
            if saved[2] is None:
                os.environ.pop(registry.CACHE_ENV, None)
            else:
                os.environ[registry.CACHE_ENV] = saved[2]

    # lineage: the run graph the tags describe
    saved_client = registry.client
    registry.client = lambda root=None, existing=False: client
    try:
        info = allowed(registry.lineage, p["uri"], work)
    finally:
        registry.client = saved_client
    if info is None:
        return
    list(registry.format_lineage(info))
    registry.lineage_json(info)


# ============================================================================ the targets

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("chat_readers", chat_strategy, chat_prepare, chat_run,
           doc="read_examples over .jsonl/.jsonl.gz/.json/.parquet files of every chat format"),
    Target("rankings", rankings_strategy, rankings_prepare, rankings_run,
           doc="places/latest/agreement/RankingStats on judgements"),
    Target("warc", warc_strategy, warc_prepare, warc_run, doc="read_warc on WARC/WET bytes, gzip or not"),
    Target("scrape_files", scrape_strategy, scrape_prepare, scrape_run,
           doc="the scrape stage's files source, then each shard cleaned"),
    Target("config", config_strategy, config_prepare, config_run,
           doc="from_dict / load_section of every stage's config class"),
    Target("feedback", feedback_strategy, feedback_prepare, feedback_run,
           doc="the ranking page's app: a batch file, then requests"),
    Target("registry", registry_strategy, registry_prepare, registry_run, outputs=("out", REGISTRY_CACHE),
           doc="registry URIs, versions, tags, MLmodel files, lineage from a fake MLflow client"),
]}


# ============================================================================ the command

def table(results: list[Result]) -> str:
    rows = [("target", "inputs", "failures", "seconds")]
    rows += [(r.target, str(r.inputs), str(len(r.failures)) + (" (stopped)" if r.stopped else ""), f"{r.seconds:.1f}")
             for r in results]
    rows.append(("total", str(sum(r.inputs for r in results)), str(sum(len(r.failures) for r in results)),
                 f"{sum(r.seconds for r in results):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import hypothesis

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per target (default %(default)s)")
    parser.add_argument("--target", action="append", choices=list(TARGETS), help="only this target (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed (default: a random one each run)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds one input may take (a hang)")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/records/fuzz-DATE.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    results = []
    for name in args.target or list(TARGETS):
        print(f"fuzz {name}: {args.examples} inputs ({TARGETS[name].doc})", flush=True)
        r = run_target(name, args.examples, seed=args.seed, time_limit=args.time_limit,
                       log=lambda s: print(s, flush=True))
        results.append(r)
        print(f"  {r.inputs} inputs, {len(r.failures)} failures, {r.seconds:.1f} s", flush=True)
    print()
    print(table(results))
    for r in results:
        for f in r.failures:
            print(f"\n[{r.target}] {f.signature} (x{f.count})\n  {f.detail[:300]}\n  minimal input: {f.minimal[:600]}")
    if not args.no_record:
        RECORDS.mkdir(parents=True, exist_ok=True)
        day = datetime.date.today().isoformat()
        path = RECORDS / f"fuzz-{day}.json"
        record = {"date": day, "hypothesis": hypothesis.__version__, "examples_per_target": args.examples,
                  "seed": args.seed, "total_inputs": sum(r.inputs for r in results),
                  "targets": {r.target: {"inputs": r.inputs, "seconds": r.seconds, "stopped": r.stopped,
                                         "failures": [dataclasses.asdict(f) for f in r.failures]} for r in results}}
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(f"\nrecord: {path.relative_to(ROOT)}")
    return 1 if any(r.failures or r.stopped for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
