"""``palm eval-task MODEL OUT``: a local task of EleutherAI's lm-evaluation-harness built from the
held-out (valid) token shard, so that ``lm_eval --model hf`` on a ``palm export hf`` folder
measures what the project measures (docs/hf-export.md).

Each item is a window of one valid document: ``context_tokens`` tokens as the context and the
``target_tokens`` after them as the true continuation, among ``choices`` continuations (the others
are true continuations of windows of other documents, when there are enough). The task is
``multiple_choice``: lm-eval scores every choice by its log-likelihood given the context, and
reports ``acc`` / ``acc_norm``.

Why the windows are picked with care: lm-eval encodes ``context + choice`` as one string and takes
the tokens after ``encode(context)`` as the choice's. A window is kept only where that split is the
shard's own: ``encode(context)`` is the context's shard tokens, ``encode(context + choice)`` is
them followed by ``encode(choice)`` (the choice's shard tokens for the true one), and the context
ends in no whitespace (lm-eval would move it into the continuation). No BOS is added on either
side: the tokenizer has none, and a window starts mid-document as training windows do. So
lm-eval's log-likelihoods are the project's :func:`project_loglikelihoods` (tests/test_lm_eval.py).

The folder holds ``NAME.yaml``, ``NAME.jsonl`` (the items) and ``NAME_data.py``, the YAML's
``custom_dataset``: it loads the JSONL beside it with ``datasets``' json builder (no hub), so the
folder can be moved; lm-eval would resolve a ``dataset_kwargs.data_files`` path from the working
directory.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palm.core.config import check
from palm.core.errors import UserError


@dataclass(frozen=True)
class TaskConfig:
    """How the items are cut from the valid shard."""

    name: str = "palm_valid"  # the task's name (lm_eval --tasks NAME) and its files' stem
    context_tokens: int = 128  # tokens of context per item
    target_tokens: int = 16  # tokens of each continuation
    choices: int = 4  # continuations per item, the true one among them
    items: int = 200  # at most this many items (windows in document order)
    seed: int = 0  # places the true continuation and draws the others

    def __post_init__(self) -> None:
        check(self.name.isidentifier(), "name", "must be a Python identifier (it names the task's files)")
        check(self.context_tokens >= 1, "context_tokens", "must be >= 1")
        check(self.target_tokens >= 1, "target_tokens", "must be >= 1")
        check(self.choices >= 2, "choices", "must be >= 2")
        check(self.items >= 1, "items", "must be >= 1")


# --- items ----------------------------------------------------------------------------------------

def valid_documents(tokens_dir: Path) -> list[list[int]]:
    """The documents of ``tokens_dir``'s valid shard, without their end-of-document token."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from palm.data.tokenize import read_meta

    meta = read_meta(tokens_dir)
    prefix = Path(tokens_dir) / "valid"
    if not (prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()):
        raise UserError(f"{prefix}.bin/.idx: no valid token shard; run the tokenize stage (dvc repro tokenize)")
    ds = IndexedDataset(str(prefix))
    eod = meta.get("eod_id")
    docs = []
    for i in range(len(ds)):
        ids = ds[i].astype("int64").tolist()
        docs.append(ids[:-1] if ids and ids[-1] == eod else ids)
    return docs


def _splits_at(tok: Any, context: str, cont: str, ctx_ids: list[int], cont_ids: list[int]) -> bool:
    """lm-eval's split of ``context + cont`` (module docstring) gives ``ctx_ids`` and ``cont_ids``,
    which are also what the two encode to apart (the project's side)."""
    return (context == context.rstrip() and tok.encode(context).ids == ctx_ids and tok.encode(cont).ids == cont_ids
            and tok.encode(context + cont).ids == ctx_ids + cont_ids)


def windows(docs: list[list[int]], tok: Any, cfg: TaskConfig) -> list[dict]:
    """Non-overlapping windows of each document, in order, that lm-eval splits as the shard does;
    a window that does not is moved on one token at a time."""
    found = []
    width = cfg.context_tokens + cfg.target_tokens
    for d, ids in enumerate(docs):
        s = 0
        while s + width <= len(ids) and len(found) < cfg.items:
            ctx_ids, tgt_ids = ids[s:s + cfg.context_tokens], ids[s + cfg.context_tokens:s + width]
            context, target = tok.decode(ctx_ids), tok.decode(tgt_ids)
            if target.strip() and _splits_at(tok, context, target, ctx_ids, tgt_ids):
                found.append({"doc": d, "start": s, "context": context, "target": target, "target_ids": tgt_ids})
                s += width
            else:
                s += 1
    return found


def build_items(docs: list[list[int]], tok: Any, cfg: TaskConfig) -> list[dict]:
    """The task's items: each window's context with its true continuation and ``choices - 1``
    others (from other documents where there are enough, each one that lm-eval splits off this
    context as it is encoded alone), the true one at a seeded place."""
    wins = windows(docs, tok, cfg)
    rng = random.Random(cfg.seed)
    items = []
    for i, w in enumerate(wins):
        ctx_ids = tok.encode(w["context"]).ids
        others = [o for o in wins if o["doc"] != w["doc"]]
        if len({o["target"] for o in others} - {w["target"]}) < cfg.choices - 1:
            others = [o for j, o in enumerate(wins) if j != i]  # too few other documents: other windows
        rng.shuffle(others)
        picked: list[str] = []
        for o in others:
            if o["target"] != w["target"] and o["target"] not in picked \
                    and _splits_at(tok, w["context"], o["target"], ctx_ids, o["target_ids"]):
                picked.append(o["target"])
                if len(picked) == cfg.choices - 1:
                    break
        if len(picked) < cfg.choices - 1:
            continue  # not enough continuations that split cleanly off this context
        label = rng.randrange(cfg.choices)
        picked.insert(label, w["target"])
        items.append({"id": f"doc{w['doc']}-{w['start']}", "doc": w["doc"], "start": w["start"],
                      "context": w["context"], "choices": picked, "label": label})
    return items


# --- the task folder ------------------------------------------------------------------------------

def task_yaml(cfg: TaskConfig) -> str:
    """lm-eval's task config. ``target_delimiter`` is empty: a continuation carries its own leading
    space, as the shard's tokens do."""
    return f"""# lm-evaluation-harness task written by `palm eval-task` (palm/eval/lm_eval_task.py):
# windows of the corpus' held-out documents; which continuation follows the context?
task: {cfg.name}
dataset_path: json  # the items' format; custom_dataset loads them from beside this file
custom_dataset: !function {cfg.name}_data.load
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  context_tokens: {cfg.context_tokens}
  target_tokens: {cfg.target_tokens}
  choices: {cfg.choices}
  seed: {cfg.seed}
"""


LOADER = '''"""The {name} items (the JSONL beside this file), for lm-eval's custom_dataset: a path relative
to this file, so the task folder can be moved (written by `palm eval-task`)."""

from pathlib import Path


def load(**_):
    import datasets

    return datasets.load_dataset("json", data_files={{"test": str(Path(__file__).with_name("{name}.jsonl"))}})
'''


def write_task(items: list[dict], out: Path, cfg: TaskConfig) -> Path:
    """Write the task folder ``out`` (new, or replaced whole)."""
    from palm.core.io import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / f"{cfg.name}.yaml").write_text(task_yaml(cfg))
        (tmp / f"{cfg.name}_data.py").write_text(LOADER.format(name=cfg.name))
        with open(tmp / f"{cfg.name}.jsonl", "w") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    return Path(out)


def build_task(model: str | Path, tokens_dir: str | Path, out: str | Path, cfg: TaskConfig) -> tuple[Path, int]:
    """Items from ``tokens_dir``'s valid shard with the tokenizer of the export ``model`` (they must
    agree), written to ``out``; returns ``(out, items)``."""
    from palm.data.tokenize import read_meta
    from palm.model.export import load_tokenizer, read_export

    ex, tokens_dir = read_export(model), Path(tokens_dir)
    meta = read_meta(tokens_dir)
    if meta.get("tokenizer_sha256") != ex.tokenizer_sha256:
        raise UserError(f"{tokens_dir}: tokenized with tokenizer sha256 {str(meta.get('tokenizer_sha256'))[:12]}… but "
                        f"{ex.path} uses {ex.tokenizer_sha256[:12]}…; give the token shards the model was trained on")
    if cfg.context_tokens + cfg.target_tokens > ex.model.seq_len:
        raise UserError(f"context_tokens + target_tokens = {cfg.context_tokens + cfg.target_tokens} exceeds the "
                        f"model's seq_len {ex.model.seq_len}; lm-eval would cut the context")
    items = build_items(valid_documents(tokens_dir), load_tokenizer(ex), cfg)
    if not items:
        raise UserError(f"{tokens_dir}: the valid shard has no window of {cfg.context_tokens}+{cfg.target_tokens} "
                        f"tokens with {cfg.choices} choices; use smaller --context-tokens/--target-tokens/--choices")
    return write_task(items, Path(out), cfg), len(items)


def read_items(task_dir: Path, name: str) -> list[dict]:
    path = Path(task_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no such task file; build the task with palm eval-task")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the project's side of the check --------------------------------------------------------------

def project_loglikelihoods(model: str | Path, items: list[dict], batch_size: int = 16) -> list[list[float]]:
    """Each item's choices' log-likelihoods given its context under the export ``model`` as the
    project computes them (:func:`palm.eval.evaluate.reply_logprobs`: the project's tokenizer on
    context and choice apart, the project's network, the real vocabulary)."""
    from palm.eval.evaluate import reply_logprobs
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    ex = read_export(model)
    tok = load_tokenizer(ex)
    prompts = [tok.encode(it["context"]).ids for it in items for _ in it["choices"]]
    replies = [tok.encode(c).ids for it in items for c in it["choices"]]
    with process_groups():
        sums, _ = reply_logprobs(load_model(ex), prompts, replies, batch_size)
    flat, out = sums.tolist(), []
    for it in items:
        out.append(flat[:len(it["choices"])])
        flat = flat[len(it["choices"]):]
    return out


def harness_command(hf_dir: str | Path, task_dir: str | Path, name: str, out: str | Path,
                    batch_size: int = 8) -> list[str]:
    """The ``lm_eval`` command line that scores ``hf_dir`` (a ``palm export hf`` folder) on the task
    in fp32 on the CPU and logs every sample under ``out`` (run it offline: ``HF_HUB_OFFLINE=1``)."""
    return ["lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
            "--tasks", name, "--include_path", str(task_dir), "--device", "cpu", "--batch_size", str(batch_size),
            "--log_samples", "--output_path", str(out)]


def harness_loglikelihoods(samples: Path) -> dict[int, dict]:
    """lm-eval's ``--log_samples`` file of one task: per ``doc_id``, the choices' log-likelihoods
    (``ll``) and the arguments they were scored with (``args``: ``[context, continuation]``)."""
    out = {}
    for line in Path(samples).read_text().splitlines():
        s = json.loads(line)
        args = [[a["arg_0"], a["arg_1"]] for _, a in sorted(s["arguments"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
        out[s["doc_id"]] = {"ll": [float(r[0][0]) for r in s["resps"]], "args": args,
                            "acc": s.get("acc"), "acc_norm": s.get("acc_norm")}
    return out


# --- palm eval-task -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TaskConfig()
    p.add_argument("model", metavar="MODEL", help="the export whose tokenizer the task is cut with (e.g. models/sft, "
                                                 "or a registry URI); its seq_len bounds a window")
    p.add_argument("out", metavar="OUT", help="the task folder to write (replaced whole)")
    p.add_argument("--tokens", default="data/tokens", help="token shards with valid.{bin,idx} (default data/tokens)")
    p.add_argument("--name", default=d.name, help=f"task name (default {d.name})")
    p.add_argument("--context-tokens", type=int, default=d.context_tokens, help="context tokens per item")
    p.add_argument("--target-tokens", type=int, default=d.target_tokens, help="tokens per continuation")
    p.add_argument("--choices", type=int, default=d.choices, help="continuations per item, the true one among them")
    p.add_argument("--items", type=int, default=d.items, help="at most this many items")
    p.add_argument("--seed", type=int, default=d.seed, help="places the true continuation and draws the others")


def run(args: argparse.Namespace) -> int:
    cfg = TaskConfig(name=args.name, context_tokens=args.context_tokens, target_tokens=args.target_tokens,
                     choices=args.choices, items=args.items, seed=args.seed)
    out, n = build_task(args.model, args.tokens, args.out, cfg)
    cmd = harness_command("HF_FOLDER", out, cfg.name, "RESULTS")
    print(f"{out}: {n} items; score a `palm export hf` folder on them with: {' '.join(cmd)}", file=sys.stderr)
    return 0
