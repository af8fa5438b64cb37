"""Human feedback (palm/apps/feedback/, palm/data/rankings.py): `palm feedback sample` from a tiny
export, the ranking page driven in a real headless Chromium (rank three items, kill the server,
restart it, resume at the fourth; HTML in model output shown as text; no judgement without the
session's key and the page's token), and the rankings through `dvc repro prefs` into preference pairs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FeedbackPage  # noqa: E402

from palm.data.chat_readers import Turn, read_examples  # noqa: E402
from palm.data.rankings import agreement, places  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K = 4
PROMPTS = ["What does json.dumps do?", "How do I sort a list?", "What is a tuple?",
           "Is <i>this</i> <script>window.__pwned = 3</script> escaped?", "Name a module."]
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold?</b> & more'


def palm(*args: str, cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever is installed
    return subprocess.run([sys.executable, "-m", "palm.apps.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300, **kw)


@pytest.fixture(scope="module")
def batch(export, tmp_path_factory) -> Path:
    """`palm feedback sample` of the tiny model: 5 prompts x 4 replies; item 4's first reply is
    then made hostile HTML (what a model could write)."""
    tmp = tmp_path_factory.mktemp("feedback")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp / "batch-1.jsonl"
    res = palm("feedback", "sample", "--model", str(export), "--prompts", str(tmp / "prompts.txt"), "--k", str(K),
               "--max-new-tokens", "8", "--seed", "3", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    items = [json.loads(line) for line in out.read_text().splitlines()]
    items[3]["replies"][0] = HOSTILE
    out.write_text("".join(json.dumps(i) + "\n" for i in items))
    return out


def test_sample_records_replies_settings_and_the_model(batch, export):
    from palm.apps.feedback.sample import SampleSettings, sample_replies
    from palm.core.tokenizer import sha256_file
    from palm.decode.generate import SamplingConfig
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    items = [json.loads(line) for line in batch.read_text().splitlines()]
    assert [i["index"] for i in items] == list(range(5)) and {i["batch"] for i in items} == {"batch-1"}
    assert [i["prompt"] for i in items] == [[{"role": "user", "content": p}] for p in PROMPTS]
    assert len({i["item"] for i in items}) == 5
    assert items[0]["sampling"] == {"temperature": 1.0, "top_k": None, "top_p": None, "max_new_tokens": 8,
                                    "seed": 3, "k": K}
    assert items[0]["model"] == {"ref": str(export), "path": str(export), "kind": "ppo",
                                 "tokenizer_sha256": sha256_file(export / "tokenizer.json"),
                                 "weights_sha256": sha256_file(export / "model.safetensors")}
    ex = read_export(export)
    with process_groups():  # the recorded settings reproduce the replies
        again = sample_replies(load_model(ex), load_tokenizer(ex), [(Turn("user", p),) for p in PROMPTS],
                               SamplingConfig(1.0), SampleSettings(k=K, max_new_tokens=8, seed=3))
    assert again[:3] == [i["replies"] for i in items[:3]]
    assert all(len(set(i["replies"])) == K and all(r.strip() for r in i["replies"]) for i in items)  # premise


def test_sample_defaults_to_the_train_prompts_of_sft_data(export, tmp_path):
    from helpers import chat_data

    from palm.apps.cli import main
    from palm.apps.feedback.sample import turns_of_ids
    from palm.data.chat import load_sft
    from palm.model.export import load_tokenizer, read_export

    data = chat_data(tmp_path / "d")
    assert data["sha"] == read_export(export).tokenizer_sha256  # premise: the model's tokenizer
    out = tmp_path / "batch-2.jsonl"
    assert main(["feedback", "sample", "--model", str(export), "--sft-data", str(data["sft"]), "--limit", "2",
                 "--k", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    items = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(read_export(export))
    train = load_sft(data["sft"], "train", data["sha"]).to_pylist()
    firsts = [turns_of_ids(tok, r["input_ids"])[0].text for r in train[:2]]  # each conversation's question
    assert [i["prompt"] for i in items] == [[{"role": "user", "content": q}] for q in firsts]
    assert all(len(i["replies"]) == 2 for i in items) and items[0]["batch"] == "batch-2"


def test_sample_and_serve_refuse_bad_flags_in_one_line(export, tmp_path, capsys):
    from palm.apps.cli import main

    def error(*args: str) -> str:
        assert main(["feedback", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: feedback: "), lines
        return lines[0]

    assert "--k: must be >= 2" in error("sample", "--model", str(export), "--k", "1")
    assert "--max-new-tokens: must be between 1 and 127" in error("sample", "--model", str(export),
                                                                   "--max-new-tokens", "128")
    assert "no such model folder" in error("sample", "--model", str(tmp_path / "no"))
    batch = tmp_path / "b.jsonl"
    assert "no such batch file" in error("serve", str(batch), "--labeler", "a")
    batch.write_text('{"format": "palm-feedback-batch/1"}\n')
    assert "b.jsonl:1: not a batch item" in error("serve", str(batch), "--labeler", "a")
    assert "--labeler: '<x>'" in error("serve", str(batch), "--labeler", "<x>")


# ----------------------------------------------------------------------------- the browser

class Server(FeedbackPage):
    """``palm feedback serve`` as a user starts it (:class:`helpers.FeedbackPage`)."""

    def __init__(self, batch: Path, rankings: Path, labeler: str):
        super().__init__("serve", str(batch), "--labeler", labeler, "--rankings", str(rankings))


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


ORDERS = {0: [1, 0, 3, 2], 1: [3, 2, 1, 0], 2: [0, 1, 2, 3]}  # what the labeler decides for items 1-3
CHANGED = [2, 3, 0, 1]  # item 3, judged again after going back


@pytest.fixture(scope="module")
def session(batch, browser, tmp_path_factory) -> dict:
    """One labelling session in the browser: items 1-3 ranked with the keys (item 2 saved with the
    button), item 3 judged again after going back; the server killed and restarted."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    rankings = tmp_path_factory.mktemp("rankings") / "rankings.jsonl"
    wait = WebDriverWait(browser, 20)
    body = lambda: browser.find_element(By.TAG_NAME, "body")  # noqa: E731
    at = lambda item: wait.until(lambda d: body().get_attribute("data-item") == item)  # noqa: E731
    server = Server(batch, rankings, "alice")
    try:
        browser.get(server.url)
        for index, order in ORDERS.items():
            at(str(index))
            assert browser.find_element(By.ID, "progress").text == f"{index + 1} of 5"
            for i in order:
                body().send_keys(str(i + 1))
            if index == 1:
                browser.find_element(By.ID, "submit").click()
            else:
                body().send_keys(Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(f"saved item {index + 1}"))
        at("3")
        body().send_keys(Keys.ARROW_LEFT)  # back to item 3: the judgement shows, and can be changed
        at("2")
        previous = browser.find_element(By.ID, "previous").text
        for i in CHANGED:
            body().send_keys(str(i + 1))
        body().send_keys(Keys.ENTER)
        at("3")
        lines_before_kill = rankings.read_text().splitlines()
    finally:
        server.kill()
    on_disk = rankings.read_text().splitlines()
    server = Server(batch, rankings, "alice")
    try:
        browser.get(server.url)
        at("3")
        shown = {"progress": browser.find_element(By.ID, "progress").text,
                 "judged": browser.find_element(By.ID, "judged").text,
                 "prompt": browser.find_element(By.ID, "prompt").text,
                 "reply": browser.find_element(By.CSS_SELECTOR, '#replies li[data-reply="0"] .text').text,
                 "pwned": browser.execute_script("return window.__pwned === undefined ? null : window.__pwned"),
                 "elements": browser.execute_script(
                     "return document.querySelectorAll('#prompt *:not(div):not(span), #replies script, "
                     "#replies img, #replies b, #replies i').length")}
        if os.environ.get("PALM_FEEDBACK_SCREENSHOT"):
            browser.save_screenshot(os.environ["PALM_FEEDBACK_SCREENSHOT"])
        token = browser.find_element(By.CSS_SELECTOR, 'meta[name="feedback-token"]').get_attribute("content")
        item = json.loads(batch.read_text().splitlines()[3])
        judge = server.base + "api/judge?key=" + server.key
        good = json.dumps({"index": 3, "item": item["item"], "verdict": "ranked", "order": [0, 1, 2, 3]}).encode()
        js = {"Content-Type": "application/json"}
        refused = {
            "no_token": post(judge, good, js),
            "wrong_token": post(judge, good, {**js, "X-Feedback-Token": token[:-1] + "x"}),
            "form": post(judge, b"index=3&verdict=skip", {"Content-Type": "application/x-www-form-urlencoded",
                                                           "X-Feedback-Token": token}),
            "too_big": post(judge, b'{"x": "' + b"a" * 70_000 + b'"}', {**js, "X-Feedback-Token": token}),
            "bad_order": post(judge, good.replace(b"[0, 1, 2, 3]", b"[0, 1, 1, 3]"), {**js, "X-Feedback-Token": token}),
            "other_host": post(judge, good, {**js, "X-Feedback-Token": token, "Host": "attacker.example:80"}),
            "no_key": post(server.base + "api/judge", good, {**js, "X-Feedback-Token": token}),
        }
        lines_after_refusals = rankings.read_text().splitlines()
    finally:
        server.kill()
    return {"rankings": rankings, "before_kill": lines_before_kill, "on_disk": on_disk, "shown": shown,
            "item4": item, "refused": refused, "after_refusals": lines_after_refusals, "previous": previous}


@pytest.mark.timeout(300)
def test_rank_three_kill_restart_finds_them_on_disk_and_the_fourth_next(session, batch):
    items = [json.loads(line) for line in batch.read_text().splitlines()]
    lines = [json.loads(line) for line in session["on_disk"]]
    assert session["on_disk"] == session["before_kill"] and len(lines) == 4  # 3, and item 3 judged again
    assert [(r["index"], r["order"], r["verdict"]) for r in lines] == [
        (0, ORDERS[0], "ranked"), (1, ORDERS[1], "ranked"), (2, ORDERS[2], "ranked"), (2, CHANGED, "ranked")]
    assert session["previous"].startswith("your judgement: 1 > 2 > 3 > 4")  # item 3's first judgement, shown
    for r in lines:
        it = items[r["index"]]
        assert (r["batch"], r["item"], r["prompt"], r["replies"]) == ("batch-1", it["item"], it["prompt"], it["replies"])
        assert (r["labeler"], r["model"], r["sampling"]) == ("alice", it["model"], it["sampling"])
        assert r["format"] == "palm-rankings/1" and r["time"].endswith("Z")
    shown = session["shown"]
    assert shown["progress"] == "4 of 5" and shown["judged"] == "3 of 5"  # resumed at the fourth item
    assert PROMPTS[3] in shown["prompt"]


def test_html_in_replies_is_text_and_a_submission_without_the_token_is_refused(session):
    shown = session["shown"]
    assert shown["reply"] == HOSTILE and shown["pwned"] is None and shown["elements"] == 0
    assert "<script>window.__pwned = 3</script>" in shown["prompt"]
    refused = session["refused"]
    assert refused["no_token"][0] == 403 and "X-Feedback-Token" in refused["no_token"][1]["error"]
    assert refused["wrong_token"][0] == 403 and refused["form"][0] == 400 and refused["too_big"][0] == 413
    assert refused["bad_order"][0] == 400 and "exactly once" in refused["bad_order"][1]["error"]
    assert refused["other_host"][0] == 403
    assert refused["no_key"][0] == 403 and "key" in refused["no_key"][1]["error"]
    assert session["after_refusals"] == session["on_disk"]  # nothing was appended


# ----------------------------------------------------------------------------- into the pipeline

def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    res = subprocess.run([str(root / ".venv" / "bin" / "dvc"), *args], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_rankings_flow_through_dvc_repro_prefs_and_a_new_one_reruns_it(session, tmp_path):
    import mlflow
    import networkx as nx
    from dvc.repo import Repo
    from helpers import chat_project, metrics

    from palm.apps.feedback.store import RankingsFile
    from palm.data.chat import load_prefs

    root = chat_project(tmp_path / "p", prefs={"path": ["default", "data/feedback/rankings.jsonl"]})
    rankings = root / "data" / "feedback" / "rankings.jsonl"
    shutil.copy2(session["rankings"], rankings)
    dvc(root, "add", "data/feedback/rankings.jsonl")  # as docs/human-feedback.md says, once
    dvc(root, "repro", "-s", "data/feedback/rankings.jsonl.dvc", "prefs")
    m = metrics(root, "prefs")
    per_item = K * (K - 1) // 2
    # 24 pairs of the default data, and K(K-1)/2 from each of the 3 fully ranked items
    assert (m["kept"], m["rankings"], m["rankings_ranked"], m["rankings_labelers"]) == (24 + 3 * per_item, 3, 3, 1)
    assert m["dropped_superseded"] == 1 and m["rankings_batches"] == 1
    sha = json.loads((root / "data" / "prefs" / "meta.json").read_text())["tokenizer_sha256"]
    rows = [r for s in ("train", "valid") for r in load_prefs(root / "data" / "prefs", s, sha).to_pylist()]
    changed = json.loads(session["on_disk"][-1])  # item 3's latest order: CHANGED, best first
    best, worst = (changed["replies"][CHANGED[0]], changed["replies"][CHANGED[-1]])
    assert any(r["chosen"] == best and r["rejected"] == worst for r in rows)
    assert not any(r["chosen"] == worst and r["rejected"] == best for r in rows)
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("palm-rlhf").experiment_id])
    assert run.data.tags["feedback.batches"] == "batch-1" and run.data.tags["feedback.labelers"] == "alice"
    assert run.data.tags["feedback.rankings"] == "3"
    assert run.data.metrics["rankings"] == 3

    again = dvc(root, "repro", "-s", "data/feedback/rankings.jsonl.dvc", "prefs")
    assert "Running stage 'prefs'" not in again.stdout, again.stdout  # nothing new: nothing reruns
    item4 = session["item4"]
    RankingsFile(rankings).append({**json.loads(session["on_disk"][0]), "index": 3, "item": item4["item"],
                                   "prompt": item4["prompt"], "replies": item4["replies"], "labeler": "bob",
                                   "order": [3, 2, 1, 0]})
    rerun = dvc(root, "repro", "-s", "data/feedback/rankings.jsonl.dvc", "prefs")
    assert "Running stage 'prefs'" in rerun.stdout
    m = metrics(root, "prefs")
    assert (m["rankings"], m["rankings_labelers"], m["kept"]) == (4, 2, 24 + 4 * per_item)
    recorded = yaml.safe_load((root / "data/feedback/rankings.jsonl.dvc").read_text())["outs"][0]["md5"]
    assert recorded == hashlib.md5(rankings.read_bytes()).hexdigest()  # the new rankings are versioned
    with Repo(str(root)) as repo:  # what a full `dvc repro` reruns once prefs has: the stages below it
        graph = repo.index.graph
        (prefs,) = [s for s in graph if getattr(s, "name", None) == "prefs"]
        below = {s.name for s in nx.ancestors(graph, prefs)}
        above = {Path(s.path).relative_to(root).as_posix() for s in nx.descendants(graph, prefs)}
    assert below == {"reward", "gold_reward", "ppo", "dpo", "evaluate"}
    assert "data/feedback/rankings.jsonl.dvc" in above  # the dvc-added file feeds prefs


# ----------------------------------------------------------------------------- the format

def rec(labeler: str, order, verdict: str = "ranked", item: str = "a", replies=("w", "x", "y", "z")) -> dict:
    return {"format": "palm-rankings/1", "batch": "b", "item": item, "prompt": [{"role": "user", "content": "q?"}],
            "replies": list(replies), "verdict": verdict, "order": order, "labeler": labeler}


def pairs_of(tmp_path: Path, records: list[dict], fmt: str = "auto") -> tuple[list, Counter]:
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn": ')  # a killed server's last line
    counts: Counter = Counter()
    return list(read_examples(str(path), fmt, "prefs", counts)), counts


def test_every_ordered_pair_once_ties_all_bad_and_the_latest_judgement(tmp_path):
    got, counts = pairs_of(tmp_path, [rec("a", [3, 1, 0, 2])])
    assert [(p.chosen, p.rejected) for p in got] == [("x", "w"), ("w", "y"), ("z", "w"), ("x", "y"), ("z", "x"),
                                                     ("z", "y")]  # K(K-1)/2, each the better one chosen
    assert got[0].prompt[0].text == "q?" and counts["malformed_json"] == 1
    got, _ = pairs_of(tmp_path, [rec("a", [[0, 2], 1, 3])])  # 0 and 2 tied: no pair between them
    assert sorted((p.chosen, p.rejected) for p in got) == [("w", "x"), ("w", "z"), ("x", "z"), ("y", "x"), ("y", "z")]
    got, counts = pairs_of(tmp_path, [rec("a", None, "all_bad"), rec("b", None, "skip", item="c"),
                                      rec("c", [0, 0, 1, 2], item="d")], fmt="rankings")
    assert got == [] and (counts["unranked"], counts["bad_order"]) == (2, 1)
    got, counts = pairs_of(tmp_path, [rec("a", [0, 1, 2, 3]), rec("a", [3, 2, 1, 0])])  # changed: latest wins
    assert counts["superseded"] == 1 and ("z", "w") in [(p.chosen, p.rejected) for p in got] and len(got) == 6


def test_agreement_between_labelers():
    same, reverse = places("ranked", [0, 1, 2, 3], 4), places("ranked", [3, 2, 1, 0], 4)
    assert agreement([("b", "a", "x", same), ("b", "a", "y", same)]) == (1.0, 1)
    assert agreement([("b", "a", "x", same), ("b", "a", "y", reverse), ("b", "c", "x", same)]) == (0.0, 1)
    swap = places("ranked", [1, 0, 2, 3], 4)  # one of six pairs differs
    assert agreement([("b", "a", "x", same), ("b", "a", "y", swap)]) == (round(5 / 6, 4), 1)
    assert agreement([("b", "a", "x", same)]) == (None, 0)


def test_two_labelers_on_the_app_and_the_state_it_resumes_from(batch, tmp_path):
    from palm.apps.feedback.app import create_app

    items = [json.loads(line) for line in batch.read_text().splitlines()]
    rankings = tmp_path / "r.jsonl"
    for labeler, order in (("alice", [0, 1, 2, 3]), ("bob", [1, 0, 2, 3])):
        app = create_app(batch, rankings, labeler, token="t0k", key="k3y")
        with app.test_client() as c:
            assert c.get("/?key=k3y").status_code == 303  # the key becomes the session's cookie
            for i in (0, 2):
                ok = c.post("/api/judge", json={"index": i, "item": items[i]["item"], "verdict": "ranked",
                                                "order": order}, headers={"X-Feedback-Token": "t0k"})
                assert ok.status_code == 200 and ok.get_json()["saved"]
            state = c.get("/api/state").get_json()
            assert (state["judged"], state["next"]) == (2, 1)  # resumes at the first item not judged
            assert c.get("/").headers["Content-Security-Policy"].startswith("default-src 'none'")
        if labeler == "alice":  # a server killed in the middle of a write: the next append starts afresh
            rankings.write_bytes(rankings.read_bytes() + b'{"torn')
    lines = rankings.read_text().splitlines()
    assert len(lines) == 5 and lines[2] == '{"torn' and all(json.loads(x)["verdict"] for x in lines[:2] + lines[3:])
    agree = state["agreement"]
    assert agree == {"labelers": ["alice", "bob"], "shared_items": 2, "agreement": round(5 / 6, 4)}
    with create_app(batch, rankings, "carol", token="t0k", key="k3y").test_client() as c:  # all bad, skip: no order
        c.get("/?key=k3y")
        send = lambda i, verdict, order=None: c.post("/api/judge", headers={"X-Feedback-Token": "t0k"}, json={  # noqa: E731
            "index": i, "item": items[i]["item"], "verdict": verdict, "order": order})
        assert send(0, "all_bad", [0, 1, 2, 3]).status_code == 400
        assert send(0, "all_bad").status_code == 200 and send(1, "skip").status_code == 200
        state = c.get("/api/state").get_json()
    assert (state["judged"], state["next"], state["agreement"]["shared_items"]) == (2, 2, 2)


def test_a_list_of_sources_is_checked_strictly():
    from palm.core.config import from_dict
    from palm.core.errors import ConfigError
    from palm.data.chat import ChatDataConfig

    cfg = from_dict(ChatDataConfig, {"path": ["default", "data/feedback/rankings.jsonl"], "format": "rankings"},
                    "prefs")
    assert cfg.sources == ("default", "data/feedback/rankings.jsonl")
    for path, message in (([], "at least one source"), (["default", "default"], "names a source twice"),
                          (["default", ""], "must be 'default'"), (["hf:"], "hf: needs a dataset name")):
        with pytest.raises(ConfigError, match=message) as err:
            from_dict(ChatDataConfig, {"path": path}, "prefs")
        assert err.value.key == "prefs.path"
