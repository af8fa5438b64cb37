"""What every stage command line does around its library call, written once.

``run_stage`` parses ``--params`` and the stage's own path arguments, loads the stage's config
strictly, opens an MLflow run (params, git commit, DVC md5 of each dependency and the run that
produced it: :meth:`~palm.ops.tracking.Tracker.link_inputs`), calls the
stage, writes ``reports/<stage>/metrics.json`` atomically, and tags the run with the DVC md5 of
each output. Errors a user can fix print as one line ``error: <stage>: …`` and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from palm.core.config import load_section, to_dict
from palm.core.errors import UserError
from palm.core.io import write_json
from palm.core.process import OtherNodeDone, is_other_node
from palm.ops.tracking import Tracker, git_commit, redact

C = TypeVar("C")


@dataclass
class StageContext:
    """What a stage body gets besides its config: parsed args, the tracker, the project root."""

    args: argparse.Namespace
    tracker: Tracker
    root: Path
    reports: Path  # reports/<stage>/
    sections: dict[str, Any]  # other params sections the stage reads (e.g. "model"), loaded strictly
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # data/model dependency -> DVC md5
    parents: dict[str, str] = dataclasses.field(default_factory=dict)  # dependency -> the run that made it

    def path(self, name: str) -> Path:
        """A path argument, resolved against the project root."""
        return self.root / getattr(self.args, name)


def dvc_md5(path: Path) -> str | None:
    """The md5 DVC records for ``path`` in dvc.lock (``….dir`` for folders), or None if absent."""
    import tempfile

    from dvc.fs import LocalFileSystem
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.hash import hash_file

    path = Path(path)
    if not path.exists():
        return None
    fs = LocalFileSystem()
    if path.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            _, _, obj = build(HashFileDB(fs, tmp), str(path), fs, "md5", dry_run=True)
            return obj.hash_info.value
    return hash_file(str(path), fs, "md5")[1].value


def dvc_paths(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """The file dependencies and outputs that ``dvc.yaml`` declares for ``stage`` (params and
    metrics files excluded): the single source of truth for what the run is tagged with."""
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            (st,) = repo.stage.collect(stage)
            deps = [d.def_path for d in st.deps if type(d).__name__ == "Dependency"]
            outs = [o.def_path for o in st.outs if o.use_cache]
    except Exception:  # noqa: BLE001 - outside a DVC repo the run is simply tagged with less
        return [], []
    code = {"stages", "palm"}
    return [d for d in deps if Path(d).parts[0] not in code], outs


def run_stage(
    stage: str,
    config_cls: type[C],
    body: Callable[[C, StageContext], dict[str, Any]],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
    sections: dict[str, type] | None = None,
) -> int:
    """Run one stage; returns the process exit code. ``sections`` names further params sections
    the stage reads (``{"model": ModelConfig}``): loaded as strictly, logged as params too."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"DVC stage {stage!r}")
    parser.add_argument("--params", default="params.yaml", help="params file (section %(default)s:" + stage + ")")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log this execution to MLflow")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    root = Path.cwd()
    # a training stage's node other than node 0 (palm/train/launch.py) only trains: no run, no outputs
    tracker = Tracker(root, stage, enabled=not args.no_mlflow and not is_other_node())
    try:
        cfg = load_section(config_cls, args.params, stage)
        others = {name: load_section(cls, args.params, name) for name, cls in (sections or {}).items()}
        deps, outs = dvc_paths(root, stage)
        tags = {"git_commit": git_commit(root)}
        dep_md5 = {d: dvc_md5(root / d) for d in deps}
        tags.update({f"dvc.dep.{d}.md5": m for d, m in dep_md5.items() if m})
        tracker.start({**to_dict(cfg), **{name: to_dict(c) for name, c in others.items()}}, tags)
        inputs = {d: m for d, m in dep_md5.items() if m and Path(d).parts[0] in ("data", "artifacts", "models")}
        for d, m in inputs.items():
            tracker.log_input(root / d, name=d, digest=m, context="input")
        parents = tracker.link_inputs(inputs)
        reports = root / "reports" / stage
        reports.mkdir(parents=True, exist_ok=True)
        started = time.time()
        metrics = body(cfg, StageContext(args, tracker, root, reports, others, inputs, parents))
        metrics = {**metrics, "stage_seconds": round(time.time() - started, 3)}
        write_json(reports / "metrics.json", metrics)
        tracker.log_metrics(metrics)
        tracker.set_tags({f"dvc.out.{o}.md5": m for o in outs if (m := dvc_md5(root / o))})
        tracker.end("FINISHED")
        return 0
    except OtherNodeDone as done:
        print(f"{stage}: {done}", file=sys.stderr)
        return 0
    # what an error says is passed through redact: it may name the tracking URI, whose password
    # must not reach a terminal or a log (an MLflow error names the URL it requested)
    except UserError as err:
        tracker.end("FAILED")
        print(redact(f"error: {stage}: {err}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        tracker.end("KILLED")
        print(f"error: {stage}: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - unexpected: full traceback, then one summary line
        tracker.end("FAILED")
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(redact(f"error: {stage}: unexpected {type(err).__name__}: {err} (a bug: please report it with the "
                     "traceback above)"), file=sys.stderr)
        return 1
