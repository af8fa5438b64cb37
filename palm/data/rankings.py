"""The ``rankings`` format: people's judgements of K sampled replies to one prompt, as
``palm feedback serve`` appends them to ``data/feedback/rankings.jsonl`` (one JSON object a line).

A judgement::

    {"format": "palm-rankings/1", "batch": "batch-1", "item": "<item id>", "index": 0,
     "prompt": [{"role": "user", "content": "…"}],          # the conversation, ending with a user turn
     "replies": ["…", "…", "…", "…"],                        # the K replies, in the batch's order
     "verdict": "ranked",                                     # ranked | all_bad | skip
     "order": [2, 0, 3, 1],                                   # ranked: reply indices, best first
     "labeler": "alice", "time": "2026-01-01T12:00:00Z",
     "model": {…}, "sampling": {…}}                           # copied from the batch item

``order`` lists every reply once, best first; an entry may be a list of indices tied at that
place (``[[0, 2], 1]``: 0 and 2 equally good, both better than 1). ``all_bad`` (no reply is
acceptable) and ``skip`` (no opinion) have ``order: null``.

Into preference pairs (the InstructGPT recipe, Ouyang et al. 2022, §3.5): each ranked judgement of
K replies gives every two replies at different places once, the better one chosen: K·(K−1)/2 pairs
for a full order, fewer with ties (tied replies give no pair). ``all_bad`` and ``skip`` give none
(counted ``dropped_unranked``): all-bad says nothing about which reply is better. Going back to
change a judgement appends a new one: a labeler's latest judgement of an item replaces the
earlier ones (``dropped_superseded``). Each labeler's judgement of an item gives its own pairs;
where two labelers agree, the second copy of a pair is a ``duplicate``.

Agreement between labelers (:func:`agreement`): over the items two labelers both ranked, the share
of reply pairs that both put in the same strict order (a pair tied by either is left out), the
pairwise agreement rate InstructGPT reports for its labelers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import reprlib
from collections import Counter
from typing import Any, Iterable, Iterator

FORMAT = "palm-rankings/1"
VERDICTS = ("ranked", "all_bad", "skip")


def is_ranking(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("replies"), list) and "verdict" in record


def loads(line: str) -> Any | None:
    """One line of a rankings file as JSON, or None where it is not: a line a killed server left
    half-written, or one nested deeper than the parser goes (100,000 ``[`` raise RecursionError,
    not ValueError). What a reader of the file (``palm feedback serve``'s page) calls per line, so
    that no line of the file can make it fail."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


# a bounded repr for error messages: a value in a judgement may be nested as deep as the JSON
# parser goes, and repr() of it recurses once a level
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 4, 32, 80, 80


def _short(value: Any) -> str:
    return _SHORT.repr(value)


def places(verdict: Any, order: Any, k: int) -> list[int] | None:
    """The place (0 = best) of each of ``k`` replies under ``order``, or None for a verdict
    without one; ``ValueError`` naming what is wrong with an impossible judgement."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {_short(verdict)}")
    if verdict != "ranked":
        if order is not None:
            raise ValueError(f"a {verdict} judgement has no order")
        return None
    if not isinstance(order, list) or not order:
        raise ValueError("order must be a non-empty list of reply indices, best first")
    place = [-1] * k
    for p, entry in enumerate(order):
        group = entry if isinstance(entry, list) else [entry]
        if not group:  # an empty tie group: a place no reply holds, a gap in 0..m (and no best reply)
            raise ValueError(f"order must not hold an empty group of tied replies, got {_short(order)}")
        for i in group:
            if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k) or place[i] >= 0:
                raise ValueError(f"order must list every reply index 0..{k - 1} exactly once, got {_short(order)}")
            place[i] = p
    if min(place) < 0:
        raise ValueError(f"order must list every reply index 0..{k - 1} exactly once, got {_short(order)}")
    return place


def ordered_pairs(place: list[int]) -> list[tuple[int, int]]:
    """``(better, worse)`` reply indices: every two replies at different places, once."""
    return [(a, b) if place[a] < place[b] else (b, a)
            for a, b in itertools.combinations(range(len(place)), 2) if place[a] != place[b]]


def judgement_key(record: dict) -> tuple:
    return (record.get("batch"), record.get("item"), record.get("labeler"))


def _scalar_key(record: dict) -> bool:
    """Whether the judgement's batch, item and labeler are plain values (a list there cannot key
    a dict, and its str() or repr() may recurse as deep as it is nested)."""
    return all(v is None or isinstance(v, (str, int, float)) for v in judgement_key(record))


@dataclasses.dataclass
class RankingStats:
    """What a reader saw in rankings files: for the prefs stage's metrics and its MLflow run."""

    judgements: int = 0  # latest judgements (one per labeler and item)
    ranked: int = 0
    all_bad: int = 0
    skipped: int = 0
    labelers: set = dataclasses.field(default_factory=set)
    batches: set = dataclasses.field(default_factory=set)
    orders: list = dataclasses.field(default_factory=list)  # (batch, item, labeler, places) of ranked ones

    def add(self, record: dict, place: list[int] | None) -> None:
        self.judgements += 1
        self.labelers.add(str(record.get("labeler")))
        self.batches.add(str(record.get("batch")))
        if place is None:
            self.all_bad += record["verdict"] == "all_bad"
            self.skipped += record["verdict"] == "skip"
        else:
            self.ranked += 1
            self.orders.append((*judgement_key(record), place))

    def metrics(self) -> dict[str, float | int]:
        rate, shared = agreement(self.orders)
        out = {"rankings": self.judgements, "rankings_ranked": self.ranked, "rankings_all_bad": self.all_bad,
               "rankings_skipped": self.skipped, "rankings_labelers": len(self.labelers),
               "rankings_batches": len(self.batches), "rankings_shared_items": shared}
        if rate is not None:
            out["rankings_agreement"] = rate
        return out


def latest(records: Iterable[Any], counts: Counter, stats: RankingStats | None = None) -> Iterator[Any]:
    """The records of one rankings file with each labeler's latest judgement of an item only (in
    the order the items were first judged); earlier ones count ``superseded``, and one whose
    batch, item or labeler is not a plain value (a list, an object) counts ``missing_field``.
    Records that are not objects pass through (the caller counts them)."""
    kept: dict[tuple, Any] = {}
    others = []
    for record in records:
        if not isinstance(record, dict):
            others.append(record)
            continue
        if not _scalar_key(record):
            counts["read"] += 1
            counts["missing_field"] += 1
            continue
        key = judgement_key(record)
        if key in kept:
            counts["read"] += 1  # the replaced judgement was read, and is not used
            counts["superseded"] += 1
        kept[key] = record
    yield from others
    for record in kept.values():
        if stats is not None and isinstance(record.get("replies"), list):
            try:
                stats.add(record, places(record.get("verdict"), record.get("order"), len(record["replies"])))
            except ValueError:
                pass  # counted as bad_order by the extractor
        yield record


def agreement(orders: Iterable[tuple]) -> tuple[float | None, int]:
    """``(rate, shared items)``: over every item two labelers both ranked, the share of reply pairs
    both put in the same strict order (pairs either tied are left out); None when no item was
    ranked by two labelers."""
    by_item: dict[tuple, dict[str, list[int]]] = {}
    for batch, item, labeler, place in orders:
        by_item.setdefault((batch, item), {})[labeler] = place
    same = total = shared = 0
    for labelers in by_item.values():
        if len(labelers) < 2:
            continue
        shared += 1
        for p, q in itertools.combinations(labelers.values(), 2):
            if len(p) != len(q):
                continue
            for a, b in itertools.combinations(range(len(p)), 2):
                if p[a] != p[b] and q[a] != q[b]:
                    total += 1
                    same += (p[a] < p[b]) == (q[a] < q[b])
    return (round(same / total, 4) if total else None), shared


def run_tags(meta: dict[str, Any]) -> dict[str, str]:
    """MLflow tags saying which human rankings a chat-data folder holds (its ``meta.json``; none
    without rankings): how many judgements, from which labelers, of which sampled batches."""
    feedback = meta.get("rankings")
    if not feedback:
        return {}
    return {"feedback.rankings": str(feedback["rankings"]), "feedback.labelers": ",".join(feedback["labelers"]),
            "feedback.batches": ",".join(feedback["batches"])}
