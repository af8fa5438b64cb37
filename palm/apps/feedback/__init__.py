"""``palm feedback``: human feedback on the project's own models, on the user's own machine.

    palm feedback sample --model models/sft --k 4 --out data/feedback/batch-1.jsonl
    palm feedback serve data/feedback/batch-1.jsonl --labeler alice
    palm feedback simulate data/feedback/batch-1.jsonl --noise 0.1   # a simulated labeler (simulate.py)

``sample`` (``palm/apps/feedback/sample.py``) writes K replies per prompt with the sampling settings and
the model's identity; ``serve`` (``palm/apps/feedback/app.py``) opens a local page where a person ranks
them, appending each judgement to ``data/feedback/rankings.jsonl`` (``palm/apps/feedback/store.py``), the
file the ``prefs`` stage reads with ``format: rankings`` (``palm/data/rankings.py``).

    palm feedback compare models/sft models/ppo --prompts 32 --labeler alice

``compare`` (``palm/apps/feedback/compare.py``) samples one reply of A (the baseline) and one of B
(the candidate) to held-out prompts with the same seed, and opens a blind page where a person says
which is better (sides shuffled, models hidden), appending each judgement to
``data/judgments/judgments.jsonl``; :func:`palm.eval.human.human_verdict` turns them into B's win rate.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from palm.core.errors import ConfigError, UserError

RANKINGS = Path("data/feedback/rankings.jsonl")
LABELER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SAMPLE_KINDS = ("pretrain", "sft", "ppo", "dpo")


def next_batch_path(folder: Path = Path("data/feedback")) -> Path:
    n = 1
    while (folder / f"batch-{n}.jsonl").exists():
        n += 1
    return folder / f"batch-{n}.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser("sample", help="K replies per prompt from a model, as a batch to rank",
                       description="K replies per prompt from a model, as a batch to rank")
    s.add_argument("--model", required=True, help="an exported model folder, e.g. models/sft or models/ppo")
    s.add_argument("--prompts", type=Path, default=None,
                   help="a .txt (one prompt a line) or .jsonl file ({prompt} or {messages}); "
                        "default: the train split of --sft-data")
    s.add_argument("--sft-data", type=Path, default=Path("data/sft"), help="default %(default)s")
    s.add_argument("--limit", type=int, default=32, help="prompts taken from --sft-data (default %(default)s)")
    s.add_argument("--k", type=int, default=4, help="replies per prompt (default %(default)s)")
    s.add_argument("--out", type=Path, default=None, help="the batch file (default: the next data/feedback/batch-<n>.jsonl)")
    s.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default %(default)s)")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--max-new-tokens", type=int, default=128, help="longest reply (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    s.add_argument("--select", choices=("random", "uncertain"), default="random",
                   help="random: the first --limit prompts; uncertain: of --pool candidates, the --limit whose "
                        "replies --reward separates least (default %(default)s)")
    s.add_argument("--reward", default=None, help="with --select uncertain: the reward model, e.g. models/reward")
    s.add_argument("--pool", type=int, default=None,
                   help="with --select uncertain: candidate prompts (default 4 x --limit)")
    v = sub.add_parser("serve", help="rank a batch's replies in a local web page",
                       description="rank a batch's replies in a local web page")
    v.add_argument("batch", type=Path, metavar="BATCH", help="a batch file of palm feedback sample")
    v.add_argument("--labeler", required=True, help="your name, recorded with every judgement")
    v.add_argument("--rankings", type=Path, default=RANKINGS, help="appended to (default %(default)s)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    v.add_argument("--port", type=int, default=8765, help="0: any free port (default %(default)s)")
    from palm.apps.feedback import simulate

    simulate.add_parser(sub, RANKINGS)
    from palm.apps.feedback import compare

    compare.add_arguments(sub.add_parser("compare", help="blind A/B judgements of two models' replies in a local web page",
                                         description="blind A/B judgements of two models' replies in a local web page"))


def run(args: argparse.Namespace) -> int:
    if args.action == "simulate":
        from palm.apps.feedback.simulate import run as simulate_command

        return simulate_command(args, LABELER)
    if args.action == "compare":
        from palm.apps.feedback.compare import compare_command

        return compare_command(args, LABELER, SAMPLE_KINDS)
    return sample_command(args) if args.action == "sample" else serve_command(args)


def _flag(err: ConfigError) -> UserError:
    return UserError(f"--{err.key.replace('_', '-')}: {err.message}")


def sample_command(args: argparse.Namespace) -> int:
    from palm.apps.feedback.sample import (
        SampleSettings,
        batch_items,
        model_identity,
        read_prompt_file,
        sample_replies,
        select_uncertain,
        split_prompts,
        write_batch,
    )
    from palm.decode.generate import SamplingConfig
    from palm.model.export import load_model, load_tokenizer, read_export, same_tokenizer
    from palm.model.parallel import process_groups

    if args.k < 2:
        raise UserError(f"--k: must be >= 2 (a ranking compares replies), got {args.k}")
    if args.limit < 1:
        raise UserError(f"--limit: must be >= 1, got {args.limit}")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ConfigError as err:
        raise _flag(err) from None
    out = args.out or next_batch_path()
    if out.suffix != ".jsonl":
        raise UserError(f"--out: {out}: a batch is a .jsonl file")
    export = read_export(args.model, kinds=SAMPLE_KINDS)
    if not 1 <= args.max_new_tokens < export.model.seq_len:
        raise UserError(f"--max-new-tokens: must be between 1 and {export.model.seq_len - 1} (the model's "
                        f"context is {export.model.seq_len} tokens), got {args.max_new_tokens}")
    uncertain, reward = args.select == "uncertain", None
    pool = 4 * args.limit if args.pool is None else args.pool
    if uncertain:
        if args.reward is None:
            raise UserError("--select uncertain: needs --reward, the reward model that scores the replies "
                            "(e.g. models/reward)")
        if pool < args.limit:
            raise UserError(f"--pool: the candidates the --limit {args.limit} are kept from: must be >= "
                            f"{args.limit}, got {pool}")
        reward = read_export(args.reward, kinds=("reward",))
        same_tokenizer([export, reward])
    elif args.reward is not None or args.pool is not None:
        raise UserError("--reward and --pool: only with --select uncertain")
    tokenizer = load_tokenizer(export)
    if args.prompts is not None:
        prompts, references = read_prompt_file(args.prompts)
        prompts, references = (prompts[:pool], references[:pool]) if uncertain else (prompts, references)
    else:
        prompts, references = map(list, zip(*split_prompts(args.sft_data, tokenizer, export.tokenizer_sha256,
                                                           pool if uncertain else args.limit)))
    settings = SampleSettings(k=args.k, max_new_tokens=args.max_new_tokens, seed=args.seed)
    selections = None
    with process_groups():
        model = load_model(export)
        replies = sample_replies(model, tokenizer, prompts, sampling, settings, progress=None)
        if uncertain:
            del model
            prompts, references, replies, selections = select_uncertain(reward, args.reward, tokenizer, prompts,
                                                                        references, replies, args.limit)
    record = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "max_new_tokens": settings.max_new_tokens, "seed": settings.seed, "k": settings.k}
    write_batch(out, batch_items(out.name.removesuffix(".jsonl"), prompts, replies,
                                 model_identity(args.model, export), record, references, selections))
    print(f"palm feedback: {len(prompts)} prompts x {args.k} replies from {export.path} ({export.kind}) -> {out}; "
          f"rank them with: palm feedback serve {out} --labeler NAME", file=sys.stderr)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from palm.apps.feedback.app import create_app, run_page
    from palm.apps.feedback.store import RankingsFile

    if not LABELER.fullmatch(args.labeler):
        raise UserError(f"--labeler: {args.labeler!r}: use letters, digits and _.@- (up to 64 characters)")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be between 0 and 65535, got {args.port}")
    app = create_app(args.batch, args.rankings, args.labeler)
    with app.test_client() as client:  # the state the page starts from
        state = client.get("/api/state", query_string={"key": app.config["KEY"]}).get_json()
    agree = state["agreement"]
    if agree["shared_items"]:
        print(f"palm feedback: labelers {', '.join(agree['labelers'])} agree on {agree['agreement']:.0%} of the "
              f"reply pairs of the {agree['shared_items']} items they both ranked", file=sys.stderr)

    def announce(url: str) -> None:
        where = (f"resuming at item {state['next'] + 1}" if state["next"] < state["total"] else "all judged")
        print(f"palm feedback: {state['batch']}: {state['judged']} of {state['total']} items judged by "
              f"{args.labeler} ({where}); judgements go to {RankingsFile(args.rankings).path}", file=sys.stderr)
        print(f"open {url}  (the key in it is this session's: keep it to yourself; Ctrl-C stops; every "
              f"judgement the page confirmed is on disk)", flush=True)

    return run_page(app, args.host, args.port, announce, "rankings")
