"""Blind A/B comparisons by people (palm/apps/feedback/compare*.py, palm/eval/human.py): the
verdict against hand-computed values (swapped order, a torn last line, agreement), and
`palm feedback compare` of two tiny exports driven in a real headless Chromium (three judgements,
the server SIGKILLed and restarted on the same files: the replies reused, the page at the fourth
item, no model named anywhere the page reads; no judgement without the token or from another Host)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FeedbackPage  # noqa: E402

from palm.core.errors import UserError  # noqa: E402
from palm.eval.human import FORMAT, human_verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- human_verdict

SFT = {"ref": "models/sft", "path": "models/sft", "kind": "sft", "tokenizer_sha256": "t" * 64,
       "weights_sha256": hashlib.sha256(b"sft").hexdigest()}
PPO = {**SFT, "ref": "models/ppo", "path": "models/ppo", "kind": "ppo", "weights_sha256": hashlib.sha256(b"ppo").hexdigest()}
OTHER = {**SFT, "ref": "models/x", "path": "models/x", "weights_sha256": hashlib.sha256(b"x").hexdigest()}


def judgment(index: int, labeler: str, choice: str, comparison: str = "c1", a: dict = SFT, b: dict = PPO) -> dict:
    return {"format": FORMAT, "comparison": comparison, "index": index, "prompt": [{"role": "user", "content": "q"}],
            "model_a": a, "model_b": b, "replies": {"a": "x", "b": "y"}, "choice": choice, "a_side": "left",
            "labeler": labeler, "time": "2026-01-01T00:00:00Z"}


def write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


# item 0: b, b -> 1; item 1: a, tie -> 1/4; item 2: both bad -> 1/2; item 3: a -> 0 (alice's first
# judgement of item 0, "a", is replaced by her later "b")
RECORDS = [judgment(0, "alice", "a"), judgment(0, "bob", "b"), judgment(0, "alice", "b"), judgment(1, "alice", "a"),
           judgment(1, "bob", "tie"), judgment(2, "alice", "both_bad"), judgment(3, "carol", "a")]
MEANS = [1.0, 0.25, 0.5, 0.0]
WIN = sum(MEANS) / 4  # 0.4375
SE = (sum((m - WIN) ** 2 for m in MEANS) / 3) ** 0.5 / 2  # 0.21347...


def test_human_verdict_by_hand(tmp_path):
    got = human_verdict(write(tmp_path / "j.jsonl", RECORDS))
    assert got.pop("human_win_rate") == pytest.approx(0.4375)
    assert got.pop("human_win_rate_se") == pytest.approx(SE) and SE == pytest.approx(0.2134781)
    assert got == {"human_judgments": 6, "human_items": 4, "human_labelers": 3, "human_both_bad": pytest.approx(1 / 6),
                   "human_agreement": 0.5, "human_comparisons": ["c1"]}  # item 0 agree, item 1 not


def test_three_labelers_on_an_item_make_three_pairs(tmp_path):
    records = [judgment(0, "a", "b"), judgment(0, "b", "b"), judgment(0, "c", "tie"), judgment(1, "a", "a")]
    got = human_verdict(write(tmp_path / "j.jsonl", records))
    assert got["human_agreement"] == pytest.approx(1 / 3)  # (a,b) same, (a,c), (b,c) not; item 1 has one labeler
    assert got["human_win_rate"] == pytest.approx(((1 + 1 + 0.5) / 3 + 0) / 2)


def test_swapped_order_is_flipped_and_other_pairs_left_out(tmp_path, monkeypatch):
    swapped = [judgment(0, "dan", "a", "c2", a=PPO, b=SFT), judgment(1, "dan", "tie", "c2", a=PPO, b=SFT)]
    other = [judgment(0, "eve", "b", "c3", a=SFT, b=OTHER)]
    path = write(tmp_path / "j.jsonl", RECORDS + swapped + other)
    # c2's "a" (PPO better) is B better in SFT-vs-PPO terms: item means 1 and 1/2 join c1's four
    want = (sum(MEANS) + 1 + 0.5) / 6
    by_sha = human_verdict(path, model_a=SFT["weights_sha256"], model_b=PPO["weights_sha256"])
    assert by_sha["human_win_rate"] == pytest.approx(want) and by_sha["human_comparisons"] == ["c1", "c2"]
    assert (by_sha["human_judgments"], by_sha["human_items"], by_sha["human_labelers"]) == (8, 6, 4)
    reverse = human_verdict(path, model_a=PPO, model_b=SFT)  # the other way round: 1 - the win rate
    assert reverse["human_win_rate"] == pytest.approx(1 - want)
    assert reverse["human_win_rate_se"] == pytest.approx(by_sha["human_win_rate_se"])
    monkeypatch.chdir(tmp_path)  # an export folder is matched by its weights, wherever it lies
    for name, ident in (("a", SFT), ("b", PPO)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(ident["kind"].encode())
    assert human_verdict(path, model_a="a", model_b=str(tmp_path / "b"))["human_win_rate"] == pytest.approx(want)
    assert human_verdict(path, model_a="models/sft", model_b="models/ppo")["human_items"] == 6  # the refs as given
    assert human_verdict(path, model_b=OTHER)["human_comparisons"] == ["c3"]
    assert human_verdict(path)["human_comparisons"] == ["c1", "c2", "c3"]  # no filter: everything as stored


def test_a_torn_last_line_is_ignored_and_a_bad_line_elsewhere_is_an_error(tmp_path):
    path = write(tmp_path / "j.jsonl", RECORDS, tail='{"format": "palm-ab-judgment/1", "compar')
    assert human_verdict(path)["human_judgments"] == 6
    lines = path.read_text().splitlines()
    for bad in ('{"torn', json.dumps({**RECORDS[0], "choice": "left"})):
        path.write_text("\n".join([lines[0], bad, *lines[1:]]))
        with pytest.raises(UserError) as err:
            human_verdict(path)
        assert str(err.value).startswith(f"{path}:2: not a judgement") and "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such judgments file"):
        human_verdict(tmp_path / "none.jsonl")


def test_few_judgements_give_no_nan(tmp_path):
    assert human_verdict(write(tmp_path / "e.jsonl", [])) == {"human_judgments": 0, "human_items": 0,
                                                               "human_labelers": 0, "human_comparisons": []}
    one = human_verdict(write(tmp_path / "o.jsonl", [judgment(0, "a", "tie")]))
    assert one == {"human_judgments": 1, "human_items": 1, "human_labelers": 1, "human_comparisons": ["c1"],
                   "human_win_rate": 0.5, "human_both_bad": 0.0}


def test_an_append_after_a_killed_write_cuts_the_partial_line(tmp_path):
    from palm.apps.feedback.judgments import JudgmentsFile

    path = write(tmp_path / "j.jsonl", RECORDS[:2], tail='{"format": "palm-ab-judgment/1", "index": 7, "é')
    JudgmentsFile(path).append(RECORDS[2])
    assert [json.loads(line) for line in path.read_text().splitlines()] == RECORDS[:3]
    assert JudgmentsFile(path).mine("c1", "alice") == {0: RECORDS[2]}


def test_left_and_right_map_back_to_a_and_b():
    from palm.apps.feedback.compare_app import shown_choice, stored_choice

    assert [stored_choice(c, "left") for c in ("left", "right", "tie", "both_bad")] == ["a", "b", "tie", "both_bad"]
    assert [stored_choice(c, "right") for c in ("left", "right", "tie", "both_bad")] == ["b", "a", "tie", "both_bad"]
    for side in ("left", "right"):
        assert all(shown_choice(stored_choice(c, side), side) == c for c in ("left", "right", "tie", "both_bad"))


def test_the_comparison_id_names_models_in_their_roles_prompts_and_sampling():
    from palm.apps.feedback.comparison import comparison_id
    from palm.data.chat_readers import Turn

    prompts = [(Turn("user", "q?"),)]
    sampling = {"temperature": 1.0, "top_k": None, "top_p": None, "max_new_tokens": 8, "seed": 0}
    cid = comparison_id(SFT, PPO, prompts, sampling)
    assert cid == comparison_id({**SFT, "ref": "models:/palm-sft@champion"}, PPO, prompts, sampling)  # content
    assert len({cid, comparison_id(PPO, SFT, prompts, sampling), comparison_id(SFT, PPO, prompts * 2, sampling),
                comparison_id(SFT, PPO, prompts, {**sampling, "seed": 1})}) == 4


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """Two tiny exports with the same tokenizer (A: an "sft", B: a "ppo", other weights) and the
    chat data of that tokenizer."""
    from helpers import chat_data, chat_export

    tmp = tmp_path_factory.mktemp("compare")
    data = chat_data(tmp / "d", valid_fraction=0.8)  # N held-out prompts
    return {"a": chat_export(tmp / "sft", data["tokenizer"], kind="sft", redraw=7),
            "b": chat_export(tmp / "ppo", data["tokenizer"], kind="ppo", redraw=5), "sft": data["sft"]}


def test_bad_flags_are_one_line_errors(pair, tmp_path, capsys):
    from palm.apps.cli import main

    def error(*args: str) -> str:
        assert main(["feedback", "compare", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: feedback: "), lines
        return lines[0]

    a, b = str(pair["a"]), str(pair["b"])
    assert "--labeler: '<x>'" in error(a, b, "--labeler", "<x>")
    assert "--prompts: must be >= 0" in error(a, b, "--labeler", "ann", "--prompts", "-1")
    assert "--port: must be between" in error(a, b, "--labeler", "ann", "--port", "70000")
    assert "no such model folder" in error(a, str(tmp_path / "none"), "--labeler", "ann")
    assert "--max-new-tokens: must be between 1 and 127 (model A" in error(a, b, "--labeler", "ann",
                                                                          "--max-new-tokens", "128")
    assert "meta.json: missing" in error(a, b, "--labeler", "ann", "--max-new-tokens", "8",
                                         "--sft-data", str(tmp_path))
    damaged = tmp_path / "judgments.jsonl"
    damaged.write_text("not json\n")
    assert f"{damaged}:1: not a judgement" in error(a, b, "--labeler", "ann", "--judgments", str(damaged))
    cid = "0123456789abcdef"
    from palm.apps.feedback.comparison import read_items

    (tmp_path / f"compare-{cid}.jsonl").write_text('{"format": "palm-feedback-compare/1"}\n')
    with pytest.raises(UserError, match=rf"compare-{cid}.jsonl:1: not item 0 of comparison {cid}.*delete it"):
        read_items(tmp_path / f"compare-{cid}.jsonl", cid)


class Server(FeedbackPage):
    """``palm feedback compare`` as a user starts it (:class:`helpers.FeedbackPage`)."""

    def __init__(self, pair: dict, judgments: Path, labeler: str = "alice"):
        super().__init__("compare", str(pair["a"]), str(pair["b"]), "--sft-data", str(pair["sft"]), "--prompts",
                         str(N), "--max-new-tokens", "8", "--seed", "3", "--labeler", labeler, "--judgments",
                         str(judgments))

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.base}{path}?key={self.key}", timeout=30) as resp:
            return resp.read().decode()


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


N = 6  # prompts compared
KINDS = {"a": "sft", "b": "ppo"}
FOURTH = ("b", "both_bad")  # item 4, after the restart


def decisions(items: list[dict]) -> dict[int, tuple[str, str]]:
    """What the labeler does on items 1-3 (the key or button, and the side said better): B's reply
    is better on items 1 (key) and 2 (button), item 3 is a tie. So B's win rate is 3/4 with item
    4 both bad, and 1/4 if left and right were mapped back the wrong way."""
    b_side = ["right" if i["a_side"] == "left" else "left" for i in items]
    return {0: ({"left": "1", "right": "2"}[b_side[0]], b_side[0]), 1: (f"choose-{b_side[1]}", b_side[1]),
            2: ("t", "tie")}


@pytest.fixture(scope="module")
def session(pair, browser, tmp_path_factory) -> dict:
    """Items 1-3 judged in the browser (keys, a button), the server SIGKILLed and started again
    with the same command: item 4 judged, refused requests sent."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    judgments = tmp_path_factory.mktemp("judgments") / "feedback" / "judgments.jsonl"
    wait = WebDriverWait(browser, 30)
    body = lambda: browser.find_element(By.TAG_NAME, "body")  # noqa: E731
    at = lambda item: wait.until(lambda d: body().get_attribute("data-item") == item)  # noqa: E731
    text = lambda id_: browser.find_element(By.ID, id_).text  # noqa: E731
    shown, exposed = {}, {}
    server = Server(pair, judgments)
    try:
        (path,) = judgments.parent.glob("compare-*.jsonl")  # written before the server starts
        said = decisions([json.loads(line) for line in path.read_text().splitlines()])
        browser.get(server.url)
        for index, (how, _) in said.items():
            at(str(index))
            shown[index] = {"progress": text("progress"), "judged": text("judged"), "left": text("left"),
                            "right": text("right")}
            if how.startswith("choose-"):
                browser.find_element(By.ID, how).click()
            else:
                body().send_keys(how)
            wait.until(lambda d: text("status").startswith(f"saved item {index + 1}"))
        at("3")
        if os.environ.get("PALM_COMPARE_SCREENSHOT"):
            browser.save_screenshot(os.environ["PALM_COMPARE_SCREENSHOT"])
        exposed = {"html": browser.page_source, "state": server.get("api/state"),
                   "items": [server.get(f"api/item/{i}") for i in range(N)]}
        before_kill = judgments.read_text()
    finally:
        first_log = server.kill()
    comparisons = list(judgments.parent.glob("compare-*.jsonl"))
    stat = comparisons[0].stat()
    server = Server(pair, judgments)
    try:
        browser.get(server.url)
        at("3")
        resumed = {"progress": text("progress"), "judged": text("judged")}
        body().send_keys(FOURTH[0])
        at("4")
        token = browser.find_element(By.CSS_SELECTOR, 'meta[name="feedback-token"]').get_attribute("content")
        judge, js = server.base + "api/judge?key=" + server.key, {"Content-Type": "application/json"}
        good = json.dumps({"index": 5, "choice": "left"}).encode()
        refused = {"no_token": post(judge, good, js),
                   "wrong_token": post(judge, good, {**js, "X-Feedback-Token": token[:-1] + "x"}),
                   "other_host": post(judge, good, {**js, "X-Feedback-Token": token, "Host": "attacker.example:80"}),
                   "bad_choice": post(judge, good.replace(b"left", b"a"), {**js, "X-Feedback-Token": token}),
                   "no_key": post(server.base + "api/judge", good, {**js, "X-Feedback-Token": token})}
        after_refusals = judgments.read_text()
        body().send_keys("\ue012")  # ← (Keys.ARROW_LEFT): back to item 4, its judgement shown
        at("3")
        previous = text("previous")
    finally:
        second_log = server.kill()
    return {"judgments": judgments, "said": said, "shown": shown, "exposed": exposed, "before_kill": before_kill,
            "comparisons": comparisons, "stat": stat, "resumed": resumed, "refused": refused,
            "after_refusals": after_refusals, "previous": previous, "logs": (first_log, second_log)}


def items_of(session: dict) -> list[dict]:
    (path,) = session["comparisons"]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(300)
def test_judge_three_kill_restart_reuses_the_replies_and_resumes_at_the_fourth(session, pair):
    from palm.core.tokenizer import sha256_file

    items = items_of(session)
    assert len(items) == N and {i["a_side"] for i in items} == {"left", "right"}  # premise: both sides drawn
    lines = session["before_kill"].splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == [0, 1, 2]
    for r in records:
        item, (_, said) = items[r["index"]], session["said"][r["index"]]
        # what the page showed on each side is the reply the comparison file put there
        left, right = session["shown"][r["index"]]["left"], session["shown"][r["index"]]["right"]
        a_left = item["a_side"] == "left"
        assert (left, right) == ((item["replies"]["a"], item["replies"]["b"]) if a_left else
                                           (item["replies"]["b"], item["replies"]["a"]))
        want = {"left": "a" if a_left else "b", "right": "b" if a_left else "a"}.get(said, said)
        assert (r["choice"], r["a_side"], r["comparison"], r["labeler"]) == (want, item["a_side"], item["comparison"],
                                                                             "alice")
        assert (r["prompt"], r["replies"], r["sampling"]) == (item["prompt"], item["replies"], item["sampling"])
        assert r["format"] == FORMAT and r["time"].endswith("Z")
        for role in ("a", "b"):
            assert r[f"model_{role}"] == {"ref": str(pair[role]), "path": str(pair[role]), "kind": KINDS[role],
                                          "tokenizer_sha256": sha256_file(pair[role] / "tokenizer.json"),
                                          "weights_sha256": sha256_file(pair[role] / "model.safetensors")}
    assert session["shown"][0]["progress"] == f"1 of {N}" and session["shown"][2]["judged"] == f"2 of {N}"
    # restarted: the same comparison file (not sampled again), the judgements kept, the fourth item next
    assert session["comparisons"][0].name == f"compare-{items[0]['comparison']}.jsonl"
    assert (session["stat"].st_ino, session["stat"].st_mtime_ns) == (session["comparisons"][0].stat().st_ino,
                                                                     session["comparisons"][0].stat().st_mtime_ns)
    assert "sampled to" in session["logs"][0] and "reusing the replies of" in session["logs"][1]
    assert "3 judged by alice (resuming at item 4)" in session["logs"][1]
    assert session["resumed"] == {"progress": f"4 of {N}", "judged": f"3 of {N}"}
    after = session["judgments"].read_text().splitlines()
    assert after[:3] == lines and len(after) == 4 and json.loads(after[3])["choice"] == "both_bad"
    assert session["previous"].startswith("your judgement: both bad")


def test_the_replies_are_held_out_prompts_sampled_with_the_same_seed(session, pair):
    from palm.apps.feedback.comparison import held_out_prompts
    from palm.apps.feedback.sample import SampleSettings, messages, sample_replies
    from palm.decode.generate import SamplingConfig
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    items = items_of(session)
    assert items[0]["sampling"] == {"temperature": 1.0, "top_k": None, "top_p": None, "max_new_tokens": 8, "seed": 3}
    ex = read_export(pair["b"])
    prompts = held_out_prompts(pair["sft"], load_tokenizer(ex), ex.tokenizer_sha256, N)
    assert [i["prompt"] for i in items] == [messages(p) for p in prompts]
    with process_groups():  # `palm feedback sample --k 1 --seed 3` of B draws B's replies
        again = sample_replies(load_model(ex), load_tokenizer(ex), prompts, SamplingConfig(1.0),
                               SampleSettings(k=1, max_new_tokens=8, seed=3))
    assert [r[0] for r in again] == [i["replies"]["b"] for i in items]
    assert [i["replies"]["a"] for i in items] != [i["replies"]["b"] for i in items]  # premise: other weights


def test_the_page_names_no_model_and_refuses_what_it_did_not_send(session, pair):
    from palm.core.tokenizer import sha256_file

    exposed = session["exposed"]
    seen = [exposed["html"], exposed["state"], *exposed["items"]]
    secrets = [str(pair["a"]), str(pair["b"]),
               *(sha256_file(pair[r] / f) for r in ("a", "b") for f in ("model.safetensors", "tokenizer.json"))]
    assert not [s for s in secrets if any(s in page for page in seen)]
    item = json.loads(exposed["items"][0])
    assert set(item) == {"index", "total", "prompt", "left", "right", "judgement"}
    assert set(json.loads(exposed["state"])) == {"labeler", "total", "judged", "next"}
    refused = session["refused"]
    assert refused["no_token"][0] == 403 and "X-Feedback-Token" in refused["no_token"][1]["error"]
    assert refused["wrong_token"][0] == 403 and refused["other_host"][0] == 403 and refused["no_key"][0] == 403
    assert refused["bad_choice"][0] == 400 and "choice" in refused["bad_choice"][1]["error"]
    assert len(session["after_refusals"].splitlines()) == 4  # nothing appended


def test_the_verdict_of_the_session(session, pair):
    items = items_of(session)
    wins = [1, 1, 0.5, 0.5]  # B better twice, a tie, both bad (decisions())
    mean = sum(wins) / 4
    got = human_verdict(session["judgments"], model_a=pair["a"], model_b=pair["b"])
    assert got["human_win_rate"] == pytest.approx(0.75)
    assert got["human_win_rate_se"] == pytest.approx((sum((w - mean) ** 2 for w in wins) / 3) ** 0.5 / 2)
    assert (got["human_judgments"], got["human_items"], got["human_labelers"], got["human_both_bad"]) == (4, 4, 1, 0.25)
    assert got["human_comparisons"] == [items[0]["comparison"]] and "human_agreement" not in got
    swapped = human_verdict(session["judgments"], model_a=str(pair["b"]), model_b=str(pair["a"]))
    assert swapped["human_win_rate"] == pytest.approx(1 - mean)
