"""Atomic outputs: write to a temporary sibling, then rename, so a stage killed half-way never
leaves a path that DVC (or the next stage) would take as a valid output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path``.
    Temporaries that a killed earlier run left beside ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard_tree(path: str | Path) -> None:
    """Remove folder ``path`` so that a kill midway leaves either all of it or none under its name:
    renamed first (``.<name>.old-<pid>``, which :func:`clean_stale_temps` removes), then deleted.
    A half-deleted work folder must never pass for a resumable one."""
    path = Path(path)
    if not path.exists():
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    _remove(old)


def remove_if_empty(folder: str | Path) -> None:
    """Remove ``folder`` when it exists and is empty (a parent of per-run work folders)."""
    with contextlib.suppress(OSError):
        Path(folder).rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def files_sha256(folder: str | Path, names: Iterable[str] | None = None) -> str:
    """Content hash of files in ``folder``: each relative name, then its bytes, in the order of
    ``names`` (default: every file below ``folder``, sorted). A run's identity uses it for its data
    and its parent model, so new content under the same path trains afresh instead of resuming."""
    import hashlib

    folder = Path(folder)
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        with (folder / name).open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def clean_stale_temps(parent: str | Path, name: str) -> None:
    """Remove temporaries left by a killed run of an output called ``name`` under ``parent``."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(f".{name}.tmp-*"):
            _remove(p)
        for p in parent.glob(f".{name}.old-*"):
            _remove(p)


def append_line(path: Path, record: Any, *, cut_partial: bool = False) -> None:
    """Append ``record`` as one JSON line and fsync it (and, for a new file, its folder), holding
    an exclusive lock on the file (several processes may share it). A partial last line a killed
    writer left is cut off (``cut_partial``: it was never confirmed) or closed with a newline."""
    import fcntl

    path = Path(path)
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a partial line from a killed run
            if cut_partial:
                os.ftruncate(fd, _last_line_start(fd, size))
            else:
                line = b"\n" + line
        while line:
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)  # (releases the lock)
    if new:  # the file's name is on disk too
        fd = os.open(path.parent, os.O_RDONLY)
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
