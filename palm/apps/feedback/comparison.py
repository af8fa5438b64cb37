"""The sampled items of ``palm feedback compare``: one reply of model A (the baseline) and one of
model B (the candidate) to each prompt, both sampled with the same seed, and the side A is shown
on, drawn per item.

A comparison file, ``compare-<id>.jsonl`` beside the judgments, holds one item a line::

    {"format": "palm-feedback-compare/1", "comparison": "<id>", "index": 0,
     "prompt": [{"role": "user", "content": "…"}], "replies": {"a": "…", "b": "…"}, "a_side": "left",
     "model_a": {"ref", "path", "kind", "tokenizer_sha256", "weights_sha256"}, "model_b": {…},
     "sampling": {"temperature", "top_k", "top_p", "max_new_tokens", "seed"}}

The id is a hash of both models' tokenizer and weights sha256 (in their roles), the prompts and
the sampling, so the same command on the same models finds its file again and reuses the
replies, and another model, prompt or setting makes another file. The file is written whole
(a temporary file renamed), so it is either absent or complete.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from palm.apps.feedback.sample import SampleSettings, messages, sample_replies, turns_of_ids
from palm.core.errors import UserError
from palm.data.chat_readers import Conversation, Skip, prompt_of

COMPARE_FORMAT = "palm-feedback-compare/1"
SIDES = ("left", "right")


def held_out_prompts(folder: Path, tokenizer: Any, tokenizer_sha256: str, limit: int) -> list[Conversation]:
    """The first ``limit`` (0: all) held-out prompts of ``data/sft``: its valid split, each
    conversation up to its last reply, as the evaluate stage takes them."""
    from palm.data.chat import load_sft
    from palm.eval.evaluate import held_out_prompts as evaluate_prompts

    rows = load_sft(folder, "valid", tokenizer_sha256).select(["input_ids", "loss_mask"]).to_pylist()
    out = []
    for p in evaluate_prompts(rows, 0):
        try:
            out.append(prompt_of(turns_of_ids(tokenizer, p["prompt_ids"])))
        except Skip:
            continue
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{folder}: no prompts in its valid split; pass --prompts-file FILE")
    return out


def comparison_id(model_a: dict, model_b: dict, prompts: list[Conversation], sampling: dict) -> str:
    content = lambda m: {k: m[k] for k in ("tokenizer_sha256", "weights_sha256")}  # noqa: E731
    body = json.dumps({"a": content(model_a), "b": content(model_b), "prompts": [messages(p) for p in prompts],
                       "sampling": sampling}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def comparison_path(judgments: Path, comparison: str) -> Path:
    return Path(judgments).parent / f"compare-{comparison}.jsonl"


def sample_pair(exports: tuple[Any, Any], prompts: list[Conversation], sampling: Any,
                settings: SampleSettings) -> tuple[list[str], list[str]]:
    """One reply of each model to each prompt, model by model (one in memory at a time), each
    drawn as ``palm feedback sample --k 1`` with the same seed would draw it; a progress bar on
    a terminal."""
    from tqdm import tqdm

    from palm.model.export import load_model, load_tokenizer
    from palm.model.parallel import process_groups

    out = []
    size = settings.batch_size
    with process_groups(), tqdm(total=2 * len(prompts), desc="compare", unit="reply", disable=None) as bar:
        for export in exports:
            tokenizer, model = load_tokenizer(export), load_model(export)
            replies: list[str] = []
            for j, start in enumerate(range(0, len(prompts), size)):  # chunk j samples with seed + j
                chunk = prompts[start:start + size]
                step = SampleSettings(k=1, max_new_tokens=settings.max_new_tokens, seed=settings.seed + j,
                                      batch_size=size)
                replies += [r[0] for r in sample_replies(model, tokenizer, chunk, sampling, step)]
                bar.update(len(chunk))
            out.append(replies)
            del model
    return out[0], out[1]


def make_items(comparison: str, prompts: list[Conversation], replies_a: list[str], replies_b: list[str],
               model_a: dict, model_b: dict, sampling: dict) -> list[dict[str, Any]]:
    sides = random.Random(f"{comparison}/sides")  # the draw is stored: the page needs no seed
    return [{"format": COMPARE_FORMAT, "comparison": comparison, "index": i, "prompt": messages(p),
             "replies": {"a": a, "b": b}, "a_side": sides.choice(SIDES), "model_a": model_a, "model_b": model_b,
             "sampling": sampling}
            for i, (p, a, b) in enumerate(zip(prompts, replies_a, replies_b))]


def write_items(path: Path, items: list[dict[str, Any]]) -> None:
    from palm.core.io import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def _item(record: Any, comparison: str, index: int) -> bool:
    replies = record.get("replies") if isinstance(record, dict) else None
    return (isinstance(record, dict) and record.get("format") == COMPARE_FORMAT
            and record.get("comparison") == comparison and record.get("index") == index
            and isinstance(record.get("prompt"), list) and record.get("a_side") in SIDES
            and isinstance(replies, dict) and all(isinstance(replies.get(k), str) for k in ("a", "b"))
            and all(isinstance(record.get(m), dict) for m in ("model_a", "model_b")))


def read_items(path: Path, comparison: str, prompts: list[Conversation] | None = None) -> list[dict[str, Any]]:
    """The items of the comparison file ``path``, checked to be those of ``comparison`` (and of
    ``prompts``, in order, when given); a one-line UserError otherwise."""
    path = Path(path)
    again = "delete it to sample the comparison again"
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err}); {again}") from None
    items = []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not _item(record, comparison, n):
            raise UserError(f"{path}:{n + 1}: not item {n} of comparison {comparison} ({COMPARE_FORMAT}); {again}")
        items.append(record)
    if not items:
        raise UserError(f"{path}: holds no items; {again}")
    if prompts is not None and [i["prompt"] for i in items] != [messages(p) for p in prompts]:
        raise UserError(f"{path}: its prompts are not those of comparison {comparison}; {again}")
    return items
