"""Start training workers with ``torchrun`` and make sure none outlives the stage.

:func:`launch` writes the run's spec (plain JSON) to ``run_dir/spec.json`` and starts
``torchrun --standalone --nproc-per-node=N -m palm.train.launch ENTRY SPEC`` (for N = 1, the
worker alone: ``python -m palm.train.launch ENTRY SPEC``, a one-process world); each worker imports
``ENTRY`` (``"package.module:function"``, e.g. ``palm.train.pretrain:worker``) and calls it with the
spec. The launcher never imports an objective module: the entry point is an argument.

Errors: a worker that raises :class:`~palm.errors.UserError` writes its one-line message to
``run_dir/error.<rank>`` and exits 2; the launcher re-raises the first as a ``UserError``, so the
stage prints one line. Any other failure is a ``RuntimeError`` naming torchrun's exit code.

No orphans: every process of a launch (torchrun, the workers, and whatever they spawn, such as
``dist_checkpointing.save``'s forked write processes) carries the
environment variable ``PALM_RUN_MARKER=<run_dir>``. A tiny reaper process watches the launching
process and SIGKILLs every marked process as soon as the launcher dies, also when it is killed
with SIGKILL (it has no chance to clean up then). A new launch on the same ``run_dir`` first kills
marked leftovers (e.g. when the reaper itself was killed), so a rerun never races old workers on
the same checkpoint folder. The launcher cleans up the same way when torchrun ends.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from palm.errors import UserError

MARKER_ENV = "PALM_RUN_MARKER"
_QUIET = ",".join(f"ignore:{m}:UserWarning" for m in (
    "Transformer Engine and Apex", "Apex is not installed", "full scope is deprecated"))


def launch(entry: str, spec: dict[str, Any], *, world_size: int, run_dir: Path, threads: int = 0,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``entry(spec)`` in ``world_size`` torchrun processes; returns rank 0's
    ``run_dir/result.json``."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = str(run_dir)
    kill_marked(marker)  # leftovers of a launch whose reaper was killed too
    spec = {**spec, "run_dir": str(run_dir)}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    for stale in run_dir.glob("error.*"):
        stale.unlink()
    threads = threads or default_threads(world_size)
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": _QUIET, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    reaper = subprocess.Popen([sys.executable, "-m", "palm.train.launch", "--reap", marker, str(os.getpid())],
                              env={k: v for k, v in full_env.items() if k != MARKER_ENV})
    full_env[MARKER_ENV] = marker
    worker = ["-m", "palm.train.launch", entry, str(spec_path)]
    if world_size == 1:  # nothing to rendezvous: the worker alone (torchrun would cost a process importing torch)
        cmd = [sys.executable, *worker]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={world_size}",
               *worker]
    try:
        code = subprocess.run(cmd, env=full_env).returncode
    finally:
        kill_marked(marker)
        reaper.terminate()
        reaper.wait()
    errors = sorted(run_dir.glob("error.*"))
    if errors:
        raise UserError(errors[0].read_text().strip())
    if code != 0 or not result.is_file():
        raise RuntimeError(f"training processes failed (torchrun exit {code}); see the log above")
    return json.loads(result.read_text())


def default_threads(processes: int = 1) -> int:
    """Torch threads per process when a config says 0: ``OMP_NUM_THREADS`` where the environment
    sets it (e.g. a test suite running several files at once on 2 cores: two OpenMP pools of
    two threads each on 2 cores ran the e2e pretrain 2.5x slower than one process alone), else
    the cores shared out between the ``processes``."""
    try:
        forced = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        forced = 0
    return forced if forced >= 1 else max(1, (os.cpu_count() or 1) // processes)


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment has ``PALM_RUN_MARKER=<marker>`` (Linux ``/proc``)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(marker: str) -> None:
    for pid in marked_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reap(marker: str, parent: int) -> None:
    """Wait for ``parent`` to die (it is re-parented away from us), then kill the run's processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the launcher's own clean exit
    while os.getppid() == parent:
        time.sleep(0.2)
    kill_marked(marker)


def _worker(entry: str, spec_path: Path) -> int:
    """One torchrun process: call ``entry(spec)``; a UserError becomes ``run_dir/error.<rank>``."""
    spec = json.loads(spec_path.read_text())
    module, _, function = entry.partition(":")
    try:
        getattr(importlib.import_module(module), function)(spec)
    except UserError as err:  # the stage re-raises it as its one-line error
        (Path(spec["run_dir"]) / f"error.{os.environ.get('RANK', '0')}").write_text(str(err))
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--reap":
        _reap(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(_worker(sys.argv[1], Path(sys.argv[2])))
