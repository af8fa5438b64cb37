"""``palm feedback simulate``: a simulated labeler, the gold rule judge with noise, ranking a batch.

    palm feedback simulate data/feedback/batch-1.jsonl [--labeler sim] [--noise 0.1] [--seed 0]

For every item of a batch (``palm feedback sample``) it scores the K replies with the gold rule
judge (:func:`palm.data.rules.judge`'s ``score``, in [0, 1]) against the item's ``reference``
answer, adds noise, and ranks the replies by the noisy score, best first. The judgement goes to
the rankings file exactly as the ranking page writes a person's (same :class:`RankingsFile`, one
synced line per item, the same fields; ``labeler`` names the simulator), so the ``prefs`` stage
reads it unchanged (``format: rankings``).

The noise (``--noise`` = σ): reply ``i``'s noisy score is ``s_i + e_i`` with ``e_i ~ N(0, σ²)``,
independent across replies and items, drawn from a generator seeded with ``(--seed, batch,
item)``: the same seed gives the same rankings, and an item's ranking does not depend on the
other items of the batch. Two replies whose gold scores differ by ``d`` come out in the wrong
order with probability ``Φ(-d / (σ√2))`` (a labeler who is reliable on clear differences and a
coin flip on close ones, as people are). Replies with equal noisy scores (only without noise: two
identical replies, or two sharing no word with the answer) share a place, a tie, which gives no
preference pair, as a person's tie gives none.

Crash-safe like the page: each judgement is appended and fsynced on its own; items this labeler
already judged in the rankings file are left as they are, so a run that was killed finishes the
rest when started again (to judge a batch again with other settings, name another ``--labeler``).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from palm.core.errors import UserError

DEFAULT_LABELER = "sim"


def add_parser(sub: Any, rankings: Path) -> None:
    """The ``simulate`` subcommand's arguments (``rankings``: the default rankings file)."""
    what = "rank a batch's replies by the gold rule judge, with noise (a simulated labeler)"
    m = sub.add_parser("simulate", help=what, description=what)
    m.add_argument("batch", type=Path, metavar="BATCH", help="a batch file of palm feedback sample (with references)")
    m.add_argument("--labeler", default=DEFAULT_LABELER,
                   help="the name recorded with every judgement (default %(default)s)")
    m.add_argument("--noise", type=float, default=0.1,
                   help="std of the Gaussian noise added to each reply's gold score in [0, 1] (default %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="seeds the noise (default %(default)s)")
    m.add_argument("--rankings", type=Path, default=rankings, help="appended to (default %(default)s)")


def prompt_text(prompt: Sequence[dict]) -> str:
    """What the rule judge reads of a prompt: its user turns (the question names the function)."""
    return "\n".join(m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user")


def gold_scores(item: dict[str, Any]) -> list[float]:
    """The rule judge's combined score of each reply of a batch item."""
    from palm.data import rules

    question = prompt_text(item["prompt"])
    return [rules.judge(question, item["reference"], r)["score"] for r in item["replies"]]


def item_rng(seed: int, batch: str, item: str) -> random.Random:
    """The noise generator of one item (a str seed is hashed with SHA-512: the same on every run)."""
    return random.Random(f"{seed}/{batch}/{item}")


def noisy_order(scores: Sequence[float], noise: float, rng: random.Random) -> list[int | list[int]]:
    """The replies' order, best first, by ``score + N(0, noise²)``; equal noisy scores form one
    tie group (a list), as the rankings format writes ties."""
    noisy = [s + (rng.gauss(0.0, noise) if noise > 0 else 0.0) for s in scores]
    order: list[int | list[int]] = []
    ranked = sorted(range(len(noisy)), key=lambda i: (-noisy[i], i))
    at = 0
    while at < len(ranked):
        group = [i for i in ranked[at:] if noisy[i] == noisy[ranked[at]]]
        order.append(group[0] if len(group) == 1 else group)
        at += len(group)
    return order


def judgement(item: dict[str, Any], labeler: str, noise: float, seed: int) -> dict[str, Any]:
    """The simulated labeler's judgement of one batch item: the record the ranking page writes."""
    from palm.data import rankings

    order = noisy_order(gold_scores(item), noise, item_rng(seed, item["batch"], item["item"]))
    return {"format": rankings.FORMAT, "batch": item["batch"], "item": item["item"], "index": item.get("index"),
            "prompt": item["prompt"], "replies": item["replies"], "verdict": "ranked", "order": order,
            "labeler": labeler, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": item.get("model"), "sampling": item.get("sampling")}


def check_references(items: Iterable[dict[str, Any]], batch: Path) -> None:
    for n, item in enumerate(items):
        if not (isinstance(item.get("reference"), str) and item["reference"].strip()):
            raise UserError(f"{batch}: item {item.get('index', n)} has no reference answer to judge replies against; "
                            "sample the batch again with palm feedback sample (from data/sft, or a prompts .jsonl "
                            "whose records carry \"reference\")")


def simulate(items: list[dict[str, Any]], store: Any, labeler: str, noise: float, seed: int) -> tuple[int, int]:
    """Judge every item of a batch not yet judged by ``labeler`` in ``store`` (a
    :class:`~palm.apps.feedback.store.RankingsFile`), appending each judgement; returns
    ``(judged now, judged before)``."""
    done = {item for (item, who) in store.latest(items[0]["batch"]) if who == labeler}
    todo = [it for it in items if it["item"] not in done]
    for item in todo:
        store.append(judgement(item, labeler, noise, seed))
    return len(todo), len(items) - len(todo)


def run(args: argparse.Namespace, labeler_name: re.Pattern) -> int:
    """The command; ``labeler_name``: the names the page accepts, which a simulated labeler keeps to."""
    from palm.apps.feedback.store import RankingsFile, read_batch

    if not labeler_name.fullmatch(args.labeler):
        raise UserError(f"--labeler: {args.labeler!r}: use letters, digits and _.@- (up to 64 characters)")
    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise UserError(f"--noise: the std of the noise on a score in [0, 1]: must be >= 0, got {args.noise}")
    items = read_batch(args.batch)
    check_references(items, args.batch)
    store = RankingsFile(args.rankings)
    now, before = simulate(items, store, args.labeler, args.noise, args.seed)
    print(f"palm feedback: {args.labeler} (gold rule judge, noise {args.noise}, seed {args.seed}) judged {now} items "
          f"of {items[0]['batch']}" + (f" ({before} judged before, left as they are)" if before else "")
          + f" -> {store.path}", file=sys.stderr)
    return 0
