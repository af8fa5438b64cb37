"""What the chat data stages (palm/data/chat.py) say about what they leave out, and how much they
hold out: one warning line per drop reason above a tenth of the input, naming the setting to
turn; a valid split of at least min(min_valid, a quarter of the examples), the default split
unchanged where valid_fraction already holds out enough. On small hh-rlhf-style files and the
OASST trees, through the stage CLI and the library."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import chat_project, make_tokenizer, metrics, run_stage_cli, set_params

from palm.data.chat import DROP_TEXT, ChatDataConfig, build_chat_data, split_groups
from palm.data.chat_readers import DROP_REASONS
from palm.data.split import split_score
from palm.data.tokenize import TokenizeConfig, choose_valid

pytestmark = pytest.mark.timeout(900)
ARGS = ["--corpus", "data/corpus", "--tokenizer", "artifacts/tokenizer", "--no-mlflow"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def hh(question: str, good: str, bad: str) -> dict:
    """One hh-rlhf record: the same prompt, a chosen and a rejected reply."""
    return {"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
            "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def valid_groups(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "valid.parquet").column("group_id").to_pylist())


def test_most_replies_too_long_is_one_warning_line_with_the_share_and_the_knob(tmp_path):
    """7 of 10 hh records have a reply longer than model.seq_len, and 1 line is not JSON: each
    stage prints one warning (too_long, 7 of 11: 64 %) and none for the malformed line (9 %)."""
    root = chat_project(tmp_path / "p", sft_data={"path": "hh.jsonl", "min_valid": 1},
                        prefs={"path": "hh.jsonl", "min_valid": 1})
    long = "the reply goes on and on about the function " * 40
    records = [hh(f"What does f{i} do?", long if i < 7 else "It returns.", "No idea.") for i in range(10)]
    write_jsonl(root / "hh.jsonl", [*records, "{not json"])
    for stage, out, unit, reply in (("sft_data", "data/sft", "conversations", "the final reply alone"),
                                    ("prefs", "data/prefs", "preference pairs", "a reply alone")):
        res = run_stage_cli(stage, ARGS + ["--out", out], cwd=root)
        assert res.returncode == 0, res.stderr[-3000:]
        line = (f"warning: {stage}: dropped 7 of 11 {unit} (64 %) as too_long: {reply} longer than model.seq_len "
                "128 tokens (raise model.seq_len)")
        assert warnings(res.stderr) == [line], res.stderr[-3000:]
        m = metrics(root, stage)  # the counts stay in the metrics
        assert (m["read"], m["kept"], m["dropped_too_long"], m["dropped_malformed_json"]) == (11, 3, 7, 1)
    set_params(root, model={"seq_len": 1024})  # room for every reply: no warning at all
    res = run_stage_cli("sft_data", ARGS + ["--out", "data/sft"], cwd=root)
    assert res.returncode == 0 and warnings(res.stderr) == [], res.stderr[-3000:]


def test_a_small_file_holds_out_a_quarter_and_says_how_few(tmp_path, tok_dir, capsys):
    """40 prompts at valid_fraction 0.05 (which alone holds out fewer than 10): 10 held out (a
    quarter, below min_valid 32), the same 10 each time, the lowest hash scores; one line says so."""
    write_jsonl(tmp_path / "hh.jsonl", [hh(f"What does f{i} do?", f"It returns {i}.", "No idea.") for i in range(40)])
    cfg = ChatDataConfig(path="hh.jsonl")
    assert (cfg.valid_fraction, cfg.min_valid) == (0.05, 32)
    for kind, section, what in (("sft", "sft_data", "conversations"), ("prefs", "prefs", "preference pairs")):
        outs = []
        for run in range(2):
            out = tmp_path / f"{kind}{run}"
            out.mkdir()
            m = build_chat_data(kind, cfg, corpus=tmp_path, tokenizer=tok_dir, seq_len=128, out=out, root=tmp_path)
            assert (m["kept"], m["train"], m["valid"]) == (40, 30, 10)
            outs.append(out)
            then = ("evaluate gives no verdict on fewer held-out prompts than evaluate.min_prompts" if kind == "sft"
                    else "the reward model's held-out accuracy rests on them")
            line = (f"warning: {section}: only 10 of the 40 {what} held out, fewer than {section}.min_valid 32: "
                    f"{then}; add data to {section}.path")
            assert warnings(capsys.readouterr().err) == [line]
        groups = valid_groups(outs[0])
        assert groups == valid_groups(outs[1])  # deterministic
        train = pq.read_table(outs[0] / "train.parquet").column("group_id").to_pylist()
        by_fraction = choose_valid(sorted(groups + train), TokenizeConfig(valid_fraction=0.05, seed=cfg.seed))
        assert len(by_fraction) < 10 and by_fraction <= set(groups)  # more than valid_fraction, its prompts first
        assert max(split_score(g, cfg.seed) for g in groups) < min(split_score(g, cfg.seed) for g in train)
    # min_valid below a quarter: min_valid; 0: valid_fraction alone, and no line
    for min_valid, held in ((6, 6), (0, len(by_fraction))):
        out = tmp_path / f"sft-min{min_valid}"
        out.mkdir()
        m = build_chat_data("sft", ChatDataConfig(path="hh.jsonl", min_valid=min_valid), corpus=tmp_path,
                            tokenizer=tok_dir, seq_len=128, out=out, root=tmp_path)
        assert m["valid"] == held and warnings(capsys.readouterr().err) == []


def test_the_split_is_unchanged_where_valid_fraction_holds_out_enough():
    """The default data's scale (~1700 prompts, 5 %): the same groups as choose_valid alone;
    groups of several examples: at least the quarter, never every group."""
    sha1s = [hashlib.sha1(f"question {i}".encode()).hexdigest() for i in range(1700)]
    by_fraction = choose_valid(sorted(sha1s), TokenizeConfig(valid_fraction=0.05, seed=1234))
    assert len(by_fraction) >= 32
    assert split_groups(dict.fromkeys(sha1s, 1), 0.05, 1234, 32) == by_fraction
    assert split_groups(dict.fromkeys(sha1s, 3), 0.05, 1234, 32) == by_fraction  # pairs: 3 per prompt
    few = {s: 1 + i % 5 for i, s in enumerate(sha1s[:12])}  # 12 prompts, 33 examples: a quarter is 8
    valid = split_groups(few, 0.05, 1234, 32)
    assert sum(few[g] for g in valid) >= 8 and len(valid) < len(few)
    assert split_groups({"a": 10, "b": 10}, 0.05, 1234, 32) in ({"a"}, {"b"})  # one group stays for training


def test_every_drop_reason_has_its_words_and_a_tenth_does_not_warn():
    from palm.data.chat import drop_warnings

    assert set(DROP_TEXT) == set(DROP_REASONS)
    assert drop_warnings("sft", {"duplicate": 1}, 9, 256) == []  # 1 of 10: not more than a tenth
    line = ("warning: prefs: dropped 2 of 12 preference pairs (17 %) as duplicate: exact duplicates of examples "
            "already kept (check prefs.path for sources that overlap)")
    assert drop_warnings("prefs", {"duplicate": 2, "empty_turn": 1}, 9, 256) == [line]


def test_the_oasst_trees_at_seq_len_256_warn_about_the_long_replies(shared_data, tmp_path, tok_dir, capsys):
    """The user's case: 100 OASST trees at model.seq_len 256. The drop is said on stderr, not only
    counted in the metrics (5 synthetic prompts of 100 stay under a tenth: no line)."""
    cfg = ChatDataConfig(path=str(shared_data / "oasst" / "en_100_tree.jsonl"), min_valid=0)
    out = tmp_path / "sft"
    out.mkdir()
    m = build_chat_data("sft", cfg, corpus=tmp_path, tokenizer=tok_dir, seq_len=256, out=out)
    n, total = m["dropped_too_long"], m["kept"] + sum(m[f"dropped_{r}"] for r in DROP_REASONS)
    assert n > total / 10 and m["dropped_synthetic"] == 5
    line = (f"warning: sft_data: dropped {n} of {total} conversations ({100 * n / total:.0f} %) as too_long: the "
            "final reply alone longer than model.seq_len 256 tokens (raise model.seq_len)")
    assert warnings(capsys.readouterr().err) == [line]
