"""`make serve` for real: ``python -m pipelines.serve`` in a project copy starts its own Prefect
server (SQLite in the copy's .prefect/), registers the scheduled deployment and serves it; runs
triggered through the API complete, the second from the DVC cache; the Prefect UI in headless
Chromium (logged in with the serve's password) lists the deployment and shows its schedule;
``--stop`` (make stop)
leaves no process behind, those of a run in flight included.

The deployment stops after ``scrape`` (serve.until) on a small folder of text files, so the
runs cost little more than Prefect's and DVC's start-up. The server starts once for the module."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import command, serve_cli, start_serve, stop_serve

pytestmark = pytest.mark.e2e
DEPLOYMENT = "test-nightly"
CRON, TIMEZONE = "30 2 * * 1", "Europe/Paris"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The project copy being served: (root, API url, the serve process, its output file)."""
    root, url, proc, out = start_serve(tmp_path_factory.mktemp("serve"), 3, deployment=DEPLOYMENT, cron=CRON,
                                       timezone=TIMEZONE)
    yield root, url, proc, out
    stop_serve(root, proc)  # a test failed before the stop test: stop it all anyway


def password(root: Path) -> str:
    """The password of the make serve running for ``root`` (its API answers 401 without it)."""
    return (root / ".prefect" / "api-auth").read_text().strip()


def client(root: Path, url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: password(root)}):
        return get_client(sync_client=True)


def run_deployment_and_wait(root: Path, url: str, timeout_s: float = 420):
    """Trigger a run of the deployment through the API; its final flow run."""
    with client(root, url) as c:
        deployment = c.read_deployment_by_name(f"palm-rlhf/{DEPLOYMENT}")
        run = c.create_flow_run_from_deployment(deployment.id)
        deadline = time.monotonic() + timeout_s
        while not (run := c.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"flow run still {run.state.type} after {timeout_s} s"
            time.sleep(1)
        return run


def flow_logs(root: Path, url: str, run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(root, url) as c:
        return [log.message for log in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


def mlflow_runs(root: Path) -> list:
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return c.search_runs([c.get_experiment_by_name("palm-rlhf").experiment_id])


def test_the_ui_shows_the_deployment_with_its_schedule(served):
    root, url, proc, out = served
    with client(root, url) as c:
        deployment = c.read_deployment_by_name(f"palm-rlhf/{DEPLOYMENT}")
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, TIMEZONE, True)
    assert deployment.parameters == {"root": str(root.resolve()), "until": "scrape"}
    assert (root / ".prefect" / "prefect.db").is_file()  # the server's SQLite lives in the project
    with urllib.request.urlopen(url.removesuffix("/api")) as page:  # the UI itself
        assert page.status == 200 and b"<html" in page.read().lower()
    assert url.removesuffix("/api") in out.read_text()  # printed for the user


def test_the_prefect_ui_in_a_browser_lists_the_deployment_and_shows_its_schedule(served, browser):
    """What a person sees at the address make serve prints: "Deployments" lists palm-rlhf's
    deployment, and its page shows the schedule as the UI writes a cron ("At 02:30 AM, only on
    Monday" for 30 2 * * 1; with its time zone in the tooltip), switched on."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, url, proc, out = served
    ui = url.removesuffix("/api")
    with client(root, url) as c:
        deployment = c.read_deployment_by_name(f"palm-rlhf/{DEPLOYMENT}")
    wait = WebDriverWait(browser, 120)  # a loaded 2-core machine
    browser.get(ui)  # logged in as the UI's login page does it: the password, base64, in localStorage
    browser.execute_script("localStorage.setItem('prefect-password', btoa(arguments[0]))", password(root))
    browser.get(f"{ui}/deployments")
    rows = lambda: browser.execute_script(  # noqa: E731 - [deployment link, its text, the row's flow name]
        "return [...document.querySelectorAll('a[href*=\"/deployments/deployment/\"]')].map(a => "
        "[a.href, a.innerText.trim(), a.closest('tr').querySelector('.flow-popover__link-name')?.innerText.trim()])")
    page = f"{ui}/deployments/deployment/{deployment.id}"
    wait.until(lambda d: (shown := rows()) and all(all(row) for row in shown), "no deployment listed")
    assert rows() == [[page, DEPLOYMENT, "palm-rlhf"]]
    browser.get(page)
    card = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".deployment-schedule-card")
                                 if e.is_displayed()], "no schedule shown")  # (a narrow window's copy: hidden)
    assert len(card) == 1 and card[0].text.splitlines()[0] == "At 02:30 AM, only on Monday"
    assert card[0].find_element(By.CSS_SELECTOR, "[role=switch]").get_attribute("aria-checked") == "true"
    ActionChains(browser).move_to_element(card[0].find_element(By.CSS_SELECTOR, ".deployment-schedule-card__content")
                                          ).perform()
    wait.until(lambda d: "At 02:30 AM, only on Monday (Europe/Paris)" in d.find_element(By.TAG_NAME, "body").text,
               "the schedule's tooltip does not name its time zone")


def test_triggered_runs_complete_the_second_from_the_dvc_cache(served):
    root, url, proc, out = served
    first = run_deployment_and_wait(root, url)
    assert first.state.is_completed(), (first.state, out.read_text()[-3000:])
    assert list((root / "data" / "corpus").glob("part-*.parquet"))
    assert not (root / "artifacts" / "tokenizer").exists()  # until: scrape, nothing downstream
    runs = mlflow_runs(root)
    (pipeline,) = [r for r in runs if r.data.tags.get("palm.ops.stage") == "pipeline"]
    (scrape,) = [r for r in runs if r.data.tags.get("palm.ops.stage") == "scrape"]
    assert scrape.data.tags["mlflow.parentRunId"] == pipeline.info.run_id  # nested under the flow's run
    stamp = {p: p.stat().st_mtime_ns for p in (root / "data" / "corpus").iterdir()}

    # The serve section is no DVC parameter: changing it makes no stage stale.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"]["timezone"] = "UTC"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = run_deployment_and_wait(root, url)
    assert second.state.is_completed(), second.state
    deadline = time.monotonic() + 30  # the run's logs reach the API in batches
    while "stage scrape: up to date (DVC cache)" not in (logs := flow_logs(root, url, second.id)):
        assert time.monotonic() < deadline, logs
        time.sleep(1)
    assert "stage scrape: ran" in flow_logs(root, url, first.id)
    assert {p: p.stat().st_mtime_ns for p in (root / "data" / "corpus").iterdir()} == stamp
    stages = [r.data.tags.get("palm.ops.stage") for r in mlflow_runs(root)]
    assert (stages.count("pipeline"), stages.count("scrape")) == (2, 1)  # the second run executed no stage


def test_stop_ends_every_process_it_started_a_run_in_flight_included(served):
    import psutil

    root, url, proc, out = served
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["scrape"]["filters"]["min_words"] = 40  # scrape is stale: the next run executes it
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with client(root, url) as c:
        c.create_flow_run_from_deployment(c.read_deployment_by_name(f"palm-rlhf/{DEPLOYMENT}").id)
    serving = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    while not any("stages.scrape" in command(p) for p in serving.children(recursive=True)):
        assert time.monotonic() < deadline, "the run's scrape stage never started"
        time.sleep(0.2)
    started = [serving, *serving.children(recursive=True)]  # serve, server, the run, DVC, the stage
    assert json.loads((root / ".prefect" / "serve.json").read_text())["serve"]["pid"] == proc.pid
    stop = serve_cli(root, "--stop", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said = stop.communicate(timeout=120)[0]
    assert stop.returncode == 0 and "stopped make serve" in said, said
    assert proc.wait(timeout=30) == 0
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    assert not (root / ".prefect" / "serve.json").exists()
    assert not (root / ".prefect" / "api-auth").exists()  # the password ends with its serve
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)
    again = serve_cli(root, "--stop", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert "nothing to stop" in again.communicate(timeout=60)[0] and again.returncode == 0
