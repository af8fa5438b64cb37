"""The training loop every training stage shares: train, evaluate, log, checkpoint, resume, export.

An objective module hands the loop an :class:`Objective` in each worker process: what one step
does (pretrain, sft and reward: one optimizer step of a :class:`Job`'s engine, :class:`Supervised`;
ppo: a rollout and its update, :mod:`palm.train.rlhf`), its curve's metrics and the state a resumed
run needs beyond its engines. :func:`run` does everything else, once. The loop never imports an
objective.

Resume that tells the truth:

* A checkpoint is resumed only when its run identity (the job's ``identity``: model, optimizer,
  seed, steps, global batch, dtype, the content hash of the data, the code version; not the
  TP/PP/DP layout, not the intervals) equals this run's; otherwise the old checkpoints are
  removed and training starts fresh.
* Whatever the reports need is kept with the checkpoint (``curve.csv`` and the objective's
  :meth:`~Objective.files` beside it; timing, the last metrics and the objective's
  :meth:`~Objective.state` in its ``palm.json``), because DVC deletes a stage's declared
  outputs before it reruns it (``dvc repro -f``). A resumed run, finished or not, rebuilds the
  same ``curve.csv`` and result as an uninterrupted one.
* An unreadable newest checkpoint falls back to the one before it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from palm.core.config import check, from_dict, to_dict
from palm.core.errors import UserError
from palm.model.lora import LoRAConfig
from palm.model.network import ModelConfig, PaLM
from palm.train.engine import Batch, ChunkFactory, Engine, ForwardStep, OptimConfig

KILL_ENV = "PALM_TEST_SIGKILL_AFTER_CHECKPOINT"  # fault injection for the resume tests


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What every training section of params.yaml has (``pretrain``; later ``sft``, ``reward``)."""

    tensor_parallel: int = 1  # TP degree: query heads, SwiGLU and vocabulary split this many ways
    pipeline_parallel: int = 1  # PP degree: blocks split into this many stages (1F1B schedule)
    data_parallel: int = 1  # DP degree: replicas, each with its own micro-batches
    virtual_stages: int = 1  # >1: interleaved 1F1B with this many model chunks per PP rank
    train_steps: int = 300  # optimizer steps
    micro_batch_size: int = 8  # sequences per micro-batch
    num_microbatches: int = 1  # micro-batches per optimizer step per DP rank (grad accumulation)
    # parameter dtype: auto (bf16 where the hardware runs it natively, else fp32; see
    # palm/train/metrics.py), bf16 (megatron mixed precision: fp32 main weights), or fp32
    dtype: str = "auto"
    log_interval: int = 10  # steps per curve.csv row / MLflow point
    eval_interval: int = 100  # steps between validations (and at the end)
    eval_batches: int = 4  # micro-batches per DP rank in one validation
    checkpoint_interval: int = 100  # steps between checkpoints (and at the end)
    seed: int = 1234  # initial weights and data order
    threads: int = 0  # torch threads per process; 0 = OMP_NUM_THREADS if set, else cores / processes
    # machines the processes are spread over (world_size / nodes each); > 1: every node runs the
    # stage with PALM_NODE_RANK set, over a shared project folder (palm/train/launch.py)
    nodes: int = 1
    rdzv_endpoint: str = ""  # nodes > 1: torchrun's c10d rendezvous HOST:PORT (PALM_RDZV_ENDPOINT overrides)
    optim: OptimConfig = OptimConfig()
    # LoRA adapters (palm/model/lora.py: rank, alpha, dropout, targets): train them alone on the
    # frozen parent; null: full fine-tuning. The export merges them (plain weights)
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "data_parallel", "virtual_stages",
                     "train_steps", "micro_batch_size", "num_microbatches", "log_interval",
                     "eval_interval", "eval_batches", "checkpoint_interval", "nodes"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.dtype in ("auto", "fp32", "bf16"), "dtype",
              f"must be auto, fp32 or bf16, got {self.dtype!r}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(self.world_size % self.nodes == 0, "nodes",
              f"the {self.world_size} processes (tensor x pipeline x data parallel) cannot be split "
              f"evenly over {self.nodes} nodes")
        check(self.virtual_stages == 1 or self.pipeline_parallel > 1, "virtual_stages",
              "virtual stages need pipeline_parallel > 1")
        for name in ("num_microbatches", "eval_batches"):
            check(self.virtual_stages == 1 or getattr(self, name) % self.pipeline_parallel == 0, name,
                  "interleaved 1F1B needs it divisible by pipeline_parallel")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def global_batch(self) -> int:
        return self.data_parallel * self.num_microbatches * self.micro_batch_size

    def identity(self, dtype: str) -> dict[str, Any]:
        """The part of a run's identity this section decides: not the layout, not the intervals."""
        return {"optim": to_dict(self.optim), "seed": self.seed, "train_steps": self.train_steps,
                "global_batch": self.global_batch, "micro_batch_size": self.micro_batch_size,
                "dtype": dtype, **({"lora": to_dict(self.lora)} if self.lora is not None else {})}


def worker_groups(cfg: TrainConfig) -> ContextManager[None]:
    """What a training worker runs in: its generators seeded with ``cfg.seed``, the process
    groups of ``cfg``'s layout up, torn down when the body ends."""
    from palm.model import parallel

    return parallel.process_groups(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.data_parallel,
                                   cfg.virtual_stages, seed=cfg.seed)


def code_version(*files: str) -> str:
    """sha256 of the sources (paths under ``palm/``) that define a computation; a changed model,
    engine or objective starts fresh rather than resuming a checkpoint made by other code."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in ("model/network.py", "model/parallel.py", "model/lora.py", "train/engine.py", "train/optim.py", *files):
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class RunPaths:
    checkpoints: Path | None  # checkpoints of this stage (resume), kept across DVC reruns; None: none kept
    reports: Path  # reports/<stage>/ (curve.csv)
    run_dir: Path | None = None  # scratch of the launch (spec, result, dataset index cache); rank 0 writes result.json
    peak_flops: float = math.nan  # measured matmul peak for MFU

    @classmethod
    def of(cls, spec: dict[str, Any]) -> "RunPaths":
        """The paths of a launch spec (``checkpoints``, ``reports``, ``run_dir``, ``peak_flops``)."""
        return cls(checkpoints=Path(spec["checkpoints"]), reports=Path(spec["reports"]),
                   run_dir=Path(spec["run_dir"]), peak_flops=spec.get("peak_flops", math.nan))


@dataclasses.dataclass
class Progress:
    """Where a run stands, for :meth:`Objective.result`."""

    step: int  # steps done
    resumed_from: int  # the step of the checkpoint the run resumed from (0: it started fresh)
    seconds: float  # time inside the objective's steps, over all runs of this training
    steps_timed: int  # steps those seconds cover
    val: dict[str, float] | None  # the last validation's metrics (None: the objective validates nothing)
    last: dict[str, float]  # the last curve row's metrics
    peak_flops: float  # the matmul peak measured when the training started (MFU)
    checkpoint: Path | None  # the newest checkpoint


class Objective:
    """One objective's training, as :func:`run` drives it in every worker process: what a step
    does, what its curve shows and what a resumed run needs beyond the checkpointed engines.

    The loop owns the rest, once for every objective: resume (run identity, fallback to an older
    checkpoint), ``curve.csv`` and its rows kept with each checkpoint, the checkpoint cadence, the
    kill hook of the resume tests, the progress bar and ``result.json``. A new objective is one
    module that subclasses this and hands an instance to :func:`run`."""

    stage: str  # the stage name (progress bar, messages, MLflow)
    cfg: TrainConfig  # steps and intervals
    identity: dict[str, Any]  # what must match for a checkpoint to be resumed
    engine: Engine  # the trained engine: the checkpoint's main one (export loads it)
    others: dict[str, Engine] = {}  # engines saved in the same checkpoint (e.g. PPO's critic)
    columns: tuple[str, ...] = ("loss",)  # the step metrics curve.csv shows (means over a log interval)
    validated: tuple[str, ...] = ()  # of those, the ones validation also reports (val_<m> columns)
    finite: tuple[str, ...] = ("loss",)  # metrics that must stay finite (else a one-line error)
    shown: tuple[str, ...] = ("loss",)  # metrics the progress bar (or, off a terminal, a log line) shows
    tokens_per_step: int = 0  # tokens one step processes (all DP ranks): tokens_per_s and mfu columns
    flops_per_token: float = math.nan

    def step(self, step: int) -> dict[str, float]:
        """Train step ``step`` (0-based); its metrics, the same on every rank."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation metrics (called every ``cfg.eval_interval`` steps when ``validated``)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """JSON state saved with each checkpoint, beside the engines."""
        return {}

    def restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        """After a resume: this objective's :meth:`state` and the checkpoint folder (its :meth:`files`)."""

    def files(self) -> dict[str, str]:
        """Text files kept with each checkpoint (rank 0), e.g. logged samples."""
        return {}

    def result(self, progress: Progress) -> dict[str, Any]:
        """The result of the training (rank 0 writes it to ``result.json``)."""
        raise NotImplementedError


FRESH: dict[str, Any] = {"train_seconds": 0.0, "steps_timed": 0, "val": None, "last": None}
LAST = ("lr", "grad_norm")  # step metrics a curve row takes from the last step of its interval, not the mean


def run(obj: Objective, paths: RunPaths) -> dict[str, Any]:
    """Train ``obj`` to ``obj.cfg.train_steps`` steps, resuming from ``paths.checkpoints`` when it
    holds this run's checkpoint; returns the result (rank 0 also writes it to ``run_dir/result.json``)."""
    from tqdm import tqdm

    from palm.train import checkpoint as ckpt
    from palm.train.metrics import Curve

    cfg = obj.cfg
    rank0 = torch.distributed.get_rank() == 0
    step, state, rows = 0, dict(FRESH), []
    if paths.checkpoints is not None:
        step, state, rows, restored = resume(obj.engine, paths.checkpoints, obj.identity, obj.stage, rank0, obj.others)
        if restored is not None:
            obj.restore(state.pop("objective", {}), restored)
    resumed = step
    # the result's MFU uses the peak measured when the run started, so a resumed run reports the same
    peak = state.setdefault("peak_flops", paths.peak_flops)
    columns = ("step", *obj.columns, *(f"val_{m}" for m in obj.validated), *(m for m in LAST if m not in obj.columns),
               *(("tokens_per_s", "mfu") if obj.tokens_per_step else ()))
    curve = Curve(paths.reports / "curve.csv", columns, rows) if rank0 else None
    bar = tqdm(total=cfg.train_steps, initial=step, desc=obj.stage, unit="step", disable=not rank0 or None,
               dynamic_ncols=True)
    window: list[dict[str, float]] = []
    t_window = 0.0
    while step < cfg.train_steps:
        t0 = time.perf_counter()
        stats = obj.step(step)
        took = time.perf_counter() - t0  # time inside the step only
        t_window += took
        state["train_seconds"] += took
        state["steps_timed"] += 1
        window.append(stats)
        step += 1
        for m in obj.finite:
            if not math.isfinite(stats[m]):
                raise UserError(f"{m} became {stats[m]} at step {step}; lower {obj.stage}.optim.lr")
        evaluated = bool(obj.validated) and (step % cfg.eval_interval == 0 or step == cfg.train_steps)
        if evaluated:
            state["val"] = obj.validate()
        if step % cfg.log_interval == 0 or step == cfg.train_steps:
            # a column some steps do not measure (PPO's probe) averages the steps that did; none: empty
            row = {"step": step, **{m: sum(w[m] for w in window if m in w) / sum(m in w for w in window)
                                    for m in obj.columns if any(m in w for w in window)},
                   **{m: window[-1][m] for m in LAST}}
            if obj.tokens_per_step:
                tps = len(window) * obj.tokens_per_step / max(t_window, 1e-9)
                row.update(tokens_per_s=tps, mfu=tps * obj.flops_per_token / paths.peak_flops)
            if evaluated:
                row.update({f"val_{m}": state["val"][m] for m in obj.validated})
            state["last"] = {k: v for k, v in row.items() if k != "step"}
            if rank0:
                curve.append(row)  # the stage process logs it to MLflow (Tracker.follow)
                shown = {m: f"{row[m]:.4g}" for m in (*obj.shown, *(("tokens_per_s",) if obj.tokens_per_step else ()))}
                bar.set_postfix(shown)
                if bar.disable:  # off a terminal (DVC, Prefect logs): a line per logged row
                    print(f"{obj.stage}: step {step}/{cfg.train_steps} "
                          + " ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
            window, t_window = [], 0.0
        bar.update(1)
        if paths.checkpoints is not None and (step % cfg.checkpoint_interval == 0 or step == cfg.train_steps):
            files = {"curve.csv": curve.text(), **obj.files()} if rank0 else None
            ckpt.save(obj.engine, paths.checkpoints, step=step, others=obj.others, files=files,
                      meta={"run": obj.identity, "loop": {**state, "objective": obj.state()}})
            if os.environ.get(KILL_ENV) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if obj.validated and state["val"] is None:  # a checkpoint from before this loop kept no metrics
        state["val"] = obj.validate()
    result = obj.result(Progress(
        step=step, resumed_from=resumed, seconds=state["train_seconds"], steps_timed=state["steps_timed"],
        val=state["val"], last=state["last"] or {}, peak_flops=peak,
        checkpoint=ckpt.latest(paths.checkpoints) if paths.checkpoints is not None else None))
    if rank0 and paths.run_dir is not None:
        (Path(paths.run_dir) / "result.json").write_text(json.dumps(result, indent=2))
    return result




@dataclasses.dataclass
class Job:
    """What a language-model objective (pretrain, sft, reward) hands :func:`train` in each worker
    process: its model, config, forward step, data and run identity."""

    stage: str  # the stage name (progress bar, messages, MLflow)
    model: ModelConfig
    cfg: TrainConfig
    dtype: torch.dtype  # the resolved parameter dtype
    forward_step: ForwardStep
    train_batches: Callable[[int], list[Batch]]  # step -> this DP rank's micro-batches
    valid_batches: list[Batch]  # this DP rank's validation micro-batches
    identity: dict[str, Any]  # what must match for a checkpoint to be resumed
    tokens_per_step: int  # tokens one optimizer step processes (all DP ranks), for tokens/s and MFU
    chunk: ChunkFactory = PaLM
    # every micro-batch's padded length (default model.seq_len); fixed for a run, because pipeline
    # stages exchange buffers of one shape, but chat data shorter than the context pads less
    seq_len: int | None = None
    # called before resuming: e.g. load the parent stage's export and measure it (the returned
    # metrics join the result, e.g. base_val_loss); a resumed checkpoint then overwrites the weights
    init_weights: Callable[[Engine], dict[str, Any] | None] | None = None
    curve_metrics: tuple[str, ...] = ("loss",)  # train metrics in curve.csv (val_<m> beside them)
    perplexity: bool = True  # report val_perplexity = exp(val_loss) (language-model objectives)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more result fields
    lora_trainable: tuple[str, ...] = ()  # with cfg.lora: base parameters that train too (a reward head)


class Supervised(Objective):
    """A :class:`Job`'s objective: one optimizer step of its engine over the step's batches, and
    validation on its held-out batches."""

    def __init__(self, job: Job):
        cfg = job.cfg
        self.job, self.stage, self.cfg, self.identity = job, job.stage, cfg, job.identity
        self.engine = Engine(job.model, cfg.optim, forward_step=job.forward_step, chunk=job.chunk,
                             train_steps=cfg.train_steps, micro_batch_size=cfg.micro_batch_size,
                             num_microbatches=cfg.num_microbatches, seq_len=job.seq_len, dtype=job.dtype,
                             seed=cfg.seed, lora=cfg.lora, lora_trainable=job.lora_trainable)
        self.columns = self.validated = job.curve_metrics
        self.tokens_per_step = job.tokens_per_step
        self.flops_per_token = job.model.flops_per_token(job.seq_len)
        self.extra = dict(job.extra)
        if job.init_weights is not None:
            self.extra.update(job.init_weights(self.engine) or {})

    def step(self, step: int) -> dict[str, float]:
        return self.engine.train_step(self.job.train_batches(step))

    def validate(self) -> dict[str, float]:
        return self.engine.evaluate(self.job.valid_batches)

    def result(self, progress: Progress) -> dict[str, Any]:
        from palm.train.metrics import dtype_name

        tps = (progress.steps_timed * self.tokens_per_step / progress.seconds if progress.steps_timed
               else float("nan"))
        val = progress.val
        result = {"final_train_loss": progress.last.get("loss", float("nan")),
                  "val_loss": val["loss"], **{f"val_{k}": v for k, v in val.items() if k != "loss"},
                  "tokens_per_s": tps, "mfu": tps * self.flops_per_token / progress.peak_flops,
                  "peak_flops": progress.peak_flops, "flops_per_token": self.flops_per_token,
                  "params": self.job.model.num_params(), "steps": progress.step,
                  "resumed_from_step": progress.resumed_from, "tokens_seen": progress.step * self.tokens_per_step,
                  "dtype": dtype_name(self.job.dtype), "checkpoint": str(progress.checkpoint), **self.extra}
        if self.job.perplexity:
            result["val_perplexity"] = math.exp(min(val["loss"], 50.0))
        return result


def train(job: Job, paths: RunPaths) -> dict[str, Any]:
    """Train ``job`` to ``cfg.train_steps`` (resuming when possible); returns the result (and rank
    0 writes it to ``run_dir/result.json``)."""
    return run(Supervised(job), paths)


def resume(engine: Engine, root: Path, identity: dict[str, Any], stage: str, rank0: bool,
           others: dict[str, Engine] | None = None
           ) -> tuple[int, dict[str, Any], list[dict[str, str]], Path | None]:
    """Load the newest readable checkpoint of this run: ``(step, loop state, curve rows, its
    folder)``. Checkpoints of another run are removed; with none usable, a fresh state (and no
    folder). ``others``: engines saved in the same checkpoint (``checkpoint.save``'s ``others``)."""
    from palm.train import checkpoint as ckpt
    from palm.train.metrics import read_curve

    found = ckpt.candidates(root)
    if not found:
        return 0, dict(FRESH), [], None
    first_error: UserError | None = None
    for path in found:
        try:
            meta = ckpt.check_checkpoint(path)
        except UserError as err:
            first_error = first_error or err
            continue
        if meta.get("run") != identity:
            torch.distributed.barrier()
            if rank0:
                print(f"{stage}: {path} belongs to a different run (config, data or code changed); "
                      "starting fresh", file=sys.stderr)
                for old in (*root.glob("step_*"), *root.glob(".step_*")):
                    shutil.rmtree(old, ignore_errors=True)
                (root / "latest").unlink(missing_ok=True)
            torch.distributed.barrier()
            return 0, dict(FRESH), [], None
        try:
            ckpt.load(engine, path, others)
        except UserError as err:
            first_error = first_error or err
            continue
        if first_error is not None and rank0:
            print(f"{stage}: {first_error}; fell back to {path}", file=sys.stderr)
        if rank0:
            print(f"{stage}: resumed from {path} (step {meta['step']})", file=sys.stderr)
        curve = path / "curve.csv"
        rows = read_curve(curve.read_text()) if curve.is_file() else []
        return int(meta["step"]), {**FRESH, **meta.get("loop", {})}, rows, path
    raise first_error


def export(checkpoint: Path, out_dir: Path, extra: dict[str, Any], chunk: ChunkFactory = PaLM) -> dict[str, Any]:
    """Load ``checkpoint`` at TP=1, PP=1 in this process and write safetensors + config.json. A
    LoRA run's adapters are merged into the weights: the export is a plain model."""
    from palm.model import lora, parallel, weights
    from palm.train import checkpoint as ckpt

    meta = ckpt.check_checkpoint(checkpoint)
    model_cfg = from_dict(ModelConfig, meta["run"]["model"], "model")
    with parallel.process_groups():
        model = chunk(model_cfg, parallel.megatron_config(model_cfg), pre_process=True,
                      post_process=True, layers=list(range(model_cfg.n_layers)), seed=0)
        if meta.get("lora") is not None:  # the checkpoint holds adapters: load them, then fold them in
            lora.apply([model], from_dict(LoRAConfig, meta["lora"], "lora"), seed=0)
        ckpt.load_model([model], checkpoint)
        lora.merge(model)
        config = {"model": to_dict(model_cfg), "tokenizer_sha256": meta["run"]["tokenizer_sha256"],
                  "step": meta["step"], "format": "palm-rlhf/1", **extra}
        weights.export_safetensors(model, out_dir, config)
    return config
