"""Start training workers with ``torchrun`` and make sure none outlives the stage.

:func:`launch` writes the run's spec (plain JSON) to ``run_dir/spec.json`` and starts
``torchrun --standalone --nproc-per-node=N -m palm.train.launch ENTRY SPEC`` (for N = 1, the
worker alone: ``python -m palm.train.launch ENTRY SPEC``, a one-process world); each worker imports
``ENTRY`` (``"package.module:function"``, e.g. ``palm.train.pretrain:worker``) and calls it with the
spec. The launcher never imports an objective module: the entry point is an argument.

Errors: a worker that raises :class:`~palm.core.errors.UserError` writes its one-line message to
``run_dir/error.<rank>`` and exits 2; the launcher re-raises the first as a ``UserError``, so the
stage prints one line. Any other failure is a ``RuntimeError`` naming torchrun's exit code.

No orphans: every process of a launch (torchrun, the workers, and whatever they spawn, such as
``dist_checkpointing.save``'s forked write processes) carries the
environment variable ``PALM_RUN_MARKER=<run_dir>``. A tiny reaper process watches the launching
process and SIGKILLs every marked process as soon as the launcher dies, also when it is killed
with SIGKILL (it has no chance to clean up then). A new launch on the same ``run_dir`` first kills
marked leftovers (e.g. when the reaper itself was killed), so a rerun never races old workers on
the same checkpoint folder. The launcher cleans up the same way when torchrun ends.

Past one machine: with ``nodes > 1`` (a training section's ``nodes`` and ``rdzv_endpoint``) each
node runs the same stage command; its launcher starts ``torchrun --nnodes=N
--nproc-per-node=W/N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT`` and torchrun's own
rendezvous forms the world (the first launcher to bind the endpoint on its host serves the
store). The project folder must be on a filesystem every node sees (checkpoints are written by
all ranks into one folder; rank 0 writes ``result.json``). ``PALM_NODE_RANK`` (default 0; a
Slurm script sets it from ``SLURM_NODEID``) says which node is the stage's own: node 0 logs to
MLflow and writes the outputs, the others only train (:func:`launch` raises
:class:`OtherNodeDone` there when their processes end, and the stage exits 0 writing nothing).
``PALM_RDZV_ENDPOINT`` overrides ``rdzv_endpoint`` (a scheduler knows the first host only when
the job starts). Every launcher derives the rendezvous id from the run's spec, so nodes started
with different params or data never join one world.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from palm.core.errors import UserError
from palm.core.process import NODE_RANK_ENV, OtherNodeDone, default_threads, flush_denormals
from palm.core.quiet import quiet_known

MARKER_ENV = "PALM_RUN_MARKER"
RDZV_ENV = "PALM_RDZV_ENDPOINT"


def launch(entry: str, spec: dict[str, Any], cfg: Any, *, run_dir: Path,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``entry(spec)`` in the ``cfg.world_size`` processes of a training section ``cfg``
    (a :class:`palm.train.loop.TrainConfig`: its layout, ``threads``, ``nodes`` and
    ``rdzv_endpoint``); returns rank 0's ``run_dir/result.json``. On a node other than node 0
    it raises :class:`OtherNodeDone` once its processes finished (see the module docstring)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    node = node_rank(cfg.nodes)
    marker = str(run_dir) if node == 0 else f"{run_dir}#node{node}"
    kill_marked(marker)  # leftovers of a launch whose reaper was killed too
    spec = {**spec, "run_dir": str(run_dir)}
    spec_path = run_dir / "spec.json"
    spec_text = json.dumps(spec, indent=2)
    result = run_dir / "result.json"
    if node == 0:  # other nodes only train: node 0 owns the run folder's files
        spec_path.write_text(spec_text)
        result.unlink(missing_ok=True)
        for stale in run_dir.glob("error.*"):
            stale.unlink()
    else:
        spec_path = run_dir / f"spec.node{node}.json"
        spec_path.write_text(spec_text)
    per_node = cfg.world_size // cfg.nodes
    threads = cfg.threads or default_threads(per_node)
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    worker = ["-m", "palm.train.launch", entry, str(spec_path)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    if cfg.world_size == 1:  # nothing to rendezvous: the worker alone (torchrun would cost a process importing torch)
        cmd = [sys.executable, *worker]
    elif cfg.nodes == 1:
        cmd = [torchrun, "--standalone", f"--nproc-per-node={per_node}", *worker]
    else:
        # the same on every node started with the same params and data (the matmul peak is
        # each node's own measurement, for MFU)
        same = json.dumps({k: v for k, v in spec.items() if k != "peak_flops"}, sort_keys=True)
        run_id = hashlib.sha256(f"{entry} {same}".encode()).hexdigest()[:16]
        cmd = [torchrun, f"--nnodes={cfg.nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={rdzv_endpoint(cfg.rdzv_endpoint)}", f"--rdzv-id=palm-{run_id}",
               "--max-restarts=0", *worker]
    # the command is complete (a bad rdzv endpoint has raised) before the reaper starts: a launch
    # that fails here leaves no process behind
    reaper = subprocess.Popen([sys.executable, "-m", "palm.train.launch", "--reap", marker, str(os.getpid())],
                              env={k: v for k, v in full_env.items() if k != MARKER_ENV})
    full_env[MARKER_ENV] = marker
    try:
        code = subprocess.run(cmd, env=full_env).returncode
    finally:
        kill_marked(marker)
        reaper.terminate()
        reaper.wait()
    errors = sorted(run_dir.glob("error.*"))
    if errors:
        raise UserError(errors[0].read_text().strip())
    if code != 0:
        raise RuntimeError(f"training processes failed (torchrun exit {code}); see the log above")
    if node != 0:
        raise OtherNodeDone(f"node {node} of {cfg.nodes}: its training processes finished; node 0 "
                            f"writes the outputs and logs the run")
    if not result.is_file():
        raise RuntimeError(f"training processes ended without {result}; see the log above")
    return json.loads(result.read_text())


def node_rank(nodes: int) -> int:
    """This node's rank among ``nodes``: ``PALM_NODE_RANK`` (default 0)."""
    raw = os.environ.get(NODE_RANK_ENV, "0")
    if not raw.isdigit() or int(raw) >= nodes:
        raise UserError(f"{NODE_RANK_ENV}={raw!r}: must be a node rank 0..{nodes - 1} (the section's "
                        f"nodes is {nodes})")
    return int(raw)


def rdzv_endpoint(configured: str) -> str:
    """The c10d rendezvous endpoint ``HOST:PORT``: ``PALM_RDZV_ENDPOINT``, else ``configured``."""
    value = os.environ.get(RDZV_ENV) or configured
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"rdzv_endpoint {value!r}: a multi-node launch needs HOST:PORT (the training "
                        f"section's rdzv_endpoint, or {RDZV_ENV}), e.g. node0.cluster:29400")
    return value


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
    quiet_known()  # before the entry module imports megatron (its import-time warnings)
    flush_denormals()  # first, so the OpenMP threads torch starts inherit it
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
