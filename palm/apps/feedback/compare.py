"""``palm feedback compare A B``: people judge, blind, one reply of A against one of B per prompt.

    palm feedback compare models/sft models/ppo --prompts 32 --labeler alice

A is the baseline and B the candidate (:mod:`palm.eval.human` reports B's win rate). The command
resolves both as ``palm chat`` does (a folder or a ``models:/`` URI), samples one reply of each to
the first N held-out prompts of ``--sft-data`` (the valid split the evaluate stage uses; or the
prompts of ``--prompts-file``) with the same seed, writes them to the comparison file beside the
judgments (:mod:`.comparison`; reused as it is when the command runs again) and serves the blind
page (:mod:`.compare_app`), resuming at the first item the labeler has not judged.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from pathlib import Path

from palm.core.errors import ConfigError, UserError

JUDGMENTS = Path("data/judgments/judgments.jsonl")


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("model_a", metavar="A", help="the baseline: an exported model folder (e.g. models/sft) or a "
                                               "registry URI (e.g. models:/palm-chat@champion)")
    c.add_argument("model_b", metavar="B", help="the candidate, e.g. models/ppo")
    c.add_argument("--sft-data", type=Path, default=Path("data/sft"),
                   help="prompts from its valid split, as evaluate takes them (default %(default)s)")
    c.add_argument("--prompts", type=int, default=32, metavar="N", help="prompts to compare (default %(default)s; 0: all)")
    c.add_argument("--prompts-file", type=Path, default=None,
                   help="prompts from a .txt (one a line) or .jsonl file instead, as for palm feedback sample")
    c.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default %(default)s)")
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--max-new-tokens", type=int, default=128, help="longest reply (default %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both models (default %(default)s)")
    c.add_argument("--labeler", default=None, help="your name, recorded with every judgement (default: your user name)")
    c.add_argument("--judgments", type=Path, default=JUDGMENTS,
                   help="appended to; the comparison file goes beside it (default %(default)s)")
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    c.add_argument("--port", type=int, default=8766, help="0: any free port (default %(default)s)")


def _labeler(given: str | None, pattern: re.Pattern) -> str:
    name = given
    if name is None:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = ""
    if not pattern.fullmatch(name):
        flag = "--labeler" if given is not None else f"--labeler (your user name {name!r} does not fit)"
        raise UserError(f"{flag}: {name!r}: use letters, digits and _.@- (up to 64 characters)")
    return name


def _checked(args: argparse.Namespace, labeler_pattern: re.Pattern) -> tuple[str, object]:
    from palm.decode.generate import SamplingConfig

    labeler = _labeler(args.labeler, labeler_pattern)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be between 0 and 65535, got {args.port}")
    if args.prompts < 0:
        raise UserError(f"--prompts: must be >= 0 (0: all), got {args.prompts}")
    if args.judgments.suffix != ".jsonl":
        raise UserError(f"--judgments: {args.judgments}: a judgments file is a .jsonl file")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ConfigError as err:
        raise UserError(f"--{err.key.replace('_', '-')}: {err.message}") from None
    return labeler, sampling


def _prompts(args: argparse.Namespace, exports: tuple) -> list:
    from palm.apps.feedback.comparison import held_out_prompts
    from palm.apps.feedback.sample import read_prompts
    from palm.data.chat import read_chat_meta
    from palm.model.export import load_tokenizer

    if args.prompts_file is not None:
        prompts = read_prompts(args.prompts_file)
        return prompts[:args.prompts] if args.prompts else prompts
    sha = read_chat_meta(args.sft_data, "sft_data")["tokenizer_sha256"]
    export = next((e for e in exports if e.tokenizer_sha256 == sha), None)
    if export is None:
        raise UserError(f"--sft-data: {args.sft_data} was made with tokenizer sha256 {sha[:12]}…, which neither "
                        "model uses; pass the models' data/sft or --prompts-file FILE")
    return held_out_prompts(args.sft_data, load_tokenizer(export), sha, args.prompts)


def compare_command(args: argparse.Namespace, labeler_pattern: re.Pattern, kinds: tuple[str, ...]) -> int:
    """Run the command; ``labeler_pattern`` and ``kinds`` (of model): those of ``palm feedback``."""
    from palm.apps.feedback.app import run_page
    from palm.apps.feedback.compare_app import create_compare_app
    from palm.apps.feedback.comparison import (comparison_id, comparison_path, make_items, read_items,
                                               sample_pair, write_items)
    from palm.apps.feedback.judgments import JudgmentsFile
    from palm.apps.feedback.sample import SampleSettings, model_identity
    from palm.model.export import read_export

    labeler, sampling = _checked(args, labeler_pattern)
    judgments = JudgmentsFile(args.judgments)
    judgments.mine("", labeler)  # a damaged judgments file is refused before anything is sampled
    exports = (read_export(args.model_a, kinds=kinds), read_export(args.model_b, kinds=kinds))
    for flag, export in zip(("A", "B"), exports):
        if not 1 <= args.max_new_tokens < export.model.seq_len:
            raise UserError(f"--max-new-tokens: must be between 1 and {export.model.seq_len - 1} (model {flag}'s "
                            f"context is {export.model.seq_len} tokens), got {args.max_new_tokens}")
    models = {"a": model_identity(args.model_a, exports[0]), "b": model_identity(args.model_b, exports[1])}
    if models["a"]["weights_sha256"] == models["b"]["weights_sha256"]:
        print("palm feedback: warning: A and B have the same weights (the replies will be the same)", file=sys.stderr)
    prompts = _prompts(args, exports)
    record = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    cid = comparison_id(models["a"], models["b"], prompts, record)
    path = comparison_path(args.judgments, cid)
    if path.exists():
        items = read_items(path, cid, prompts)
        how = "reusing the replies of"
    else:
        replies = sample_pair(exports, prompts, sampling, SampleSettings(k=1, max_new_tokens=args.max_new_tokens,
                                                                         seed=args.seed))
        items = make_items(cid, prompts, *replies, models["a"], models["b"], record)
        write_items(path, items)
        how = "sampled to"
    app = create_compare_app(items, judgments, labeler, models)

    def announce(url: str) -> None:
        judged = judgments.mine(cid, labeler)
        first = next((i for i in range(len(items)) if i not in judged), len(items))
        where = f"resuming at item {first + 1}" if first < len(items) else "all judged"
        print(f"palm feedback: comparison {cid}: {len(items)} prompts, {how} {path}; {len(judged)} judged by "
              f"{labeler} ({where}); judgements go to {judgments.path}", file=sys.stderr)
        print(f"open {url}  (the key in it is this session's: keep it to yourself; Ctrl-C stops; every "
              f"judgement the page confirmed is on disk)", flush=True)

    return run_page(app, args.host, args.port, announce, "judgements")
