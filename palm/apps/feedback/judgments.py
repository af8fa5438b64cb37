"""The judgments file of ``palm feedback compare`` (its format: :mod:`palm.eval.human`): read
whole, appended one synced line at a time, as ``store.py`` keeps the rankings.

One difference: the rankings reader skips any unreadable line, while a judgments file must hold
judgements only, but for a partial last line (:func:`palm.eval.human.read_judgments`). So an
append first cuts off a partial last line a killed server left (it was never confirmed), instead
of starting after it on a fresh line.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from palm.core.io import append_line
from palm.eval.human import latest, read_judgments


class JudgmentsFile:
    """``data/judgments/judgments.jsonl``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def mine(self, comparison: str, labeler: str) -> dict[int, dict[str, Any]]:
        """``item index -> labeler's latest judgement`` of the items of ``comparison``."""
        return {index: r for (c, index, who), r in latest(read_judgments(self.path)).items()
                if c == comparison and who == labeler}

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one synced line, a partial last line cut off first
        (:func:`palm.core.io.append_line`); servers of several labelers may share the file."""
        with self._lock:
            append_line(self.path, record, cut_partial=True)
