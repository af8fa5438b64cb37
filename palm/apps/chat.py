"""``palm chat MODEL``: talk to an exported model in the project's chat template.

The reply is streamed: :func:`palm.decode.generate.generate` calls back after every token and
:class:`StreamDecoder` prints the text as soon as it is whole (a UTF-8 character split over
byte-level tokens is held back until its last byte arrives). The conversation is kept across
turns; when it no longer fits the context with room for ``--max-new-tokens``, the oldest
exchanges are dropped (a ``--system`` turn is kept), and a single turn too long on its own is cut
from the left, as the chat data stages cut prompts. ``/reset`` forgets the conversation,
``/quit`` or end of input ends the session.

Output: replies on stdout (one line each when piped); the banner and notes on stderr, so piping
stdout gives the replies alone. A byte-level tokenizer can make any character, so the reply is
written with its control characters made visible (:func:`terminal_safe`): the model cannot set
the clipboard (OSC 52), the window title or clear the screen of the terminal it is printed on.
The conversation keeps the reply as the model made it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

from palm.core.errors import ConfigError, UserError
from palm.data.chat_readers import Turn

# torch, megatron and the model are imported where they are used, so that a bad folder or flag is
# refused at once

COMMANDS = "/reset forgets the conversation, /quit (or end of input) ends it"
CHAT_KINDS = ("pretrain", "sft", "ppo", "dpo")  # language models (a reward model scores, it does not talk)
QUANTIZE = ("none", "int8")  # --quantize of chat and serve: the weights decoded from (palm.decode.quant)

# C0 controls but tab and newline, DEL and C1 controls -> a visible form: C0 and DEL as their
# Unicode control pictures (ESC -> "␛", BEL -> "␇", CR -> "␍"), C1 as "\x9b" (they have none)
_VISIBLE = {c: chr(0x2400 + c) for c in range(0x20) if chr(c) not in "\t\n"}
_VISIBLE[0x7F] = "\u2421"
_VISIBLE.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})


def terminal_safe(text: str) -> str:
    """``text`` with every control character a terminal would act on (escape sequences, bell,
    carriage return, C1 codes such as CSI U+009B) replaced by a visible stand-in; newline and tab
    are kept. The result holds none of them, so it is unchanged by a second pass."""
    return text.translate(_VISIBLE)


class StreamDecoder:
    """Text of a growing list of token ids, handed out piece by piece (special tokens skipped)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def feed(self, token: int) -> str:
        """The new text once ``token`` is appended ("" while a character is incomplete)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def finish(self) -> str:
        """Whatever is still held back (a sequence that never completed)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.sent = text[self.sent:], len(text)
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class ChatSession:
    """A conversation with one model (whole, in this process): its history and sampling."""

    def __init__(self, model: Any, tokenizer: Any, *, sampling: Any = None, max_new_tokens: int = 128,
                 system: str | None = None, seed: int = 0, note: Callable[[str], None] = lambda s: None,
                 weights: Any = None):
        """``sampling``: a :class:`palm.decode.generate.SamplingConfig` (default: greedy);
        ``weights``: int8 weights of ``model`` to decode with (:func:`palm.decode.quant.quantize`)."""
        import torch

        from palm.core.tokenizer import special_ids
        from palm.data.chat import ChatTemplate
        from palm.decode.generate import SamplingConfig

        seq_len = model.cfg.seq_len
        if not 1 <= max_new_tokens < seq_len:
            raise ConfigError("max_new_tokens", f"must be between 1 and {seq_len - 1} (the model's context is "
                                                f"{seq_len} tokens, the prompt needs some), got {max_new_tokens}")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling or SamplingConfig()
        self.max_new_tokens, self.note, self.weights = max_new_tokens, note, weights
        self.template = ChatTemplate(tokenizer)
        ids = special_ids(tokenizer)
        self.stop_ids, self.pad_id = (ids["end_turn_id"], ids["eod_id"]), ids["pad_id"]
        self.system = (Turn("system", system),) if system else ()
        self.seed = seed
        self.generator = torch.Generator(model.embedding.weight.device).manual_seed(seed)
        self.history: list[Turn] = []

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt for a reply to ``user``: system turn, history, ``user``, ``<|assistant|>``,
        fitted into ``seq_len - max_new_tokens`` tokens (oldest exchanges dropped first, for good)."""
        budget = self.model.cfg.seq_len - self.max_new_tokens
        turn = Turn("user", user)
        ids = self.template.render_prompt((*self.system, *self.history, turn))
        dropped = 0
        while len(ids) > budget and self.history:
            self.history = self.history[2:]  # the oldest user turn and its reply
            dropped += 1
            ids = self.template.render_prompt((*self.system, *self.history, turn))
        if dropped:
            self.note(f"(the {dropped} oldest exchange{'s' if dropped > 1 else ''} no longer fit the "
                      f"{self.model.cfg.seq_len}-token context and were dropped)")
        if len(ids) > budget:
            self.note(f"(this turn is {len(ids)} tokens; only its last {budget} fit and are kept)")
            ids = ids[-budget:]
        return ids

    def reply(self, user: str, write: Callable[[str], None] = lambda s: None) -> str:
        """Generate the reply to ``user``, handing ``write`` each piece of text as it is made, its
        control characters made visible (:func:`terminal_safe`: ``write`` prints to a terminal);
        the exchange joins the history once the reply is complete, as the model made it."""
        from palm.decode.generate import generate

        prompt = self.prompt_ids(user)
        decoder = StreamDecoder(self.tokenizer)
        stop = set(self.stop_ids)

        def on_token(token: Any, live: Any) -> None:  # [1] tensors
            t = int(token[0])
            if bool(live[0]) and t not in stop:
                piece = decoder.feed(t)
                if piece:
                    write(terminal_safe(piece))

        s = self.sampling
        generate(self.model, [prompt], self.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                 top_p=s.top_p, stop_ids=self.stop_ids, pad_id=self.pad_id, generator=self.generator,
                 on_token=on_token, weights=self.weights)
        rest = decoder.finish()
        if rest:
            write(terminal_safe(rest))
        text = decoder.text
        self.history += [Turn("user", user), Turn("assistant", text)]
        return text


def repl(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> None:
    """Read a turn per line until ``/quit`` or end of input; stream each reply to ``stdout``."""

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except EOFError:
            line = ""
        if not line:  # end of input
            if interactive:
                stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=stderr)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}: {COMMANDS})", file=stderr)
            continue
        if interactive:
            write("palm> ")
        try:
            session.reply(text, write)
        except KeyboardInterrupt:  # stop this reply, keep the session
            write("\n")
            print("(reply interrupted; it is not kept in the conversation)", file=stderr)
            continue
        write("\n")


# --- the command line (palm/apps/cli.py registers it) -------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="an exported model folder (e.g. models/ppo) or a registry URI "
                                                 "(e.g. models:/palm-chat@champion)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s; 1: off)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--system", default=None, help="a system turn opening the conversation")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="int8: decode from int8 weights, faster on CPU, replies a little different (default %(default)s)")


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
        stderr: TextIO = sys.stderr) -> int:
    from palm.model.export import load_model, load_tokenizer, read_export
    from palm.model.parallel import process_groups

    export = read_export(args.model, kinds=CHAT_KINDS)
    tokenizer = load_tokenizer(export)
    from palm.decode.generate import SamplingConfig

    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    except ConfigError as err:
        raise UserError(f"--{err.key.replace('_', '-')}: {err.message}") from None
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
    with process_groups():
        from palm.decode.quant import quantize

        model = load_model(export).requires_grad_(False)  # for decoding only
        try:
            session = ChatSession(model, tokenizer, sampling=sampling, max_new_tokens=args.max_new_tokens,
                                  system=args.system, seed=args.seed, note=lambda s: print(s, file=stderr),
                                  weights=quantize(model, args.quantize))
        except ConfigError as err:
            raise UserError(f"--{err.key.replace('_', '-')}: {err.message}") from None
        print(f"palm chat: {export.path} ({export.kind}, {export.model.num_params() / 1e6:.3g} M parameters, "
              f"{export.model.seq_len}-token context); {COMMANDS}", file=stderr)
        repl(session, stdin, stdout, stderr, interactive)
    return 0
