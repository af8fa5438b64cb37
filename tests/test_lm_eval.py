"""``palm eval-task`` (palm/eval/lm_eval_task.py): EleutherAI's lm-evaluation-harness, run as a
user runs it (``python -m lm_eval --model hf`` in a subprocess, offline) on a ``palm export hf``
folder and the task folder, scores every choice with the log-likelihood the project computes
(``palm.eval.evaluate.reply_logprobs`` on the project's own export and tokenizer) to 1e-4.

The items are checked against the valid shard itself: each context and true continuation are
a window of one document's tokens, and lm-eval scored each with exactly the strings of the file.
The task folder is moved before lm-eval runs, from another working directory (its paths are its
own). Missing shards, another tokenizer and windows longer than the model are one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MODEL, TEXT, make_tokenizer, make_tokens  # noqa: E402

from palm.apps import cli  # noqa: E402

TOL = 1e-4  # summed over 8 tokens in fp32
CONTEXT, TARGET, CHOICES = 24, 8, 3
NAME = "palm_tiny"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tok) -> Path:
    """Four documents of the test corpus' lines (long enough for a few windows each)."""
    lines = [line for line in TEXT.splitlines() if line.strip()]
    texts = ["\n".join(lines[i::4]) for i in range(4)]
    return make_tokens(tmp_path_factory.mktemp("data") / "tokens", tok, texts)


@pytest.fixture(scope="module")
def task(tmp_path_factory, chat, tokens) -> Path:
    built = tmp_path_factory.mktemp("built") / "task"
    assert cli.main(["eval-task", str(chat), str(built), "--tokens", str(tokens), "--name", NAME,
                     "--context-tokens", str(CONTEXT), "--target-tokens", str(TARGET),
                     "--choices", str(CHOICES)]) == 0
    moved = tmp_path_factory.mktemp("moved") / "task"
    shutil.move(built, moved)
    return moved


def items(task: Path) -> list[dict]:
    return [json.loads(line) for line in (task / f"{NAME}.jsonl").read_text().splitlines()]


def test_items_are_windows_of_the_valid_shard(task, tokens, chat):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from palm.model.export import load_tokenizer, read_export

    tok = load_tokenizer(read_export(chat))
    shard = IndexedDataset(str(tokens / "valid"))
    got = items(task)
    assert len(got) >= 6 and {it["doc"] for it in got} == {0, 1, 2, 3}
    assert len({it["label"] for it in got}) > 1  # the true continuation is not always in one place
    for it in got:
        assert len(it["choices"]) == CHOICES == len(set(it["choices"]))
        true = tok.encode(it["context"]).ids + tok.encode(it["choices"][it["label"]]).ids
        assert true == shard[it["doc"]].tolist()[it["start"]:it["start"] + CONTEXT + TARGET]
        for choice in it["choices"]:  # every choice splits off the context as lm-eval splits it
            whole = tok.encode(it["context"] + choice).ids
            assert whole == tok.encode(it["context"]).ids + tok.encode(choice).ids
            assert len(tok.encode(choice).ids) == TARGET


def test_lm_eval_loglikelihoods_equal_the_projects(task, chat, tmp_path):
    from palm.eval.lm_eval_task import harness_command, harness_loglikelihoods, project_loglikelihoods

    hf = tmp_path / "hf"
    assert cli.main(["export", "hf", str(chat), str(hf)]) == 0
    home = tmp_path / "hf_home"  # transformers' modules and datasets' cache: throwaway, never ~/.cache
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "results"
    cmd = harness_command(hf, task, NAME, out)
    assert cmd[0] == "lm_eval"  # the console script, from this interpreter's environment
    run = subprocess.run([sys.executable, "-m", *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [samples] = out.rglob(f"samples_{NAME}_*.jsonl")
    [results] = out.rglob("results_*.json")

    got = items(task)
    theirs = harness_loglikelihoods(samples)
    ours = project_loglikelihoods(chat, got)
    assert sorted(theirs) == list(range(len(got)))
    diff = 0.0
    for i, it in enumerate(got):
        assert theirs[i]["args"] == [[it["context"], c] for c in it["choices"]]  # the file's strings, as they are
        diff = max(diff, *(abs(a - b) for a, b in zip(theirs[i]["ll"], ours[i])))
        # lm-eval's accuracy is the project's: the true continuation scores highest
        assert theirs[i]["acc"] == float(max(range(CHOICES), key=ours[i].__getitem__) == it["label"])
    print(f"max |log-likelihood difference| over {len(got)} items x {CHOICES} choices: {diff:.3g}")
    assert diff < TOL
    assert min(min(v) for v in ours) < -TARGET  # premise: sums of order 10 (not all ~0), so TOL is tight
    acc = json.loads(results.read_text())["results"][NAME]["acc,none"]
    assert acc == pytest.approx(sum(theirs[i]["acc"] for i in theirs) / len(got))


def test_errors_are_one_line(chat, tokens, tmp_path, capsys, tok):
    def error(*argv: str) -> str:
        assert cli.main(["eval-task", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: eval-task: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "no meta.json" in error(str(chat), str(tmp_path / "t1"), "--tokens", str(tmp_path / "nowhere"))
    assert "exceeds the model's seq_len" in error(str(chat), str(tmp_path / "t2"), "--tokens", str(tokens),
                                                   "--context-tokens", str(MODEL.seq_len))
    assert "no window" in error(str(chat), str(tmp_path / "t3"), "--tokens", str(tokens),
                                "--context-tokens", "100", "--target-tokens", "20")
    assert "context_tokens" in error(str(chat), str(tmp_path / "t4"), "--tokens", str(tokens), "--context-tokens", "0")
    other = make_tokens(tmp_path / "other", make_tokenizer(tmp_path / "tok2", vocab=380))
    assert "tokenized with tokenizer sha256" in error(str(chat), str(tmp_path / "t5"), "--tokens", str(other))
    assert not any((tmp_path / f"t{i}").exists() for i in range(1, 6))
