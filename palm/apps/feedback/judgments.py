"""The judgments file of ``palm feedback compare`` (its format: :mod:`palm.eval.human`): read
whole, appended one synced line at a time, as ``store.py`` keeps the rankings.

One difference: the rankings reader skips any unreadable line, while a judgments file must hold
judgements only, but for a partial last line (:func:`palm.eval.human.read_judgments`). So an
append first cuts off a partial last line a killed server left (it was never confirmed), instead
of starting after it on a fresh line.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

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
        """Append ``record`` as one line and fsync it (and, for a new file, its folder), holding an
        exclusive lock on the file (servers of several labelers may share it)."""
        import fcntl

        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a partial line from a killed run
                    os.ftruncate(fd, _last_line_start(fd, size))
                while line:
                    line = line[os.write(fd, line):]
                os.fsync(fd)
            finally:
                os.close(fd)  # (releases the lock)
            if new:
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _last_line_start(fd: int, size: int, block: int = 1 << 16) -> int:
    """The offset just after the file's last newline (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0
