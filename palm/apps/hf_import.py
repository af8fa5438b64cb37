"""``palm import hf DIR OUT``: a Hugging Face folder written by ``palm export hf`` back into the
project's export format (:func:`palm.model.hf.import_hf`): the same tensors bit for bit, the
same ``config.json`` and ``tokenizer.json``."""

from __future__ import annotations

import argparse
import sys

FORMATS = ("hf",)  # hf: Hugging Face transformers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=FORMATS, help="hf: a Hugging Face transformers folder")
    p.add_argument("src", metavar="DIR", help="a folder written by palm export hf")
    p.add_argument("out", metavar="OUT", help="the export folder to write (new, or empty)")


def run(args: argparse.Namespace) -> int:
    from palm.model.hf import import_hf

    out = import_hf(args.src, args.out)
    print(f"{out}: written (a palm export: palm chat {out}, or a stage's parent)", file=sys.stderr)
    return 0
