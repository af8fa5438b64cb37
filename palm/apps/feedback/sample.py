"""``palm feedback sample``: K replies per prompt from one model, written as a batch for people to
rank (``palm feedback serve``).

A batch is a ``.jsonl`` file, one item a line::

    {"format": "palm-feedback-batch/1", "batch": "batch-1", "item": "<id>", "index": 0,
     "prompt": [{"role": "user", "content": "…"}], "replies": ["…", …],
     "model": {"ref", "path", "kind", "tokenizer_sha256", "weights_sha256"},
     "sampling": {"temperature", "top_k", "top_p", "max_new_tokens", "seed", "k"},
     "reference": "…",                                  # where known: the prompt's documented answer
     "selection": {"method": "uncertain", …}}           # with --select uncertain only

``batch`` is the file's name without ``.jsonl``; ``item`` is a hash of the prompt and the replies.
Prompts come from a file (``.txt``: one user turn a line; ``.jsonl``: ``{"prompt": "…"}`` or
``{"messages": [{"role", "content"}, …]}`` ending with a user turn, either with an optional
``"reference": "…"``) or, by default, from the train split of ``data/sft`` (each conversation up
to its last reply, which is the item's ``reference``: the prompts the SFT model learnt from, not
the held-out ones ``evaluate`` keeps). ``reference`` is what ``palm feedback simulate`` judges
replies against; batches written before it existed, and prompts files without one, lack it (the
page does not need it).

Which prompts (``--select``): ``random`` (the default) takes the first ``--limit`` prompts of the
train split in its stored order (or every prompt of a file), choosing none by the models;
``uncertain`` samples K replies for each of the first ``--pool`` prompts (default 4 x ``--limit``),
scores them with a reward model and keeps the ``--limit`` prompts whose replies it separates
least (:func:`least_separated`): where a person's ranking may tell the reward model most
(margin-based uncertainty sampling, the simplest active learning; Christiano et al. 2017 query
where an ensemble of reward models disagrees). ``benchmarks/ranking_value.py`` measures whether
it helps (docs/feedback.md).
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
    return read_prompt_file(path)[0]


def read_prompt_file(path: Path) -> tuple[list[Conversation], list[str | None]]:
    """The prompts of a ``.txt`` or ``.jsonl`` file and each one's reference answer (None where
    the record gives none)."""
    from collections import Counter

    from palm.data.chat_readers import _chat

    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"{path}: no such prompts file")
        prompts = [(Turn("user", line.strip()),) for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        references: list[str | None] = [None] * len(prompts)
    else:
        counts: Counter = Counter()
        prompts, references = [], []
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
            reference = record.get("reference")
            references.append(reference if isinstance(reference, str) and reference.strip() else None)
    if not prompts:
        raise UserError(f"{path}: holds no prompts")
    return prompts, references


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
    return [p for p, _ in split_prompts(folder, tokenizer, tokenizer_sha256, limit)]


def split_prompts(folder: Path, tokenizer: Any, tokenizer_sha256: str, limit: int,
                  split: str = "train") -> list[tuple[Conversation, str]]:
    """``(prompt, reference)`` of the first ``limit`` (0: all) distinct prompts of a split of
    ``data/sft``: each conversation up to its last reply, and that reply's text (rows whose prompt
    was cut to fit are left out)."""
    from palm.data.chat import load_sft
    from palm.eval.evaluate import held_out_prompts

    rows = [r for r in load_sft(folder, split, tokenizer_sha256).to_pylist() if not r["truncated"]]
    out = []
    for p in held_out_prompts(rows, 0):
        try:
            prompt = prompt_of(turns_of_ids(tokenizer, p["prompt_ids"]))
        except Skip:
            continue
        out.append((prompt, tokenizer.decode(p["reply_ids"], skip_special_tokens=True).strip()))
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{folder}: no prompts in its {split} split; pass --prompts FILE")
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
                   settings: SampleSettings, progress: bool | None = False) -> list[list[str]]:
    """``settings.k`` replies to each prompt (prompts cut from the left to leave room for
    ``max_new_tokens``, as ``palm chat`` cuts them). ``progress``: a bar on stderr (None: where
    stderr is a terminal)."""
    import torch
    from tqdm import tqdm

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
    bar = tqdm(total=len(rows), desc="sample", unit="reply", disable=None if progress is None else not progress)
    for j, i in enumerate(range(0, len(rows), settings.batch_size)):
        gen = generate(model, rows[i:i + settings.batch_size], settings.max_new_tokens,
                       temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                       stop_ids=stop, pad_id=sp["pad_id"],
                       generator=torch.Generator(device).manual_seed(settings.seed + j))
        for row, mask in zip(gen.response, gen.response_mask):
            ids = [t for t in row[mask].tolist() if t not in stop]
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        bar.update(len(gen.response))
    bar.close()
    return [texts[i:i + settings.k] for i in range(0, len(texts), settings.k)]


# --- --select uncertain ----------------------------------------------------------------------------

def reward_scores(reward_model: Any, tokenizer: Any, prompts: list[Conversation], replies: list[list[str]],
                  scale: dict[str, float], batch_size: int = 32, progress: bool | None = False) -> list[list[float]]:
    """The reward model's normalised score ``(r - mean) / std`` (the reward stage's ``scale``) of
    every reply, each tokenised as the prefs stage tokenises a ranked reply (prompt, ``<|assistant|>``,
    the text, ``<|end|>``) and cut from the left to the model's context."""
    from tqdm import tqdm

    from palm.data.chat import ChatTemplate
    from palm.eval.evaluate import scores

    template = ChatTemplate(tokenizer)
    seq_len = reward_model.cfg.seq_len
    seqs = [(template.render_prompt(p) + template.render_reply(r))[-seq_len:] for p, rs in zip(prompts, replies)
            for r in rs]
    raw = []
    chunk = 8 * batch_size  # a bar step; within one, rows are scored in order of length
    with tqdm(total=len(seqs), desc="score", unit="reply", disable=None if progress is None else not progress) as bar:
        for i in range(0, len(seqs), chunk):
            raw += scores(reward_model, seqs[i:i + chunk], batch_size).tolist()
            bar.update(len(seqs[i:i + chunk]))
    norm = [(r - scale["mean"]) / scale["std"] for r in raw]
    out, at = [], 0
    for rs in replies:
        out.append(norm[at:at + len(rs)])
        at += len(rs)
    return out


def spread(values: Sequence[float]) -> float:
    """How far apart the reward model puts one prompt's replies: the (population) standard
    deviation of their normalised scores; 0 when it cannot tell them apart."""
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def least_separated(rewards: Sequence[Sequence[float]], limit: int) -> list[int]:
    """Indices of the ``limit`` prompts whose replies' scores have the smallest :func:`spread`
    (equal spreads: the earlier prompt first), in their original order."""
    spreads = [spread(r) for r in rewards]
    keep = sorted(range(len(spreads)), key=lambda i: (spreads[i], i))[:limit]
    return sorted(keep)


def select_uncertain(reward: Any, reward_ref: str, tokenizer: Any, prompts: list[Conversation],
                     references: list[str | None], replies: list[list[str]], limit: int,
                     progress: bool | None = None) -> tuple[list, list, list, list[dict]]:
    """Score every reply with the reward model of the export ``reward`` (loaded here, inside the
    caller's process groups) and keep the ``limit`` prompts it separates least; returns their
    prompts, references, replies and each one's ``selection`` record."""
    from palm.model.export import load_model

    scores = reward_scores(load_model(reward), tokenizer, prompts, replies, reward.config["reward"],
                           progress=progress)
    who = model_identity(reward_ref, reward)
    keep = least_separated(scores, limit)
    selections = [{"method": "uncertain", "pool": len(prompts), "reward_model": who, "rewards": scores[i],
                   "spread": spread(scores[i])} for i in keep]
    return ([prompts[i] for i in keep], [references[i] for i in keep], [replies[i] for i in keep], selections)


def batch_items(batch: str, prompts: list[Conversation], replies: list[list[str]], model: dict,
                sampling: dict, references: Sequence[str | None] | None = None,
                selections: Sequence[dict | None] | None = None) -> list[dict[str, Any]]:
    """The batch's items; ``references`` and ``selections`` (per prompt, None: none) add the
    ``reference`` and ``selection`` fields."""
    items = []
    for i, (prompt, rs) in enumerate(zip(prompts, replies)):
        body = json.dumps([messages(prompt), rs], ensure_ascii=False)
        item = {"format": BATCH_FORMAT, "batch": batch, "item": hashlib.sha1(body.encode()).hexdigest()[:16],
                "index": i, "prompt": messages(prompt), "replies": rs, "model": model, "sampling": sampling}
        if references is not None and references[i] is not None:
            item["reference"] = references[i]
        if selections is not None and selections[i] is not None:
            item["selection"] = selections[i]
        items.append(item)
    return items


def write_batch(path: Path, items: list[dict[str, Any]]) -> None:
    from palm.core.io import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
