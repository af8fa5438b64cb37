"""The ``palm`` command (console script of the project, installed into ``.venv`` by
``make setup``): one subcommand per user-facing tool.

    palm chat models/ppo            # talk to an exported model (palm/apps/chat.py)
    palm feedback sample|serve|compare|simulate …  # rank replies, blind A/B (palm/apps/feedback/)
    palm chat models:/palm-chat@champion              # ... or a registered one
    palm lineage models:/palm-chat@champion [--json]  # its runs back to the scrape (palm/ops/lineage.py)
    palm serve models/ppo [--port 8000]  # OpenAI-compatible API (palm/apps/openai_server.py)
    palm ui [--port 5000]           # the MLflow UI over the project's runs (palm/apps/ui.py; make ui)
    palm export hf models/ppo out/  # a Hugging Face transformers folder (palm/apps/hf_export.py)
    palm import hf out/ models/x    # ... and back (palm/apps/hf_import.py)
    palm eval-task models/sft out/  # an lm-evaluation-harness task of the valid split (palm/eval/lm_eval_task.py)

Each subcommand module provides ``add_arguments(parser)`` and ``run(args) -> exit code``. Errors
a user can fix print as one line ``error: <command>: …`` and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "chat": ("palm.apps.chat", "chat with an exported model (streamed replies, history, /reset, /quit)"),
    "feedback": ("palm.apps.feedback", "human feedback: sample replies (sample), rank them in a local page (serve), "
                 "blind A/B of two models (compare), a simulated labeler (simulate)"),
    "lineage": ("palm.ops.lineage", "the runs and data a registered model came from, back to the scrape run"),
    "serve": ("palm.apps.openai_server", "an OpenAI-compatible HTTP server over an exported model (127.0.0.1)"),
    "export": ("palm.apps.hf_export", "write an exported model in another format: hf (a Hugging Face transformers "
               "folder, docs/hf-export.md)"),
    "import": ("palm.apps.hf_import", "read a model folder written by palm export back into an export: hf"),
    "eval-task": ("palm.eval.lm_eval_task", "write an lm-evaluation-harness task of held-out windows of the valid "
                  "token shard, for lm_eval on a palm export hf folder (docs/hf-export.md)"),
    "ui": ("palm.apps.ui", "the MLflow UI on 127.0.0.1 over the project's runs and registered models (make ui)"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="palm", description="palm-rlhf: tools around the pipeline's models")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    from palm.core.errors import UserError
    from palm.core.quiet import quiet_known

    quiet_known()  # before the subcommands import megatron: its notes on CUDA libraries are not the user's
    args = parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except UserError as err:
        print(f"error: {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `palm chat … | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
