"""``palm export hf MODEL OUT``: an exported model as a Hugging Face transformers folder
(:func:`palm.model.hf.export_hf`), loadable with ``AutoModelForCausalLM`` (a language model) or
``AutoModelForSequenceClassification`` (a reward model) and ``trust_remote_code=True``."""

from __future__ import annotations

import argparse
import sys

FORMATS = ("hf",)  # hf: Hugging Face transformers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=FORMATS, help="hf: a Hugging Face transformers folder")
    p.add_argument("model", metavar="MODEL", help="an exported model folder (e.g. models/ppo) or a registry URI "
                                                 "(e.g. models:/palm-chat@champion)")
    p.add_argument("out", metavar="OUT", help="the folder to write (new, or empty)")


def run(args: argparse.Namespace) -> int:
    from palm.model.hf import export_hf

    out = export_hf(args.model, args.out)
    print(f"{out}: written; load it with transformers' AutoModelForCausalLM (or, for a reward model, "
          "AutoModelForSequenceClassification).from_pretrained(..., trust_remote_code=True)", file=sys.stderr)
    return 0
