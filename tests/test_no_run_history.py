"""No run history in the code's docstrings and comments (issue 37).

A docstring says why in a line or two and points at a dated record under ``benchmarks/records/``
where a number matters; timings, tok/s tables and the story of past runs go to those records
(``benchmarks/records/code-notes-2026-12-06.md`` holds what the code carried until then). This
reads every docstring (and every bare string statement) and every ``#`` comment of ``palm/``,
``stages/`` and ``pipelines/`` as text, imports nothing, and names each line that looks like run
history.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("palm", "stages", "pipelines")

# what run history looks like; each pattern is specific enough that plain documentation passes
# ("tokens/s and MFU count the pairs' tokens", a path naming a dated record, a timestamp format)
PATTERNS = {
    "a throughput or time figure": re.compile(
        r"\d[\d,.]*\s?(tokens/s|tok/s|[GT]FLOP/s|ms\b|us\b|µs|s per step)", re.I),
    "a timing against another": re.compile(r"\d[\d.]* (vs|against|->) \d[\d.,]* ?(s|ms|us)\b"),
    "a measured speed-up": re.compile(r"\d(\.\d+)? ?[x×] (faster|slower)", re.I),
    "the machine a number was measured on": re.compile(r"\bmeasured (once )?on (a|an|one|\d)\b", re.I),
    "a core count of a measurement": re.compile(r"\b\d+-core\b|\bon \d+ cores\b"),
    "a CPU model": re.compile(r"\b(EPYC|Xeon|Ryzen|Zen ?\d)"),
    "a dated run": re.compile(r"(?<![\w/.-])20\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])(?![\w.:-])"),
    "a run's story": re.compile(
        r"at an earlier stop|this session|a third EPYC|a slow hour|medians? of \d|interleaved A/B", re.I),
}


def texts(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of the docstrings, bare string statements and ``#``
    comments of one module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            found += [(node.value.lineno + i, line) for i, line in enumerate(node.value.value.splitlines())]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found.append((tok.start[0], tok.string))
    return found


@functools.cache
def modules() -> dict[str, list[tuple[int, str]]]:
    """:func:`texts` of every module of ``TREES``, by path relative to the root (read once)."""
    return {str(path.relative_to(ROOT)): texts(path.read_text(encoding="utf-8"))
            for tree in TREES for path in sorted((ROOT / tree).rglob("*.py"))}


def history(source: str | list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """(line, what it looks like, the line) for each docstring or comment line of ``source``
    (a module's text, or its :func:`texts`) that carries run history."""
    lines = texts(source) if isinstance(source, str) else source
    return [(n, what, line.strip()) for n, line in lines
            for what, pattern in PATTERNS.items() if pattern.search(line)]


def test_no_docstring_or_comment_carries_run_history():
    bad = [f"{path}:{n}: {what}: {line}" for path, lines in modules().items()
           for n, what, line in history(lines)]
    assert not bad, ("run history belongs in a dated record under benchmarks/records/, the "
                     "docstring says why and points there:\n" + "\n".join(bad))


def test_pointers_to_records_resolve():
    """A docstring's ``benchmarks/records/<file>.md#<section>`` names a record that exists and,
    after ``#``, one of its ``## `` headings (GitHub's anchor of a lowercase, hyphenated one)."""
    pointer = re.compile(r"benchmarks/records/([\w.-]+\.(?:md|json))(?:#([\w-]+))?")
    bad = []
    for path, lines in modules().items():
        for n, line in lines:
            for name, anchor in pointer.findall(line):
                record = ROOT / "benchmarks" / "records" / name
                headings = ({h[3:].strip() for h in record.read_text(encoding="utf-8").splitlines()
                             if h.startswith("## ")} if record.is_file() else set())
                if not record.is_file() or (anchor and anchor not in headings):
                    bad.append(f"{path}:{n}: {name}#{anchor}")
    assert not bad, "pointers to no record or no section of it:\n" + "\n".join(bad)


def test_the_patterns_catch_history_and_pass_plain_documentation():
    caught = [
        "# the stage fell from 3,900 to 2,900 tokens/s",
        "# 1.19x at 16 prompts (3,646 -> 4,330 tok/s)",
        "# measured on a 2-core CPU: megatron.core 7.9 s",
        "# matmul on a slow path (1.3 vs 80 GFLOP/s per thread)",
        "# the optimizer step alone 4.5x faster (217 -> 48 ms)",
        "# the default fp32 training step 1.09x faster (0.69 vs 0.76 s)",
        "# on a 2-core AMD EPYC (Zen 3, AVX2 only)",
        "# a run on 2026-12-05 at an earlier stop",
        "# interleaved A/B, medians of 5",
    ]
    plain = [
        "# tokens/s and MFU count the pairs' tokens, not the padding",
        "# the measured matmul peak in that dtype (for MFU)",
        "# An id of what the numbers were measured on: the prompts and references",
        "# numbers: benchmarks/records/code-notes-2026-12-06.md#decoder",
        '# "time": "2026-01-01T12:00:00Z"',
        "# ValueError: a scalar YAML cannot build (2001-13-45)",
        "# the frozen reference; 4 x --limit prompts; s*h rows",
        "# a retry after 2 + 4 s, not 62 s",
    ]
    assert all(history(line) for line in caught), [line for line in caught if not history(line)]
    assert not any(history(line) for line in plain), [history(line) for line in plain if history(line)]
