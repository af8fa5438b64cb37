"""Shared test fixtures. Tests run real things: HTTP servers on 127.0.0.1, pydoc, DVC, MLflow on
SQLite, Prefect servers, megatron-core on gloo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, SHARED_DATA, chat_export, make_parent, make_tokenizer, redraw_weights

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


# What each of the longest files took in `make test` (seconds, summed over its tests' setup, call
# and teardown; pytest --durations=0 in a clean-clone `make test`, two workers on 2 cores, shared data present),
# for the order below. A rough guide, not a budget: re-measure when a file grows or shrinks a lot.
FILE_SECONDS = {
    "test_pipeline_e2e.py": 360, "test_dpo_stage.py": 115, "test_pretrain_stage.py": 115,
    "test_finetune_stages.py": 115, "test_data_executors.py": 100, "test_tutorial.py": 80,
    "test_server_down.py": 70, "test_lora.py": 70, "test_ppo.py": 60, "test_scrape.py": 55, "test_serve.py": 50,
    "test_parallel_numerics.py": 50, "test_pretrain.py": 45, "test_chat_stages.py": 35, "test_slurm.py": 35,
    "test_ppo_stage.py": 30, "test_benchmarks.py": 30, "test_registry.py": 30, "test_feedback_simulate.py": 30,
    "test_tokenize.py": 25, "test_feedback.py": 25, "test_security_servers.py": 25, "test_reward_terms.py": 20,
}


def pytest_collection_modifyitems(session, config, items):
    """The longest files first. `make test` runs the files on parallel workers (pytest-xdist,
    ``--dist loadfile``: a file's tests stay together, they share module fixtures), each file
    going to the next free worker in this order; a long file that came late would run alone at the
    end. So: the files of :data:`FILE_SECONDS`, longest first (the whole pipeline,
    test_pipeline_e2e.py, a quarter of the suite's time, on one worker from the start; the short
    files last, filling in until both workers end together), then the other files that run whole
    stages (marker e2e), then the rest, each group in its usual order. A file goes where its first
    test does: the tests of a file keep their order."""
    def rank(item) -> tuple[int, float]:
        seconds = FILE_SECONDS.get(item.path.name)
        if seconds is not None:
            return 0, -seconds
        return (1 if item.get_closest_marker("e2e") else 2), 0.0

    first: dict = {}  # each file's rank: its first test's
    for item in items:
        first.setdefault(item.path, rank(item))
    items.sort(key=lambda item: first[item.path])  # stable: the order within a file is kept


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


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A tokenizer trained on the test corpus, one per module that asks."""
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chat(tmp_path_factory, tok) -> Path:
    """A tiny SFT export of ``tok`` with redrawn weights (varied greedy replies), one per module."""
    return chat_export(tmp_path_factory.mktemp("chat") / "sft", tok, kind="sft")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A stand-in for models/ppo: a tiny PaLM export whose weights are redrawn so that greedy
    replies are varied text (PaLM's own init just repeats the prompt's last token, <|assistant|>,
    which decodes to nothing)."""
    import json

    from helpers import MODEL

    from palm.model.network import PaLM
    from palm.model.parallel import process_groups
    from palm.model.weights import export_safetensors

    tmp = tmp_path_factory.mktemp("chat")
    out = make_parent(tmp / "ppo", make_tokenizer(tmp / "tok"))
    config = json.loads((out / "config.json").read_text())
    with process_groups():
        net = PaLM(MODEL, seed=3)
        redraw_weights(net, seed=5)
        export_safetensors(net, out, {**config, "kind": "ppo"})
    return out


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real single-node Slurm of this module's own (helpers.slurm_cluster): the environment
    (``SLURM_CONF``) to run sbatch, squeue and scontrol with. Skips, with the reason, when Slurm
    is not installed, not root, or its daemons do not start (make test installs it)."""
    import contextlib

    from helpers import SlurmUnavailable, slurm_cluster

    with contextlib.ExitStack() as stack:
        try:
            env = stack.enter_context(slurm_cluster(tmp_path_factory.mktemp("slurm")))
        except SlurmUnavailable as err:
            pytest.skip(str(err))
        yield env
