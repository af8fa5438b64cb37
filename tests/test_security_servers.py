"""The local servers against hostile neighbours: another user of the machine, a web page open in
the user's browser, a DNS-rebinding site.

* ``make serve`` for real (``python -m pipelines.serve`` in a project copy): its Prefect server
  grants CORS to no other origin, answers 401 without this serve's password (``.prefect/api-auth``,
  mode 0600, never printed) and 403 to a change without a CSRF token (which only the password
  gets), and the deployment refuses to run a
  pipeline of another folder (one whose ``dvc/`` package would run instead of DVC);
* ``palm feedback serve``: nothing without the key of the printed address (which becomes an
  HttpOnly, SameSite=Strict cookie), no answer to a ``Host`` not its own, ``true`` is no index;
* every served surface binds 127.0.0.1 by default (the flags' and configs' defaults, and the
  sockets the feedback page and the Prefect server listen on).

Only loopback addresses are used (127.0.0.2 is loopback too)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from helpers import ROOT, start_serve, stop_serve

EVIL = "http://evil.example"
DEPLOYMENT = "guarded"


def request(method: str, url: str, headers: dict | None = None, body: bytes | None = None):
    """One HTTP request, no redirect followed: (status, headers with lower-case names, body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def listening(pid: int) -> set[str]:
    """The addresses the process ``pid`` and its descendants listen on (TCP)."""
    import psutil

    top = psutil.Process(pid)
    out = set()
    for p in [top, *top.children(recursive=True)]:
        try:
            out |= {c.laddr.ip for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return out


# ----------------------------------------------------------------------------- palm feedback serve

def write_batch(path: Path) -> list[dict]:
    from palm.apps.feedback.sample import BATCH_FORMAT

    items = [{"format": BATCH_FORMAT, "batch": "batch-1", "item": f"item{i}", "index": i,
              "prompt": [{"role": "user", "content": f"question {i}?"}], "replies": ["yes", "no", "maybe"],
              "model": None, "sampling": None} for i in range(3)]
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return items


class Feedback:
    """``palm feedback serve`` as a user starts it; ``url``: the address it prints."""

    def __init__(self, tmp: Path, *flags: str):
        self.items = write_batch(tmp / "batch-1.jsonl")
        self.rankings = tmp / "rankings.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "palm.apps.cli", "feedback", "serve",
                                      str(tmp / "batch-1.jsonl"), "--labeler", "alice", "--rankings",
                                      str(self.rankings), "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line.startswith("open http://"), line
        self.url = line.split()[1]
        parts = urllib.parse.urlsplit(self.url)
        self.base = f"{parts.scheme}://{parts.netloc}/"
        self.port = parts.port
        self.key = urllib.parse.parse_qs(parts.query).get("key", [""])[0]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture
def feedback(tmp_path):
    server = Feedback(tmp_path)  # the defaults: --host 127.0.0.1
    yield server
    server.stop()


def test_the_feedback_page_answers_only_the_holder_of_the_printed_key(feedback):
    base = feedback.base
    for path in ("", "api/state", "api/item/0", "static/feedback.js"):
        status, _, body = request("GET", base + path)
        assert status == 403, (path, body[:300])  # the page (with its token) included
        assert request("GET", base + path + "?key=" + feedback.key[:-1] + "x")[0] == 403
    assert feedback.url.startswith(f"http://127.0.0.1:{feedback.port}/?key=") and len(feedback.key) >= 32
    status, headers, _ = request("GET", feedback.url)  # the printed address: a cookie, and the key leaves the URL
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    name, value = cookie.split(";")[0].split("=", 1)
    flags = {f.strip().lower() for f in cookie.split(";")[1:]}
    assert value == feedback.key and {"httponly", "samesite=strict", "path=/"} <= flags
    jar = {"Cookie": f"{name}={value}"}
    status, _, page = request("GET", base, jar)
    assert status == 200 and b'name="feedback-token"' in page
    assert request("GET", base + "static/feedback.js", jar)[0] == 200
    assert request("GET", base + "api/state", {"Cookie": f"{name}=wrong"})[0] == 403
    token = page.decode().split('name="feedback-token" content="')[1].split('"')[0]
    judge = {**jar, "X-Feedback-Token": token, "Content-Type": "application/json"}
    item = feedback.items[1]
    for index in (True, 1.0, "1"):  # true == 1 in Python: still no index
        body = json.dumps({"index": index, "item": item["item"], "verdict": "skip", "order": None}).encode()
        status, _, said = request("POST", base + "api/judge", judge, body)
        assert status == 400 and b"do not name an item" in said, (index, said)
    assert not feedback.rankings.exists()
    body = json.dumps({"index": 1, "item": item["item"], "verdict": "skip", "order": None}).encode()
    assert request("POST", base + "api/judge", {k: v for k, v in judge.items() if k != "Cookie"}, body)[0] == 403
    assert request("POST", base + "api/judge", judge, body)[0] == 200  # the holder of the key judges
    assert json.loads(feedback.rankings.read_text())["index"] == 1


def test_the_feedback_page_answers_only_its_own_host_names_on_any_address(tmp_path):
    """Bound to an address not in the loopback names (127.0.0.2 here; a LAN address alike), a
    request naming another host (a DNS-rebinding page's) is refused, the key notwithstanding."""
    server = Feedback(tmp_path, "--host", "127.0.0.2")
    try:
        ask = lambda host: request("GET", f"{server.base}api/state?key={server.key}", {"Host": host})[0]  # noqa: E731
        assert ask(f"evil.example:{server.port}") == 403
        assert ask(f"evil.example:{server.port + 1}") == 403 and ask("evil.example") == 403
        assert server.url.startswith(f"http://127.0.0.2:{server.port}/?key=")
        for own in ("127.0.0.2", "127.0.0.1", "localhost"):
            assert ask(f"{own}:{server.port}") == 200, own
    finally:
        server.stop()


# ----------------------------------------------------------------------------- every default is loopback

def test_every_served_surface_binds_127_0_0_1_by_default(feedback):
    from palm.apps import cli, ui
    from palm.core.config import load_section
    from pipelines.serve import ServeConfig, prefect_env, server_command

    # make serve: the Prefect server and UI (its config's default, and the project's params.yaml)
    for cfg in (ServeConfig(), load_section(ServeConfig, ROOT / "params.yaml", "serve")):
        assert cfg.host == "127.0.0.1"
        argv = server_command(cfg)
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert prefect_env(ROOT, cfg)["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    make = (ROOT / "Makefile").read_text()
    assert "prefect server start --host 127.0.0.1" in make  # make prefect-server
    # the palm command: every subcommand with a --host (palm ui: the MLflow UI; palm feedback serve; any later one)
    hosts = {}

    def walk(parser, path):
        for action in parser._actions:
            if "--host" in action.option_strings:
                hosts[path] = action.default
            choices = getattr(action, "choices", None)
            for name, sub in (choices.items() if isinstance(choices, dict) else ()):  # subcommands
                if hasattr(sub, "_actions"):
                    walk(sub, f"{path} {name}")

    walk(cli.parser(), "palm")
    assert {"palm ui", "palm feedback serve", "palm feedback compare"} <= set(hosts) and set(hosts.values()) == {"127.0.0.1"}, hosts
    args = cli.parser().parse_args(["ui"])
    argv = ui.command(args.host, args.port, args.workers)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # what mlflow server is given
    # and the feedback page, started with its defaults, listens on 127.0.0.1 only
    deadline = time.monotonic() + 30
    while not (addresses := listening(feedback.proc.pid)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert addresses == {"127.0.0.1"}


# ----------------------------------------------------------------------------- make serve's Prefect server

def foreign_project(folder: Path) -> Path:
    """A DVC project elsewhere with a stage named like the served one and a ``dvc/`` package of
    its own: run there as ``python -m dvc``, the package would run, not DVC."""
    folder.mkdir()
    subprocess.run([sys.executable, "-I", "-m", "dvc", "init", "--no-scm", "-q"], cwd=folder, check=True)
    (folder / "dvc.yaml").write_text("stages:\n  scrape:\n    cmd: echo scraped\n")
    (folder / "dvc").mkdir()
    (folder / "dvc" / "__init__.py").write_text("")
    (folder / "dvc" / "__main__.py").write_text(
        "from pathlib import Path\nPath(__file__).resolve().parent.parent.joinpath('PWNED').write_text('ran')\n")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``make serve`` of a project copy: (root, API url, the serve process, its output file)."""
    root, url, proc, out = start_serve(tmp_path_factory.mktemp("guarded"), 1, deployment=DEPLOYMENT)
    yield root, url, proc, out
    stop_serve(root, proc)


def password(root: Path) -> str | None:
    """This serve's password (None if it has none)."""
    path = root / ".prefect" / "api-auth"
    return path.read_text().strip() if path.is_file() else None


def basic(auth: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


@pytest.mark.e2e
def test_the_prefect_server_grants_cors_to_no_other_origin(served):
    _, url, _, _ = served
    own = url.removesuffix("/api")
    preflight = lambda origin: request("OPTIONS", f"{url}/flows/filter", {  # noqa: E731
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    status, headers, _ = preflight(EVIL)
    assert headers.get("access-control-allow-origin") not in ("*", EVIL), (status, headers)
    status, headers, _ = request("GET", f"{url}/health", {"Origin": EVIL})  # a page's plain request: unreadable
    assert status == 200 and headers.get("access-control-allow-origin") not in ("*", EVIL), headers
    for origin in (own, own.replace("127.0.0.1", "localhost")):  # the UI itself, by either name
        status, headers, _ = preflight(origin)
        assert status == 200 and headers.get("access-control-allow-origin") == origin, (origin, status, headers)


@pytest.mark.e2e
def test_the_prefect_api_wants_this_serves_password_and_a_csrf_token(served):
    root, url, _, out = served
    body, js = b"{}", {"Content-Type": "application/json"}
    assert request("GET", f"{url}/deployments/name/palm-rlhf/{DEPLOYMENT}")[0] == 401
    assert request("GET", f"{url}/csrf-token?client=test")[0] == 401
    # Prefect checks the CSRF token first (403), then the password (401): a POST with neither is
    # refused as a CSRF one, and a token is only had with the password
    for auth_header in ({}, basic("palm:guess")):
        status, _, said = request("POST", f"{url}/flows/filter", {**js, **auth_header}, body)
        assert status == 403 and b"CSRF token" in said, (status, said)
    secret = root / ".prefect" / "api-auth"
    assert secret.stat().st_mode & 0o777 == 0o600
    auth = password(root)
    assert auth.startswith("palm:") and len(auth) > 40 and auth not in out.read_text()  # never printed
    assert str(secret) in out.read_text()  # where to find it, is
    for auth_header in ({}, basic(auth)):
        status, _, said = request("POST", f"{url}/flows/filter", {**js, **auth_header}, body)
        assert status == 403 and b"CSRF token" in said, (status, said)  # the password alone changes nothing
    assert request("GET", f"{url}/health")[0] == 200  # the health check stays open (the flow's watch asks it)
    status, _, token = request("GET", f"{url}/csrf-token?client=test", basic(auth))
    assert status == 200
    csrf = {"Prefect-Csrf-Token": json.loads(token)["token"], "Prefect-Csrf-Client": "test"}
    for auth_header in ({}, basic("palm:guess"), basic(auth + "x")):  # a CSRF token without the password: 401
        status, _, said = request("POST", f"{url}/flows/filter", {**js, **csrf, **auth_header}, body)
        assert status == 401, (status, said)
    status, _, flows = request("POST", f"{url}/flows/filter", {**js, **basic(auth), **csrf}, body)
    assert status == 200 and "palm-rlhf" in [f["name"] for f in json.loads(flows)]


@pytest.mark.e2e
def test_the_prefect_server_and_the_runner_listen_on_127_0_0_1_only(served):
    _, _, proc, _ = served
    assert listening(proc.pid) == {"127.0.0.1"}  # serve, its Prefect server, the runner


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_run_of_the_deployment_refuses_a_foreign_root(served, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        temporary_settings,
    )

    root, url, _, out = served
    evil = foreign_project(tmp_path / "elsewhere")
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: password(root)}), \
            get_client(sync_client=True) as c:
        deployment = c.read_deployment_by_name(f"palm-rlhf/{DEPLOYMENT}")
        assert deployment.parameters["root"] == str(root.resolve())
        run = c.create_flow_run_from_deployment(deployment.id, parameters={"root": str(evil)})
        assert run.parameters["root"] == str(evil)
        deadline = time.monotonic() + 420
        while not (run := c.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"flow run still {run.state.type}"
            time.sleep(1)
        time.sleep(3)  # the run's logs reach the API in batches
        logs = [log.message for log in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
    assert not (evil / "PWNED").exists()  # its dvc package never ran
    assert run.state.is_failed(), (run.state, out.read_text()[-3000:])
    said = f"{run.state.message} {' '.join(logs)}"
    assert f"pipeline root: '{evil}' is not this project" in said, said[-3000:]
    assert not (evil / "mlflow.db").exists()  # refused before anything ran there


def test_dvc_runs_isolated_from_the_folder_it_runs_in(tmp_path):
    """The flow's DVC command: a ``dvc`` package in its working folder, or on PYTHONPATH, is not
    what runs."""
    from pipelines import flow

    dvc = getattr(flow, "DVC", [sys.executable, "-m", "dvc"])  # (how the flow ran DVC before it had DVC)
    evil = tmp_path / "evil"
    (evil / "dvc").mkdir(parents=True)
    (evil / "dvc" / "__init__.py").write_text("")
    (evil / "dvc" / "__main__.py").write_text("open('PWNED', 'w').write('ran')\n")
    env = {**os.environ, "PYTHONPATH": str(evil)}
    res = subprocess.run([*dvc, "--version"], cwd=evil, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert not (evil / "PWNED").exists()
    assert res.returncode == 0 and res.stdout.strip()[:1].isdigit(), res.stdout + res.stderr  # DVC's version


def test_the_mlflow_ui_gets_its_store_in_the_environment_not_on_the_command_line():
    """``palm ui`` starts ``mlflow server``: a store URI with a password on its command line is in
    every local user's ``ps``; in its environment only the user (and root) can read it."""
    from palm.apps import ui

    uri = "postgresql://user:s3cret@db.internal/mlflow"
    argv, env = ui.command("127.0.0.1", 5000, 1), ui.server_env(uri)
    assert not any("s3cret" in a for a in argv) and env["MLFLOW_BACKEND_STORE_URI"] == uri


# ----------------------------------------------------------------------------- fuzzing findings (feedback)

def test_a_judgement_nested_deeper_than_the_json_parser_goes_is_a_400(tmp_path):
    """Fuzzing found a RecursionError from Flask's ``get_json`` (silent only for ValueError)."""
    from palm.apps.feedback.app import TOKEN_HEADER, create_app

    write_batch(tmp_path / "batch-1.jsonl")
    app = create_app(tmp_path / "batch-1.jsonl", tmp_path / "rankings.jsonl", "ann", token="t0k", key="k3y")
    with app.test_client() as c:
        resp = c.post("/api/judge?key=k3y", data="[" * 30_000 + "]" * 30_000,
                      headers={TOKEN_HEADER: "t0k"}, content_type="application/json")
    assert resp.status_code == 400 and "expected a JSON object" in resp.get_json()["error"]
    assert not (tmp_path / "rankings.jsonl").exists()


@pytest.mark.parametrize("batch", [None, 3, ["b"]])
def test_a_batch_item_without_a_batch_name_is_a_one_line_error(tmp_path, batch):
    """Fuzzing found a KeyError in ``create_app`` for an item without ``"batch"``."""
    from palm.apps.feedback.app import create_app
    from palm.core.errors import UserError

    items = write_batch(tmp_path / "batch-1.jsonl")
    if batch is None:
        del items[1]["batch"]
    else:
        items[1]["batch"] = batch
    (tmp_path / "batch-1.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    with pytest.raises(UserError) as err:
        create_app(tmp_path / "batch-1.jsonl", tmp_path / "rankings.jsonl", "ann")
    assert str(err.value).startswith(f"{tmp_path / 'batch-1.jsonl'}:2: not a batch item") and "\n" not in str(err.value)
