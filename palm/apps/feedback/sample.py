"""``palm feedback sample``: K replies per prompt from one model, written as a batch for people to
rank (``palm feedback serve``).

A batch is a ``.jsonl`` file, one item a line::

    {"format": "palm-feedback-batch/1", "batch": "batch-1", "item": "<id>", "index": 0,
     "prompt": [{"role": "user", "content": "…"}], "replies": ["…", …],
     "model": {"ref", "path", "kind", "tokenizer_sha256", "weights_sha256"},
     "sampling": {"temperature", "top_k", "top_p", "max_new_tokens", "seed", "k"}}

``batch`` is the file's name without ``.jsonl``; ``item`` is a hash of the prompt and the replies.
Prompts come from a file (``.txt``: one user turn a line; ``.jsonl``: ``{"prompt": "…"}`` or
``{"messages": [{"role", "content"}, …]}`` ending with a user turn) or, by default, from the
train split of ``data/sft`` (each conversation up to its last reply: the prompts the SFT model
learnt from, not the held-out ones ``evaluate`` keeps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from palm.core.errors import UserError
from palm.data.chat_readers import Conversation, Skip, Turn, data_files, file_records, prompt_of

BATCH_FORMAT = "palm-feedback-batch/1"


def messages(conv: Conversation) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.text} for t in conv]


def read_prompts(path: Path) -> list[Conversation]:
    """The prompts of a ``.txt`` or ``.jsonl`` file (see the module docstring)."""
    from collections import Counter

    from palm.data.chat_readers import _chat

    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"{path}: no such prompts file")
        prompts = [(Turn("user", line.strip()),) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    else:
        counts: Counter = Counter()
        prompts = []
        for record in (r for f in data_files(path) for r in file_records(f, counts)):
            try:
                if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
                    prompts.append((Turn("user", record["prompt"].strip()),))
                elif isinstance(record, dict) and "messages" in record:
                    msgs = record["messages"]
                    # a prompt ends with a user turn; _chat checks roles and texts of a whole conversation
                    conv = _chat({"messages": [*msgs, {"role": "assistant", "content": "-"}]})[:-1]
                    prompts.append(prompt_of(conv))
                else:
                    raise Skip("missing_field")
            except Skip:
                raise UserError(f"{path}: record {len(prompts) + 1} is not a prompt ({{\"prompt\": text}} or "
                                f"{{\"messages\": [...]}} ending with a user turn)") from None
    if not prompts:
        raise UserError(f"{path}: holds no prompts")
    return prompts


def turns_of_ids(tokenizer: Any, ids: Sequence[int]) -> Conversation:
    """The turns of template token ids (role token, text, ``<|end|>``; a trailing ``<|assistant|>``
    is left out): the inverse of :meth:`palm.data.chat.ChatTemplate.render`."""
    from palm.core.tokenizer import special_ids

    sp = special_ids(tokenizer)
    roles = {sp["system_id"]: "system", sp["user_id"]: "user", sp["assistant_id"]: "assistant"}
    turns, role, body = [], None, []
    for t in ids:
        if t in roles:
            role, body = roles[t], []
        elif t == sp["end_turn_id"] and role is not None:
            turns.append(Turn(role, tokenizer.decode(body, skip_special_tokens=True)))
            role = None
        elif role is not None:
            body.append(t)
    return tuple(turns)


def sft_prompts(folder: Path, tokenizer: Any, tokenizer_sha256: str, limit: int) -> list[Conversation]:
    """Prompts of the train split of ``data/sft`` (each conversation up to its last reply; rows
    whose prompt was cut to fit are left out)."""
    from palm.data.chat import load_sft
    from palm.eval.evaluate import held_out_prompts

    rows = [r for r in load_sft(folder, "train", tokenizer_sha256).to_pylist() if not r["truncated"]]
    out = []
    for p in held_out_prompts(rows, 0):
        try:
            out.append(prompt_of(turns_of_ids(tokenizer, p["prompt_ids"])))
        except Skip:
            continue
        if len(out) >= limit:
            break
    if not out:
        raise UserError(f"{folder}: no prompts in its train split; pass --prompts FILE")
    return out


def model_identity(ref: str, export: Any) -> dict[str, Any]:
    """What says which model made a reply: the reference given, the folder, its kind, the
    tokenizer's and the weights' sha256, and a registry version where the export records one."""
    from palm.core.tokenizer import sha256_file

    ident = {"ref": str(ref), "path": str(export.path), "kind": export.kind,
             "tokenizer_sha256": export.tokenizer_sha256,
             "weights_sha256": sha256_file(export.path / "model.safetensors")}
    for key in ("registry", "version"):
        if key in export.config:
            ident[key] = export.config[key]
    return ident


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    k: int = 4  # replies per prompt
    max_new_tokens: int = 128
    seed: int = 0  # generation chunk j draws from a generator seeded seed + j
    batch_size: int = 32  # sequences per generate call


def sample_replies(model: Any, tokenizer: Any, prompts: list[Conversation], sampling: Any,
                   settings: SampleSettings) -> list[list[str]]:
    """``settings.k`` replies to each prompt (prompts cut from the left to leave room for
    ``max_new_tokens``, as ``palm chat`` cuts them)."""
    import torch

    from palm.core.tokenizer import special_ids
    from palm.data.chat import ChatTemplate
    from palm.decode.generate import generate

    template = ChatTemplate(tokenizer)
    sp = special_ids(tokenizer)
    stop = (sp["end_turn_id"], sp["eod_id"])
    room = model.cfg.seq_len - settings.max_new_tokens
    rows = [template.render_prompt(p)[-room:] for p in prompts for _ in range(settings.k)]
    device = model.embedding.weight.device
    texts: list[str] = []
    for j, i in enumerate(range(0, len(rows), settings.batch_size)):
        gen = generate(model, rows[i:i + settings.batch_size], settings.max_new_tokens,
                       temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                       stop_ids=stop, pad_id=sp["pad_id"],
                       generator=torch.Generator(device).manual_seed(settings.seed + j))
        for row, mask in zip(gen.response, gen.response_mask):
            ids = [t for t in row[mask].tolist() if t not in stop]
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return [texts[i:i + settings.k] for i in range(0, len(texts), settings.k)]


def batch_items(batch: str, prompts: list[Conversation], replies: list[list[str]], model: dict,
                sampling: dict) -> list[dict[str, Any]]:
    items = []
    for i, (prompt, rs) in enumerate(zip(prompts, replies)):
        body = json.dumps([messages(prompt), rs], ensure_ascii=False)
        items.append({"format": BATCH_FORMAT, "batch": batch, "item": hashlib.sha1(body.encode()).hexdigest()[:16],
                      "index": i, "prompt": messages(prompt), "replies": rs, "model": model, "sampling": sampling})
    return items


def write_batch(path: Path, items: list[dict[str, Any]]) -> None:
    from palm.core.io import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
