"""A real single-node Slurm (Debian's slurm-wlm and munge, started by the ``slurm`` fixture; the
tests skip without them): an array job waits for the job it depends on; the project's multi-node
pretrain script (docs/slurm/pretrain.sbatch) runs a tiny pretrain on one CPU node; datatrove's
``SlurmPipelineExecutor`` submits two dependent arrays (what the data stages' Slurm executor does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, commit, job_states, pretrain_project, wait_job

pytestmark = [pytest.mark.e2e]


def sbatch(env: dict, *args: str, cwd: Path | None = None) -> str:
    """Submit; the job id."""
    out = subprocess.run(["sbatch", "--parsable", *args], check=False, env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_array_job_runs_after_the_job_it_depends_on(slurm, tmp_path):
    go = tmp_path / "go"  # the first job runs until the test lets it end
    first = sbatch(slurm, f"--output={tmp_path}/first.out", "--wrap",
                   f"while [ ! -e {go} ]; do sleep 0.2; done; date +%s.%N > {tmp_path}/first.done")
    array = sbatch(slurm, "--array=0-3", f"--dependency=afterok:{first}", f"--output={tmp_path}/a_%a.out",
                   "--wrap", f"date +%s.%N > {tmp_path}/a_$SLURM_ARRAY_TASK_ID.start; "
                             f"echo task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID")
    pending = job_states(array, slurm)
    assert set(pending.values()) == {"PENDING"}, pending  # held by the dependency
    go.touch()
    assert wait_job(first, slurm, 60) == {first: "COMPLETED"}
    states = wait_job(array, slurm, 60)
    assert states == {f"{array}_{i}": "COMPLETED" for i in range(4)}
    done = float((tmp_path / "first.done").read_text())
    for i in range(4):
        assert float((tmp_path / f"a_{i}.start").read_text()) >= done
        assert (tmp_path / f"a_{i}.out").read_text().strip() == f"task {i} of {array}"


def test_the_pretrain_script_trains_on_one_cpu_node(slurm, tmp_path):
    """docs/slurm/pretrain.sbatch as written for N GPU nodes, with what one CPU node needs on the
    command line (it overrides #SBATCH lines): one node, no GPUs, 2 CPUs, a short time limit, the
    log in tmp. Its node 0 runs ``dvc repro pretrain`` in the project folder it was submitted from."""
    root = pretrain_project(tmp_path / "project", pretrain={"data_parallel": 2})
    # the upstream stages have run (the script asks for `dvc repro tokenize` first): here their
    # outputs are given, so the copy's dvc.yaml keeps the pretrain stage alone
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc["stages"] = {"pretrain": dvc["stages"]["pretrain"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    (root / "dvc.lock").unlink(missing_ok=True)
    for out in ("models/pretrain", "reports/pretrain"):
        subprocess.run(["rm", "-rf", str(root / out)], check=True)
    commit(root)
    env = {**slurm, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    one_cpu_node = ["--nodes=1", "--cpus-per-task=2", "--time=00:10:00", f"--output={tmp_path}/slurm-%j.log"]
    refused = subprocess.run(["sbatch", *one_cpu_node, "docs/slurm/pretrain.sbatch"], check=False, env=env, cwd=root,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Invalid generic resource" in refused.stderr  # its 8 GPUs per node
    job = sbatch(env, *one_cpu_node, "--gpus-per-node=0", "docs/slurm/pretrain.sbatch", cwd=root)
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], check=False, env=env, capture_output=True,
                           text=True).stdout
    tres = dict(f.split("=", 1) for f in shown.split() if "=" in f)
    assert tres["TresPerNode"] == "gres:gpu:0" and "gpu" not in tres["TRES"], shown
    states = wait_job(job, env, 300)
    log = (tmp_path / f"slurm-{job}.log").read_text()
    assert states == {job: "COMPLETED"}, log[-3000:]
    assert "Running stage 'pretrain'" in log and "step 12/12" in log, log[-3000:]
    config = json.loads((root / "models" / "pretrain" / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["step"] == 12
    assert (root / "models" / "pretrain" / "model.safetensors").stat().st_size > 0
    metrics = json.loads((root / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["resumed_from_step"] == 0
    assert "pretrain" in yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def write_rank_file(data, rank: int, world_size: int):
    """A datatrove pipeline step: one file per rank (in $PALM_TEST_OUT), no documents."""
    out = Path(os.environ["PALM_TEST_OUT"])
    earlier = sorted(p.name for p in out.glob("first-*"))
    (out / f"{os.environ['SLURM_JOB_NAME'].removeprefix('palm-')}-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world_size, "job": os.environ["SLURM_ARRAY_JOB_ID"],
         "task": os.environ["SLURM_ARRAY_TASK_ID"], "python": sys.executable, "first_done": earlier}))
    return data or []


def test_datatrove_slurm_executor_runs_two_dependent_arrays(slurm, tmp_path, monkeypatch):
    """``SlurmPipelineExecutor.run()`` calls ``sbatch`` itself with this process's environment:
    SLURM_CONF must be in ``os.environ``. The job finds the step (this module) on PYTHONPATH and
    datatrove's ``launch_pickled_pipeline`` and ``merge_stats`` on the venv's PATH (``venv_path``:
    the activate script, sourced by the job)."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(tmp_path)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), str(ROOT)]))
    monkeypatch.setenv("PALM_TEST_OUT", str(out))

    def executor(step: str, **kwargs) -> SlurmPipelineExecutor:
        return SlurmPipelineExecutor(
            pipeline=[write_rank_file], tasks=2, time="00:05:00", partition="debug", job_name=f"palm-{step}",
            venv_path=str(ROOT / ".venv/bin/activate"), logging_dir=str(tmp_path / step), **kwargs)

    first = executor("first")
    second = executor("second", depends=first)
    second.run()  # launches `first` (its dependency) first
    assert first.job_id and second.job_id and first.job_id != second.job_id
    for ex in (first, second):
        states = wait_job(ex.job_id, slurm, 90)
        logs = "\n".join(p.read_text() for p in sorted((tmp_path / ex.job_name.removeprefix("palm-")).rglob("*.out")))
        assert states == {f"{ex.job_id}_{i}": "COMPLETED" for i in range(2)}, logs[-3000:]
    for step, job in (("first", first.job_id), ("second", second.job_id)):
        for rank in range(2):
            written = json.loads((out / f"{step}-{rank}.json").read_text())
            assert written["rank"] == rank and written["world_size"] == 2 and written["job"] == job
            assert written["python"].startswith(str(ROOT / ".venv"))
    assert json.loads((out / "second-0.json").read_text())["first_done"] == ["first-0.json", "first-1.json"]
    for step in ("first", "second"):  # datatrove's own bookkeeping: completions, and the merge_stats job it queued
        assert sorted(p.name for p in (tmp_path / step / "completions").iterdir()) == ["00000", "00001"]
    wait_idle(slurm)
    for step in ("first", "second"):
        assert (tmp_path / step / "stats.json").is_file()


def wait_idle(env: dict, timeout: float = 60) -> None:
    """Until the queue is empty (datatrove's merge_stats jobs, whose ids it does not keep)."""
    import time

    deadline = time.monotonic() + timeout
    queued = ["squeue", "-h", "-o", "%i"]
    while subprocess.run(queued, check=False, env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "jobs still queued"
        time.sleep(0.5)
