"""The README stays short, its links lead somewhere, and its Python example runs.

The example is taken from README.md as written and run against a tiny chat export built here,
with only its model path changed, so an API change that breaks it fails this test."""

from __future__ import annotations

import contextlib
import io
import re

from helpers import ROOT, chat_export, make_tokenizer

README = ROOT / "README.md"
MAX_LINES = 250  # issue 37: a newcomer reads it in one sitting; the rest is in docs/


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES} (move detail to docs/)"
    first_screen = "\n".join(lines[:40])
    assert "make run" in first_screen and "make test" in first_screen


def test_readme_relative_links_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the README itself
        path = target.split("#", 1)[0]
        if not (ROOT / path).exists():
            broken.append(target)
    assert not broken, f"README.md links to missing files: {broken}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) == 1, "README.md should hold exactly one Python example (the one this test runs)"
    code = blocks[0]
    assert code.count('"models/sft"') == 1, "the example should load models/sft (the path this test replaces)"
    model = chat_export(tmp_path / "sft", make_tokenizer(tmp_path / "tok"), kind="sft")
    code = code.replace('"models/sft"', repr(str(model)))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    printed = out.getvalue().splitlines()
    assert len(printed) >= 3, printed  # two replies, then their log-probabilities
    assert printed[-1].startswith("tensor(["), printed[-1]
