"""Atomic outputs: a writer killed half-way leaves the previous output (or none), never a torso."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from palm.core.io import atomic_dir, atomic_file


def test_exception_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "a").write_text("half")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "f.json") as f:
            f.write("{")
            raise RuntimeError("boom")
    assert not (tmp_path / "f.json").exists()


def test_sigkill_leaves_no_output(tmp_path):
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from palm.core.io import atomic_dir\n"
            f"with atomic_dir({str(tmp_path / 'out')!r}) as d:\n"
            f"    (d / 'part').write_text('x' * 1000); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()  # nothing at the output path for DVC to take as valid
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1
    with atomic_dir(tmp_path / "out") as d:  # the rerun cleans up after the killed run
        (d / "part").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
