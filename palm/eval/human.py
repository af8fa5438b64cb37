"""The people's verdict on two models: blind A/B judgements of ``palm feedback compare``.

Model **A** is the baseline (``palm feedback compare A B``: the first model, e.g. ``models/sft``
or ``models:/palm-chat@champion``), model **B** the candidate (the policy under test, e.g.
``models/ppo``). :func:`human_verdict` reports how often people preferred B, in the same sense as
the evaluate stage's ``win_rate`` (the PPO policy over the SFT one): 1 means B always won.

The judgments file (``data/judgments/judgments.jsonl``) is one JSON object a line, appended and
synced to disk one judgement at a time (:data:`FORMAT`): ``comparison`` (the id of the sampled
items), ``index`` (the item), ``prompt``, ``model_a`` and ``model_b`` (each ``ref``, ``path``,
``kind``, ``tokenizer_sha256``, ``weights_sha256``), ``replies`` (``a``, ``b``), ``choice``
(:data:`CHOICES`, in A/B terms), ``a_side`` (``left`` or ``right``: where A was shown),
``labeler`` and ``time``. A labeler's latest judgement of an item replaces their earlier ones.
A server killed while writing leaves at most a partial last line (ignored here; the next append
cuts it off), so a malformed line anywhere else is an error.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from palm.core.errors import UserError

FORMAT = "palm-ab-judgment/1"
CHOICES = ("a", "b", "tie", "both_bad")  # A better, B better, as good, neither acceptable
SIDES = ("left", "right")
SCORE = {"a": 0.0, "b": 1.0, "tie": 0.5, "both_bad": 0.5}  # B's win per judgement
FLIP = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}


def _judgment(record: Any) -> bool:
    """Whether ``record`` is a judgement this module can count."""
    return (isinstance(record, dict) and record.get("format") == FORMAT
            and isinstance(record.get("comparison"), str)
            and isinstance(record.get("index"), int) and not isinstance(record["index"], bool)
            and record["index"] >= 0 and record.get("choice") in CHOICES and record.get("a_side") in SIDES
            and isinstance(record.get("labeler"), str)
            and all(isinstance(record.get(m), dict) for m in ("model_a", "model_b")))


def read_judgments(path: Path) -> list[dict[str, Any]]:
    """Every judgement of the file, in order (none when it does not exist yet). A partial last
    line is skipped; any other line that is not a judgement is a UserError naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline; else a line never finished
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not _judgment(record):
            raise UserError(f"{path}:{n}: not a judgement ({FORMAT}: comparison, index, choice, a_side, labeler, "
                            "model_a, model_b); fix or delete that line")
        out.append(record)
    if torn.strip():
        try:
            record = json.loads(torn)
        except (ValueError, RecursionError):
            record = None  # cut off by a killed server: it was never confirmed
        if record is not None and not _judgment(record):
            raise UserError(f"{path}:{len(lines) + 1}: not a judgement ({FORMAT}); fix or delete that line")
        if record is not None:
            out.append(record)
    return out


def latest(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """``(comparison, index, labeler) -> that labeler's latest judgement of the item``."""
    return {(r["comparison"], r["index"], r["labeler"]): r for r in records}


def _weights_sha256(folder: Path) -> str | None:
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        return None
    with open(weights, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _matcher(model: Any):
    """A test of a stored identity against ``model``: an identity (its ``weights_sha256``), a
    weights sha256, an export folder (hashed: judgements of the same weights under another path
    count) or a reference as given to ``palm feedback compare`` (a registry URI)."""
    if isinstance(model, Mapping):
        sha = model.get("weights_sha256")
        return lambda ident: ident.get("weights_sha256") == sha
    text = str(model)
    sha = text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None
    if sha is None and Path(text).is_dir():
        sha = _weights_sha256(Path(text))
    if sha is not None:
        return lambda ident: ident.get("weights_sha256") == sha
    return lambda ident: text in (ident.get("ref"), ident.get("path"))


def _oriented(records: list[dict[str, Any]], model_a: Any, model_b: Any) -> list[dict[str, Any]]:
    """The judgements of the pair, their choices in the caller's A/B terms (flipped where the
    stored A is the caller's B)."""
    if model_a is None and model_b is None:
        return records
    is_a = _matcher(model_a) if model_a is not None else (lambda ident: True)
    is_b = _matcher(model_b) if model_b is not None else (lambda ident: True)
    out = []
    for r in records:
        if is_a(r["model_a"]) and is_b(r["model_b"]):
            out.append(r)
        elif is_a(r["model_b"]) and is_b(r["model_a"]):
            out.append({**r, "choice": FLIP[r["choice"]], "model_a": r["model_b"], "model_b": r["model_a"]})
    return out


def human_verdict(path: Path, *, model_a: Any = None, model_b: Any = None) -> dict[str, Any]:
    """People's verdict on B (the candidate) against A (the baseline) from a judgments file.

    ``model_a``, ``model_b``: count only the judgements of that pair, in either stored order (a
    comparison run as ``compare B A`` has its choices flipped); each is an export folder (matched
    by its weights' sha256), a weights sha256, an identity dict, or a reference as given to the
    command. ``None``: any model in that role (both ``None``: every judgement as stored).

    Items (a comparison's prompt) are the units: each item's judgements (one per labeler, their
    latest) are averaged first. Keys: ``human_win_rate`` (B better 1, A better 0, tie and both
    bad 1/2, the mean over items), ``human_win_rate_se`` (the standard error of the per-item means;
    only with >= 2 items), ``human_judgments``, ``human_items``, ``human_labelers`` (distinct),
    ``human_both_bad`` (the share of judgements), ``human_agreement`` (over the items judged by
    >= 2 labelers, the share of labeler pairs on an item who made the same choice; only where
    there is such an item) and ``human_comparisons`` (the comparison ids counted: a list of text,
    not a metric). Without judgements only the counts and the ids are returned, no nan.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such judgments file (make one with palm feedback compare A B)")
    judged = list(latest(_oriented(read_judgments(path), model_a, model_b)).values())
    items: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in judged:
        items[(r["comparison"], r["index"])].append(r["choice"])
    out: dict[str, Any] = {"human_judgments": len(judged), "human_items": len(items),
                           "human_labelers": len({r["labeler"] for r in judged}),
                           "human_comparisons": sorted({r["comparison"] for r in judged})}
    if not judged:
        return out
    means = np.array([np.mean([SCORE[c] for c in choices]) for choices in items.values()])
    out["human_win_rate"] = float(means.mean())
    if len(means) >= 2:
        out["human_win_rate_se"] = float(means.std(ddof=1) / np.sqrt(len(means)))
    out["human_both_bad"] = sum(r["choice"] == "both_bad" for r in judged) / len(judged)
    pairs = [a == b for choices in items.values() for a, b in itertools.combinations(choices, 2)]
    if pairs:
        out["human_agreement"] = sum(pairs) / len(pairs)
    return out
