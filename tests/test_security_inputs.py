"""Hostile inputs (issue "Hostile neighbours", findings 5-8): what the model writes cannot drive
the terminal (``palm chat``); a tracking URI's password is printed nowhere (stage warnings and
errors, ``palm ui``); JSON nested as deep as the parser goes, or deeper, is a counted skip in the
chat and rankings readers, never a RecursionError; one request cannot exhaust the served model
(row and character caps, generation in chunks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from helpers import ROOT, free_port

# ---- 5. terminal escapes from the model ------------------------------------------------------

# OSC 52 (write the clipboard) ended by BEL, a window title (OSC 0), clear screen (CSI 2 J), a
# carriage return that would overwrite the line, and CSI as the one C1 character U+009B
HOSTILE = "ok \x1b]52;c;cm0gLXJmIH4=\x07 \x1b]0;pwned\x07 \x1b[2J\r\u009b31m red\tend"
RAW = ("\x1b", "\x07", "\r", "\u009b")


def test_terminal_safe_makes_every_control_character_visible_but_newline_and_tab():
    from palm.apps.chat import terminal_safe

    controls = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))
    safe = terminal_safe(controls)
    assert "\n" in safe and "\t" in safe
    assert not [c for c in safe if c not in "\n\t" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)], ascii(safe)
    assert terminal_safe(safe) == safe  # a second pass changes nothing
    assert terminal_safe("\x1b[2J \x9b") == "\u241b[2J \\x9b"
    assert terminal_safe("naïve café ☕\n") == "naïve café ☕\n"


def test_a_reply_with_terminal_escapes_is_printed_without_them(export, monkeypatch):
    """The reply streams token by token (a byte-level tokenizer splits the escapes across
    tokens); what reaches stdout holds none of the raw control characters, the conversation keeps
    the model's own text."""
    import torch

    import palm.decode.generate as generate_module
    from palm.apps.chat import ChatSession, repl
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    ex = read_export(export)
    tok = load_tokenizer(ex)
    ids = tok.encode(HOSTILE, add_special_tokens=False).ids
    assert tok.decode(ids) == HOSTILE  # premise: the tokenizer can make every one of them

    def fake_generate(model, prompts, max_new_tokens, *, on_token=None, **kw):  # the model "says" HOSTILE
        for t in ids:
            on_token(torch.tensor([t]), torch.tensor([True]))

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    out, err = io.StringIO(), io.StringIO()
    with process_groups():
        session = ChatSession(load_model(ex), tok, max_new_tokens=6)
        repl(session, io.StringIO("Hi\n/quit\n"), out, err, interactive=False)
    printed = out.getvalue()
    assert not [c for c in RAW if c in printed], ascii(printed)
    assert printed == "ok \u241b]52;c;cm0gLXJmIH4=\u2407 \u241b]0;pwned\u2407 \u241b[2J\u240d\\x9b31m red\tend\n"
    assert session.history[-1].text == HOSTILE


# ---- 6. credentials in tracking URIs ---------------------------------------------------------

def secret_uri() -> str:
    return f"http://user:secret@127.0.0.1:{free_port()}"  # nothing listens there


def test_redact_removes_user_and_password_from_every_uri_in_a_text():
    from palm.ops.tracking import redact

    assert redact("postgresql://user:p@ss@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("at http://u:secret@h:1 (request to http://u:secret@h:1/api/2.0 failed)") == \
        "at http://***@h:1 (request to http://***@h:1/api/2.0 failed)"
    for plain in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000/#/experiments/1", "mail me at a@b.c"):
        assert redact(plain) == plain


STAGE = textwrap.dedent("""
    import sys
    from dataclasses import dataclass

    from palm.core.errors import UserError
    from palm.ops.stage import run_stage

    @dataclass
    class Toy:
        n: int = 1

    def body(cfg, ctx):
        uri = sys.argv[2]
        if sys.argv[1] == "user_error":
            raise UserError(f"cannot use {uri}")
        if sys.argv[1] == "bug":
            raise RuntimeError(f"request to {uri}/api failed")
        (ctx.root / "out.txt").write_text("done")
        return {"n": cfg.n}

    sys.exit(run_stage("toy", Toy, body, argv=[]))
""")


@pytest.mark.parametrize("how,code", [("ok", 0), ("user_error", 2), ("bug", 1)])
def test_a_stage_prints_no_password_of_its_tracking_uri(tmp_path, how, code):
    """An unreachable ``http://user:secret@…`` tracking server: the stage warns once and keeps
    its outputs, and neither the warning (which names the URI, and MLflow's error naming it
    again) nor an error line or traceback that holds the URI shows the password."""
    (tmp_path / "params.yaml").write_text("toy:\n  n: 3\n")
    (tmp_path / "stage.py").write_text(STAGE)
    uri = secret_uri()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "stage.py", how, uri], check=False, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "secret" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: MLflow")]
    assert len(warnings) == 1 and uri.replace("user:secret", "***") in warnings[0], proc.stderr[-3000:]
    if how == "ok":
        assert (tmp_path / "out.txt").read_text() == "done"
    else:
        assert "http://***@127.0.0.1" in proc.stderr.splitlines()[-1]


def test_palm_ui_prints_no_password_of_the_store(tmp_path, monkeypatch, capsys):
    """``palm ui`` on a store it cannot reach: one error line without the password; on one it
    reaches: the link and the store, without the password."""
    uri = secret_uri()
    proc = subprocess.run([sys.executable, "-m", "palm.apps.cli", "ui", "--port", str(free_port())], check=False,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2 and "secret" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ui: cannot open the MLflow store http://***@"), lines

    import palm.ops.tracking
    from palm.apps.cli import main

    execs = []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(palm.ops.tracking, "ui_url", lambda root, base: f"{base}/#/experiments/1/runs")
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((argv, env)))
    assert main(["ui", "--port", "5123"]) == 0
    out = capsys.readouterr()
    shown = uri.replace("user:secret", "***")
    assert out.out == f"MLflow UI: http://127.0.0.1:5123/#/experiments/1/runs  (store {shown})\n"
    (argv, env), = execs
    # the server itself gets the real URI, in its environment: not on its command line (ps)
    assert "secret" not in out.err and env["MLFLOW_BACKEND_STORE_URI"] == uri and not any("secret" in a for a in argv)


# ---- 7. deep nesting in the readers ----------------------------------------------------------

def read(path: Path, kind: str, fmt: str = "auto") -> tuple[list, Counter]:
    from palm.data.chat_readers import read_examples

    counts: Counter = Counter()
    return list(read_examples(path.name, fmt, kind, counts, root=path.parent)), counts


CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def test_a_jsonl_line_nested_too_deep_is_a_counted_skip(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + "[" * 100_000 + "\n" + '{"messages": ' * 100_000 + "\n")
    got, counts = read(path, "sft")
    assert [[t.text for t in c] for c in got] == [["Hi?", "Hello."]]
    assert counts == {"read": 3, "too_deep": 2}


def test_a_json_file_nested_too_deep_is_a_counted_skip(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert read(path, "sft") == ([], {"read": 1, "too_deep": 1})


def oasst_line(depth: int) -> str:
    """An oasst tree whose prompt has one reply, which has one reply, … ``depth`` replies deep
    (two JSON levels each: the message and its replies list); written by hand, as json.dumps
    recurses too."""
    opening = "".join(f'{{"role": "{("prompter", "assistant")[i % 2]}", "text": "turn {i}", "rank": 0, "replies": ['
                      for i in range(depth + 1))
    return '{"prompt": ' + opening + "]}" * (depth + 1) + "}"


def test_an_oasst_tree_400_replies_deep_is_walked_without_recursion(tmp_path):
    """400 replies deep is 800 JSON levels: the parser reads it, and the tree walk (iterative)
    gives its one conversation; the recursive walk raised RecursionError."""
    path = tmp_path / "oasst.jsonl"
    path.write_text(oasst_line(400) + "\n")
    got, counts = read(path, "sft")
    # turns 0..400; the last, a user turn, goes (a conversation ends with its last reply)
    assert len(got) == 1 and len(got[0]) == 400 and got[0][-1].text == "turn 399", counts
    assert [t.role for t in got[0][:3]] == ["user", "assistant", "user"] and counts == {"read": 1}
    pairs, counts = read(path, "prefs")  # one reply a message: no sibling pairs
    assert pairs == [] and counts == {"read": 1, "empty_tree": 1}


def judgement(labeler: object = "alice", order: object = (1, 0)) -> dict:
    return {"format": "palm-rankings/1", "batch": "b1", "item": "i1", "index": 0,
            "prompt": [{"role": "user", "content": "Hi?"}], "replies": ["Good.", "Bad."], "verdict": "ranked",
            "order": list(order) if isinstance(order, tuple) else order, "labeler": labeler}


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_rankings_lines_nested_too_deep_are_counted_skips(tmp_path):
    """A rankings file with a line of 100,000 ``[``, a judgement whose labeler is a list (it
    cannot key the latest-judgement table) and one whose order is nested 400 deep: the good
    judgement gives its pair, each bad line is one counted skip."""
    path = tmp_path / "rankings.jsonl"
    lines = [json.dumps(judgement()), "[" * 100_000, json.dumps(judgement(labeler=["x"])),
             json.dumps(judgement(labeler="bob", order=nested(400)))]
    path.write_text("\n".join(lines) + "\n")
    pairs, counts = read(path, "prefs", "rankings")
    assert [(p.chosen, p.rejected) for p in pairs] == [("Bad.", "Good.")]
    assert counts == {"read": 4, "too_deep": 1, "missing_field": 1, "bad_order": 1}


def test_an_impossible_order_nested_deep_is_a_one_line_value_error():
    """What the feedback page calls on each posted judgement: repr() of a deep order or verdict
    in the message recursed (RecursionError, a failed request)."""
    from palm.data import rankings

    with pytest.raises(ValueError, match="exactly once") as info:
        rankings.places("ranked", nested(100_000), 2)
    assert len(str(info.value)) < 300
    with pytest.raises(ValueError, match="verdict must be one of"):
        rankings.places(nested(100_000), None, 2)
    with pytest.raises(ValueError, match=r"exactly once, got \[1, 1\]"):  # a short order in full, as before
        rankings.places("ranked", [1, 1], 2)


def test_a_rankings_file_line_nested_too_deep_reads_as_none():
    """rankings.loads: one line of rankings.jsonl for its readers (the feedback page), None for a
    line that is not JSON or too deep to parse."""
    from palm.data import rankings

    assert rankings.loads("[" * 100_000) is None and rankings.loads('{"a": 1') is None
    assert rankings.loads('{"a": [1]}') == {"a": [1]}


# ---- 8. request caps of the served model -----------------------------------------------------

@pytest.fixture(scope="module")
def served(export):
    """The pyfunc model over the tiny chat export, loaded as ``mlflow models serve`` loads it."""
    from types import SimpleNamespace

    from palm.apps.serving import PalmModel

    model = PalmModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(export)}))
    yield model
    model._groups.release()  # the groups its load started end here, not when it is collected


GREEDY = {"max_new_tokens": 4, "temperature": 0.0}


def test_a_request_past_a_cap_is_refused_in_one_line(served):
    from palm.core.errors import UserError

    with pytest.raises(UserError, match=r"at most 128 per request \(PalmModel.max_rows\)") as info:
        served.predict(None, ["Hi"] * 129, GREEDY)
    assert "\n" not in str(info.value) and "129 rows" in str(info.value)
    with pytest.raises(UserError, match=r"row 1 has 40000 characters; at most 32768 .*\(PalmModel.max_chars\)"):
        served.predict(None, ["Hi", "x" * 40_000], GREEDY)


def test_more_rows_than_a_chunk_are_generated_chunk_by_chunk(served, monkeypatch):
    """Five prompts with chunks of two: three generate calls of 2, 2 and 1 rows, one reply per
    prompt, each (greedy) the reply the prompt gets alone."""
    import palm.decode.generate as generate_module

    real, sizes = generate_module.generate, []

    def counting(model, prompts, *args, **kw):
        sizes.append(len(prompts))
        return real(model, prompts, *args, **kw)

    prompts = ["Hi", "What does dumps do?", "And loads?", "Bye", "What is a list?"]
    alone = [served.predict(None, [p], GREEDY)[0] for p in prompts]
    monkeypatch.setattr(served, "chunk_rows", 2, raising=False)
    monkeypatch.setattr(generate_module, "generate", counting)
    out = served.predict(None, prompts, GREEDY)
    assert sizes == [2, 2, 1]
    assert out == alone and len({*out}) > 1  # premise: replies differ


def test_the_feedback_page_answers_with_a_hostile_rankings_file(tmp_path):
    """A rankings.jsonl line nested too deep, and judgements of the page's batch whose item or
    labeler is a list: every request of ``palm feedback serve``'s page still answers (the old
    store raised RecursionError, then TypeError, on every request)."""
    from palm.apps.feedback.app import create_app
    from palm.apps.feedback.sample import BATCH_FORMAT

    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"format": BATCH_FORMAT, "batch": "b1", "item": f"i{i}", "index": i,
                                         "prompt": [{"role": "user", "content": "Hi?"}],
                                         "replies": ["Good.", "Bad."]}) + "\n" for i in range(2)))
    path = tmp_path / "rankings.jsonl"
    path.write_text("\n".join(["[" * 100_000, json.dumps(judgement(labeler=["x"])),
                               json.dumps({**judgement(), "item": ["i1"]}), json.dumps(judgement())]) + "\n")
    with create_app(batch, path, "alice", token="t0k", key="k3y").test_client() as c:
        assert c.get("/?key=k3y").status_code == 303
        state = c.get("/api/state")
        assert state.status_code == 200, state.get_data(as_text=True)[:300]
        assert state.get_json()["judged"] == 1 and state.get_json()["agreement"]["labelers"] == ["alice"]
        assert c.get("/api/item/1").status_code == 200


# ---- fuzzing findings: corrupt gzip, empty tie groups, deep values --------------------------------

def test_a_corrupt_jsonl_gz_is_a_counted_skip(tmp_path):
    """A .jsonl.gz whose deflate stream is corrupt raised zlib.error (neither OSError nor
    ValueError); one cut short, not gzip at all, or not UTF-8 inside: each one counted skip."""
    import gzip

    good = gzip.compress((json.dumps(CHAT) + "\n").encode() * 50, mtime=0)
    files = {"flipped.jsonl.gz": good[:20] + bytes(b ^ 0x55 for b in good[20:40]) + good[40:],
             "cut.jsonl.gz": good[:-10], "junk.jsonl.gz": b"\x1f\x8bjunk",
             "latin1.jsonl.gz": gzip.compress(b"\xff\xfe{}\n", mtime=0)}
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        for kind in ("sft", "prefs"):
            got, counts = read(path, kind, "chat")
            assert counts["malformed_json"] == 1, (name, counts)
            assert all(reason == "read" or reason in {"malformed_json", "no_pairs_format"} for reason in counts), counts


def test_a_ranking_with_an_empty_tie_group_is_a_counted_bad_order(tmp_path):
    """``order: [[], 0, 1]`` puts no reply at place 0: the best-reply (sft) reader raised
    ValueError from ``place.index(0)``, and places() gave places with a gap ([1, 2])."""
    from palm.data import rankings

    for order in ([[], 0, 1], [0, [], 1], [0, 1, []], [[]]):
        with pytest.raises(ValueError, match="empty group") as info:
            rankings.places("ranked", order, 2)
        assert "\n" not in str(info.value)
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps(judgement(order=[[], 0, 1])) + "\n" + json.dumps(judgement(labeler="bob")) + "\n")
    for kind in ("sft", "prefs"):
        got, counts = read(path, kind, "rankings")
        assert len(got) == 1 and counts == {"read": 2, "bad_order": 1}, (kind, got, counts)
    stats = rankings.RankingStats()
    list(rankings.latest([judgement(order=[[], 0, 1])], Counter(), stats))
    assert stats.judgements == 0 and stats.orders == []  # not a judgement with gaps in its places


def test_values_nested_as_deep_as_the_parser_goes_in_any_field_are_counted_skips(tmp_path):
    """Every field of a record of each format holding a value nested just under the JSON parser's
    limit (so it parses, then is walked by the reader), in .jsonl and .json files: a counted
    skip, never RecursionError."""
    from palm.data.chat_readers import DROP_REASONS

    depth = next(d for d in range(1000, 0, -10) if _parses("[" * d + "]" * d))
    deep = "[" * depth + "]" * depth
    record = {**judgement(), **CHAT, "chosen": "a", "rejected": "b", "instruction": "i", "response": "r"}
    for field in [*record, "text", "role", "context"]:
        line = json.dumps({k: v for k, v in record.items() if k != field})[:-1] + f', "{field}": {deep}}}'
        for suffix, text in ((".jsonl", line + "\n"), (".json", f"[{line}]")):
            path = tmp_path / f"r{suffix}"
            path.write_text(text)
            for fmt in ("auto", "rankings", "chat", "hh", "pairs", "instruction", "oasst"):
                for kind in ("sft", "prefs"):
                    _, counts = read(path, kind, fmt)
                    assert set(counts) <= {"read", *DROP_REASONS}, (field, fmt, kind, counts)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except RecursionError:
        return False
    return True
