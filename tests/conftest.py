"""Shared test fixtures. Tests run real things: HTTP servers on 127.0.0.1, pydoc, DVC, MLflow on
SQLite, Prefect servers, megatron-core on gloo."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # several test files at once (make test): one torch thread per process, here and in every
    # stage and training process the tests start (palm.train.launch.default_threads). OpenMP pools
    # of two threads from two workers on 2 cores ran the e2e pretrain 2.5x slower than alone.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs whole DVC stages / the Prefect flow (slow)")
    config.addinivalue_line("markers", "dist: launches torchrun process groups")
    config.addinivalue_line("markers", "default: the full default pipeline's acceptance run (make check-default)")


def pytest_collection_modifyitems(session, config, items):
    """The longest files first. `make test` runs the files on parallel workers (pytest-xdist,
    ``--dist loadfile``: a file's tests stay together, they share module fixtures), each file
    going to the next free worker in this order; a long file that came last would run alone at the
    end. The whole pipeline (test_pipeline_e2e.py, about half the suite's CPU time) goes first,
    then the other files that run whole stages (marker e2e), then the rest, each group in
    its usual order."""
    def rank(item) -> int:
        if item.path.name == "test_pipeline_e2e.py":
            return 0
        return 1 if item.get_closest_marker("e2e") else 2

    items.sort(key=rank)  # stable: the order within a group is kept


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def single():
    """A one-process world with megatron's groups (TP = PP = DP = 1), torn down afterwards."""
    from palm.model import parallel

    parallel.init_distributed()
    yield
    parallel.teardown()


def run_stage_cli(stage: str, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run ``python -m stages.<stage>`` in ``cwd`` (a project copy) and return the result."""
    full_env = {**os.environ, "PYTHONPATH": str(cwd), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stage_error(monkeypatch, capfd):
    """``stage_error(stage, args, cwd=None)``: run ``stages.<stage>.main(args + ["--no-mlflow"])``
    in this process with ``cwd`` (default: the current folder) as the project root (as DVC runs it, without an interpreter start
    of its own), expect exit 2, no traceback and exactly one ``error: <stage>: …`` line on
    stderr (its training workers' included), and return that line."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT))

    def run(stage: str, args: list[str], cwd: Path | None = None) -> str:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capfd.readouterr()
        code = importlib.import_module(f"stages.{stage}").main([*args, "--no-mlflow"])
        err = capfd.readouterr().err
        assert code == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {stage}: "), err[-3000:]
        return lines[0]

    return run


@pytest.fixture(autouse=True)
def _mlflow_uri_restored():
    """``mlflow.set_tracking_uri`` (a stage's tracker run in this process) also sets
    ``MLFLOW_TRACKING_URI`` in ``os.environ``: restored after each test, so that later tests'
    subprocesses log where they mean to."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Selenium, one per test module (what a person sees of a web UI:
    the feedback page, the MLflow and Prefect UIs). Skips when Chromium or its driver is missing."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver not installed (make test installs them: apt-get install "
                    "chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)  # no Selenium Manager
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(argv: list[str], url: str, log: Path, env: dict | None = None, timeout_s: float = 300):
    """A server process (a session of its own, so that killing its group ends its workers too),
    up once ``url``/health answers; SIGKILLed with its group at the end if still alive."""
    from pipelines.servers import wait_healthy

    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    try:
        wait_healthy(url, proc, log, timeout_s)
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def prefect_server(home: Path):
    """A real ``prefect server start`` (its SQLite database under ``home``; no UI, which the
    tests using it do not open) that this process's Prefect client talks to until the end.

    Not Prefect's ``prefect_test_harness``: its start-up asks ``/health`` with a 5 s read timeout
    and gives up at the first timeout, leaving the server process behind; on a loaded 2-core CI
    machine the server's first answer can take longer. :func:`pipelines.serve.wait_healthy` asks
    again until its deadline."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.serve import ServeConfig, api_url, prefect_env, server_command

    cfg = ServeConfig(port=free_port())
    env = {**os.environ, **prefect_env(home, cfg), "PREFECT_UI_ENABLED": "false"}
    with server(server_command(cfg), api_url(cfg), home / "prefect-server.log", env=env), \
            temporary_settings(updates={PREFECT_API_URL: api_url(cfg)}):
        yield api_url(cfg)
        _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send what Prefect's log and event workers still hold before their server goes away (they
    would retry it at exit otherwise)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def make_project(dst: Path, git: bool = True) -> Path:
    """A copy of the project's tracked files (no data, no venv) in ``dst``, as a git + DVC repo,
    with ``.venv`` linked so the DVC stage commands find the interpreter."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("tests/", "benchmarks/")):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    venv = Path(sys.prefix)
    (dst / ".venv").symlink_to(venv)
    if git:
        commit(dst)
    return dst


def commit(root: Path) -> None:
    """Make ``root`` a git repository (if it is not one) and commit everything in it."""
    run = lambda *a: subprocess.run(a, cwd=root, check=True, capture_output=True)  # noqa: E731
    if not (root / ".git").exists():
        run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")


def redraw_weights(model, seed: int = 1234) -> None:
    """Overwrite a whole single-process PaLM's weights so that every part of it matters.

    PaLM's own init (N(0,1) embedding, 0.02 projections, unit norm gains) makes the blocks a small
    correction to the embedding: greedy decoding then just repeats the last token, and a norm gain
    read wrongly (e.g. as gain - 1) is invisible. Here projections ``[out, in]`` are
    N(0, 4/fan_in), so attention and MLP move the residual more than the embedding does (with
    1/fan_in greedy decoding still repeated the last token), and norm gains vary around 1.
    Used by the reference tests (test_reference.py, test_palm_rlhf_pytorch.py).
    """
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                new = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            elif name == "embedding.weight":
                new = torch.randn(p.shape, generator=g)
            else:
                new = 2.0 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            p.copy_(new.to(p.dtype))
