"""DVC stage `tokenizer`: train the byte-level BPE tokenizer on the corpus."""

from __future__ import annotations

import sys

from palm.core.io import atomic_dir, write_json
from palm.core.tokenizer import TokenizerConfig, sha256_file, special_ids, train_tokenizer
from palm.data.corpus import read_corpus
from palm.ops.stage import StageContext, run_stage


def add_args(p):
    p.add_argument("--corpus", required=True, help="corpus folder (Parquet parts)")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json + meta.json)")


def body(cfg: TokenizerConfig, ctx: StageContext) -> dict:
    corpus = ctx.path("corpus")
    n_docs = sum(b.num_rows for b in read_corpus(corpus, ["sha1"]))
    texts = (t for b in read_corpus(corpus, ["text"]) for t in b.column("text").to_pylist())
    tok = train_tokenizer(texts, cfg, length=n_docs, progress=sys.stderr.isatty())
    with atomic_dir(ctx.path("out")) as out:
        tok.save(str(out / "tokenizer.json"))
        sha = sha256_file(out / "tokenizer.json")
        meta = {"sha256": sha, "vocab_size": tok.get_vocab_size(), **special_ids(tok)}
        write_json(out / "meta.json", meta)
    ctx.tracker.set_tags({"tokenizer.sha256": sha})
    return {"vocab_size": tok.get_vocab_size(), "documents": n_docs}


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenizer", TokenizerConfig, body, add_args, argv)


if __name__ == "__main__":
    sys.exit(main())
