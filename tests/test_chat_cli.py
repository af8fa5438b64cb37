"""``palm chat`` (palm/apps/chat.py, palm/apps/cli.py): the installed console script driven through a pipe
(two turns, /reset, /quit) prints exactly what the same session computes in-process; the
history is kept, fitted to the context and reset; the stream decoder hands out whole
characters; a missing, incomplete or mismatched model folder is one line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, make_tokenizer  # noqa: E402

from palm.apps.chat import ChatSession, StreamDecoder  # noqa: E402
from palm.data.chat_readers import Turn  # noqa: E402
from palm.decode.generate import SamplingConfig  # noqa: E402
from palm.model.export import load_model, load_tokenizer, read_export  # noqa: E402
from palm.model.parallel import process_groups  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEW = 6  # tokens per reply: the tiny random model never ends a turn by itself


def palm_command() -> list[str]:
    """The console script ``make setup`` installs beside this interpreter, or the module when
    this environment has not installed the project."""
    script = Path(sys.executable).parent / "palm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "palm.apps.cli"]


def palm(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever is installed
    return subprocess.run([*palm_command(), *args], input=stdin, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def session(path: Path, **kw) -> ChatSession:
    ex = read_export(path)
    return ChatSession(load_model(ex), load_tokenizer(ex), max_new_tokens=NEW, **kw)


def test_two_turns_reset_quit_through_a_pipe_equal_the_session_in_process(export):
    res = palm("chat", str(export), "--temperature", "0", "--max-new-tokens", str(NEW),
               stdin="What does dumps do?\nAnd loads?\n/reset\nWhat does dumps do?\n/quit\nnever read\n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "palm chat:" in res.stderr and "(conversation cleared)" in res.stderr
    with process_groups():
        s = session(export, sampling=SamplingConfig(0.0))
        first = s.reply("What does dumps do?")
        second = s.reply("And loads?")  # with the first exchange in its prompt
        assert len(s.history) == 4
        s.reset()
        again = s.reply("What does dumps do?")
    assert again == first and len(first.strip()) > 3 and first != second  # premise: replies are text
    assert res.stdout == f"{first}\n{second}\n{first}\n"


def test_sampling_flags_and_the_seed(export):
    res = palm("chat", str(export), "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "7",
               "--max-new-tokens", str(NEW), "--system", "Be brief.", stdin="Hi\nHi\n")  # end of input ends it
    assert res.returncode == 0, res.stderr[-2000:]
    with process_groups():
        s = session(export, sampling=SamplingConfig(1.5, 50, 0.9), seed=7, system="Be brief.")
        assert res.stdout == f"{s.reply('Hi')}\n{s.reply('Hi')}\n"


def test_history_is_fitted_to_the_context_oldest_exchanges_first(export):
    notes = []
    with process_groups():
        s = session(export, system="Be brief.", note=notes.append)
        budget = MODEL.seq_len - NEW
        s.history = [t for i in range(8) for t in (Turn("user", f"question {i} " * 6),
                                                   Turn("assistant", f"answer {i} " * 6))]
        ids = s.prompt_ids("last one?")
        assert len(ids) <= budget and ids[0] == s.template.role_ids["system"]  # the system turn stays
        kept = len(s.history) // 2
        assert 0 < kept < 8 and s.history[-1].text == "answer 7 " * 6  # the newest exchanges stay
        assert ids == s.template.render_prompt((*s.system, *s.history, Turn("user", "last one?")))
        assert "oldest exchange" in notes[-1] and "no longer fit" in notes[-1]
        long_ids = s.prompt_ids("word " * 400)  # one turn longer than the context: cut from the left
        assert len(long_ids) == budget and long_ids[-1] == s.template.role_ids["assistant"]
        assert s.history == []


def test_stream_decoder_holds_back_a_split_character(export):
    tok = load_tokenizer(read_export(export))
    ids = tok.encode("naïve café ☕ done").ids
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.finish()]
    assert "".join(pieces) == tok.decode(ids) == "naïve café ☕ done"
    assert all("\ufffd" not in p for p in pieces)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: chat: "), res.stderr
    return lines[0]


def test_missing_incomplete_and_mismatched_folders_are_one_line(export, tmp_path):
    assert "no such model folder" in one_line_error(palm("chat", str(tmp_path / "nothing")))
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    (bad / "tokenizer.json").unlink()
    assert "tokenizer.json missing" in one_line_error(palm("chat", str(bad)))
    make_tokenizer(tmp_path / "other", vocab=380)  # another tokenizer beside the weights
    shutil.copy2(tmp_path / "other" / "tokenizer.json", bad / "tokenizer.json")
    assert "is not the tokenizer the model was trained with" in one_line_error(palm("chat", str(bad)))


def test_bad_flags_and_a_reward_model_are_one_line(export, tmp_path, capsys):
    from palm.apps.cli import main

    def error(*args: str) -> str:
        assert main(["chat", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: chat: "), lines
        return lines[0]

    assert "--max-new-tokens: must be between 1 and 127" in error(str(export), "--max-new-tokens", "128")
    assert "--temperature: must be >= 0" in error(str(export), "--temperature", "-1")
    assert "--top-p: must be in (0, 1]" in error(str(export), "--top-p", "1.5")
    reward = tmp_path / "reward"
    shutil.copytree(export, reward)
    config = json.loads((reward / "config.json").read_text())
    (reward / "config.json").write_text(json.dumps({**config, "kind": "reward", "reward": {"mean": 0, "std": 1}}))
    assert "a reward model, expected pretrain or sft or ppo" in error(str(reward))
