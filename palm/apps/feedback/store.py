"""The files of a labelling session: a sampled batch (read only) and the rankings file, to which
every judgement is appended and synced to disk before the page is told it is saved.

The rankings file only grows: a changed judgement is a new line (the latest per labeler and item
counts, ``palm/data/rankings.py``), so a confirmed judgement is never rewritten. A server killed
while writing can leave a partial last line; it is ignored when read, and the next append starts
on a fresh line.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from palm.apps.feedback.sample import BATCH_FORMAT
from palm.core.errors import UserError
from palm.core.io import append_line
from palm.data import rankings


def read_batch(path: Path) -> list[dict[str, Any]]:
    """The items of a batch file (``palm feedback sample``), checked: one line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such batch file (make one with palm feedback sample)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ok = isinstance(item, dict) and (item.get("format") == BATCH_FORMAT and isinstance(item.get("batch"), str)
                  and isinstance(item.get("item"), str)
                  and isinstance(item.get("prompt"), list) and isinstance(item.get("replies"), list)
                  and len(item["replies"]) >= 2 and all(isinstance(r, str) for r in item["replies"]))
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            ok = False
        if not ok:
            raise UserError(f"{path}:{n}: not a batch item ({BATCH_FORMAT}: batch, item, prompt, at least 2 replies)")
        items.append(item)
    if not items:
        raise UserError(f"{path}: the batch holds no items")
    return items


KEYS = ("batch", "item", "labeler")  # what the page writes as text in every judgement


class RankingsFile:
    """``data/feedback/rankings.jsonl``: read whole, appended one synced line at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            # None: a line a killed server left half-written (never confirmed), or one nested deeper
            # than the parser goes; a record whose batch, item or labeler is not text is no judgement
            # the page made (they key the latest judgements), so neither can fail a request
            record = rankings.loads(line)
            if rankings.is_ranking(record) and all(isinstance(record.get(k), str) for k in KEYS):
                out.append(record)
        return out

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one synced line (:func:`palm.core.io.append_line`); servers of
        several labelers may share the file."""
        with self._lock:
            append_line(self.path, record)

    def latest(self, batch: str) -> dict[tuple[str, str], dict[str, Any]]:
        """``(item, labeler) -> latest judgement`` of the items of ``batch``."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for record in self.read():
            if record.get("batch") == batch:
                out[(record.get("item"), record.get("labeler"))] = record
        return out


def batch_agreement(latest: dict[tuple[str, str], dict[str, Any]], batch: str) -> dict[str, Any]:
    """Agreement between the labelers of ``batch`` (:func:`palm.data.rankings.agreement`)."""
    orders = []
    for (item, labeler), r in latest.items():
        try:
            place = rankings.places(r.get("verdict"), r.get("order"), len(r["replies"]))
        except ValueError:
            continue
        if place is not None:
            orders.append((batch, item, labeler, place))
    rate, shared = rankings.agreement(orders)
    return {"labelers": sorted({labeler for _, labeler in latest}), "shared_items": shared, "agreement": rate}
