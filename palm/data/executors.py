"""Where the data stages' datatrove pipelines run: this machine's processes, a Ray cluster or
Slurm job arrays.

A stage is a list of :class:`Step` s, each one datatrove pipeline over ``tasks`` ranks that run
one after the other (a step reads what the previous one wrote). Rank ``r`` always handles the
same slice of the input, so ``tasks`` alone fixes the output bytes: ``workers`` (how many ranks
run at once) and the executor only change the speed.

Each step logs under ``<work>/logs/<step>/`` (datatrove's per-rank logs, stats and completion
markers). The work folder is keyed by the stage's inputs and params (the caller chooses it), so
a rerun after a crash skips the ranks that finished, and a changed param starts afresh: datatrove's
markers alone do not know the params.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

from palm.core.config import check
from palm.core.errors import UserError
from palm.core.io import clean_stale_temps, discard_tree

Executor = Literal["local", "ray", "slurm"]


@dataclass(frozen=True)
class SlurmConfig:
    """``executor: slurm``: how each task's job is submitted (``sbatch`` arrays, one per step,
    each depending on the previous one)."""

    partition: str = ""  # required with executor slurm
    time: str = "04:00:00"  # per task
    cpus_per_task: int = 1  # CPUs each task's job asks for (sbatch --cpus-per-task)
    mem_per_cpu_gb: int = 2  # whole GB: sbatch refuses "2.0G"
    qos: str = ""  # "" = the partition's default
    sbatch_args: tuple[str, ...] = ()  # more sbatch options, "key=value" (e.g. "account=lm")
    env_command: str = ""  # run before each task; "" = activate this interpreter's virtualenv
    poll_s: float = 5.0  # how often the stage checks on its jobs

    def __post_init__(self) -> None:
        check(self.cpus_per_task >= 1, "slurm.cpus_per_task", "must be >= 1")
        check(self.mem_per_cpu_gb > 0, "slurm.mem_per_cpu_gb", "must be > 0")
        check(self.poll_s > 0, "slurm.poll_s", "must be > 0")
        for arg in self.sbatch_args:
            check("=" in arg or arg.isidentifier(), "slurm.sbatch_args", f"{arg!r}: write options as key=value")


@dataclass(frozen=True)
class ExecutorConfig:
    """The settings every data stage shares: where its pipeline runs and in how many pieces."""

    executor: Executor = "local"  # local (processes here) | ray | slurm
    tasks: int = 8  # ranks per step: fixes the output (its parts and their bytes)
    workers: int = 0  # ranks at once; 0 = all cores here (local), the cluster's CPUs (ray), no cap (slurm)
    ray_address: str = ""  # ray: a running cluster's address; "" = start a local Ray on this machine
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        check(self.tasks >= 1, "tasks", "must be >= 1")
        check(self.workers >= 0, "workers", "must be >= 0 (0 = all cores)")
        check(self.executor != "slurm" or bool(self.slurm.partition), "slurm.partition",
              "a partition is required with executor slurm (sinfo lists them)")


def output_settings(cfg: ExecutorConfig, speed_only: Sequence[str] = ()) -> dict:
    """``cfg``'s settings that change what a stage writes, as a dict (what its work folder is keyed
    by): all but where and with how many workers it runs, and the stage's own ``speed_only``."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if k not in ("executor", "workers", "ray_address", "slurm", *speed_only)}


class StepFailed(UserError):
    """A rank of a step failed or did not finish: the work folder is kept, so that a rerun resumes
    (a worker killed for memory, a node lost) after the ranks that finished."""


@dataclass
class Step:
    """One datatrove pipeline (a list of steps or ``f(data, rank, world_size)`` callables) over ``tasks`` ranks."""

    name: str
    pipeline: list
    tasks: int
    light: bool = False  # I/O-bound and cheap per document: run in this process on the local executor


@contextlib.contextmanager
def work_folder(work: Path | None, prefix: str) -> Iterator[Path]:
    """The folder a run of steps writes on the way: ``work`` (the caller keys it by its params, so
    a rerun finds it) or, when None, a temporary one. Removed on success and on a
    :class:`UserError` (bad settings or input: a rerun would fail again); kept when a rank died
    (:class:`StepFailed`) or the run was killed, so a rerun resumes after the ranks that finished."""
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)))
        work = Path(work)
        clean_stale_temps(work.parent, work.name)
        try:
            yield work
        except StepFailed:
            raise
        except UserError:
            discard_tree(work)
            raise
        discard_tree(work)


def run_steps(steps: Sequence[Step], cfg: ExecutorConfig, work: Path, *, progress: bool = False) -> None:
    """Run ``steps`` in order on ``cfg.executor``, with a progress bar of finished ranks per step
    (``progress``); raise :class:`StepFailed` naming the step and its logs when a rank failed."""
    work = Path(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    _quiet_logs()
    if cfg.executor == "slurm":
        _run_slurm(steps, cfg, work)
        return
    ray_started = cfg.executor == "ray" and _start_ray(cfg)
    try:
        for step in steps:
            executor = _executor(step, cfg, work)
            with _rank_bar(step, work, progress):
                try:
                    executor.run()
                except Exception as err:  # noqa: BLE001 - a rank raised: datatrove re-raises it here
                    first = str(err).splitlines()[0] if str(err) else ""
                    raise StepFailed(f"data step {step.name!r} failed ({type(err).__name__}: {first}); "
                                     f"its logs: {work / 'logs' / step.name}") from None
            _check_complete(executor, step, work)
    finally:
        if ray_started:
            import ray

            ray.shutdown()


def run_inline(pipeline: list, rank: int = 0, world_size: int = 1) -> list:
    """Rank ``rank`` of a pipeline in this process, without an executor (no logs, no markers):
    the documents that come out of its last step. For tools and tests on small inputs."""
    data = None
    for step in pipeline:
        data = step(data, rank, world_size)
    return list(data or [])


def _executor(step: Step, cfg: ExecutorConfig, work: Path):
    logs = str(work / "logs" / step.name)
    if cfg.executor == "local":
        # a light step costs less than starting a process pool for it (~2 s)
        workers = 1 if step.light else min(cfg.workers or os.cpu_count() or 1, step.tasks)
        # spawn, not fork: the stage process may hold threads (tokenizers, MLflow) a fork would copy
        return _QuietLocal(step.pipeline, tasks=step.tasks, workers=workers, logging_dir=logs, start_method="spawn")
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = min(cfg.workers or cpus, step.tasks)
    return _quiet_ray()(step.pipeline, tasks=step.tasks, workers=workers, logging_dir=logs,
                        cpus_per_task=1, mem_per_cpu_gb=0.5)


def _quiet(cls):
    """``cls`` with each task's console log at ERROR: datatrove prints a task's pipeline and
    stats at INFO on the console of the worker it calls local rank 0 (``local_rank`` serves only
    that). The task's log file under ``logs/`` keeps everything."""

    class Quiet(cls):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            try:
                return super()._run_for_rank(rank, 1, node_rank)
            finally:  # datatrove puts back a console logger at DEBUG after each task
                _console_warnings()

    Quiet.__name__ = Quiet.__qualname__ = f"Quiet{cls.__name__}"
    return Quiet


def _local_base():
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor


class _QuietLocal(_quiet(_local_base())):
    pass


def _quiet_ray():
    from datatrove.executor import RayPipelineExecutor

    return _quiet(RayPipelineExecutor)


def _start_ray(cfg: ExecutorConfig) -> bool:
    """Connect to ``ray_address``, or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - no cluster at the address, port in use: one clear line
        where = cfg.ray_address or "a local Ray"
        raise UserError(f"executor ray: could not start or reach {where} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check ray_address "
                        f"(`ray status --address {cfg.ray_address or 'auto'}`)") from None
    return True


def _check_complete(executor, step: Step, work: Path) -> None:
    missing = [r for r in range(step.tasks) if not executor.is_rank_completed(r)]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
        raise StepFailed(f"data step {step.name!r}: ranks {shown} did not finish; their logs: "
                        f"{work / 'logs' / step.name / 'logs'}")


@contextlib.contextmanager
def _rank_bar(step: Step, work: Path, progress: bool):
    """A bar of the step's finished ranks, counted from datatrove's completion markers (every
    executor writes them) by a thread while the step runs."""
    if not progress:
        yield
        return
    import threading

    from tqdm import tqdm

    done = work / "logs" / step.name / "completions"
    stop = threading.Event()
    with tqdm(total=step.tasks, desc=f"{step.name}", unit="rank") as bar:
        def follow() -> None:
            while not stop.wait(0.5):
                bar.n = len(list(done.glob("*"))) if done.is_dir() else 0
                bar.refresh()

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            bar.n = len(list(done.glob("*"))) if done.is_dir() else 0
            bar.refresh()


def _quiet_logs() -> None:
    """datatrove logs every task's start and stats at INFO through loguru: warnings only on
    the console, here and (``LOGURU_LEVEL``, read when loguru is imported) in the processes
    the executors start; the per-rank log files keep everything."""
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    _console_warnings()


def _console_warnings() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", colorize=False)


# ----------------------------------------------------------------------------- Slurm


def _run_slurm(steps: Sequence[Step], cfg: ExecutorConfig, work: Path) -> None:
    """Submit every step as an ``sbatch`` array depending on the previous one, then wait for the
    last; a job that ends with ranks unfinished is one clear error."""
    import shutil

    from datatrove.executor import SlurmPipelineExecutor

    if shutil.which("sbatch") is None:
        raise UserError("executor slurm: `sbatch` not found on PATH; run the stage on a Slurm login node "
                        "or choose executor local or ray")
    s = cfg.slurm
    env_command = s.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}"
    executors, previous = [], None
    for step in steps:
        ex = SlurmPipelineExecutor(
            step.pipeline, tasks=step.tasks, time=s.time, partition=s.partition,
            cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb, workers=cfg.workers or -1,
            job_name=f"palm-{step.name}", qos=s.qos, env_command=env_command,
            sbatch_args=dict(a.split("=", 1) if "=" in a else (a, "") for a in s.sbatch_args),
            depends=previous, logging_dir=str(work / "logs" / step.name),
            slurm_logs_folder=str(work / "logs" / step.name / "slurm"), requeue=False, mail_type="NONE")
        executors.append(ex)
        previous = ex
    try:
        executors[-1].run()  # submits its dependencies first
    except subprocess.CalledProcessError as err:
        raise UserError(f"executor slurm: sbatch failed ({(err.output or b'').decode(errors='replace').strip() or err}); "
                        f"check slurm.partition and slurm.sbatch_args") from None
    ids = [str(ex.job_id) for ex in executors if ex.job_id not in (None, -1)]
    while ids and (queued := _queued(ids)):
        if any("DependencyNeverSatisfied" in reason for reason in queued.values()):
            # a step failed: the later arrays would wait for it forever
            subprocess.run(["scancel", *ids], capture_output=True)
            break
        time.sleep(s.poll_s)
    for ex, step in zip(executors, steps):
        _check_complete(ex, step, work)


def _queued(ids: list[str]) -> dict[str, str]:
    """The jobs of ``ids`` still in the queue, with the reason they wait (``squeue``)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(ids)], capture_output=True, text=True)
    return dict((line.split(" ", 1) + [""])[:2] for line in out.stdout.splitlines() if line.strip())


def step_counts(logs: Path) -> Counter:
    """Every counter the steps kept (``stat_update``), summed over steps and ranks, from
    datatrove's per-rank stats files."""
    total: Counter[str] = Counter()
    for path in sorted(logs.glob("*/stats/*.json")):
        for step in json.loads(path.read_text()):
            for label, value in step.get("stats", {}).items():
                total[label] += value.get("total", 0) if isinstance(value, dict) else value
    return total
