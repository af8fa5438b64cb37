"""Continuous batching for serving: requests join a running KV-cached batch at a step boundary
and leave it when they end, so nobody waits for the longest reply (``palm serve``).

The batch is a fixed number of slots over one :class:`~palm.decode.cache.KVCache` of ``max_len``
positions. Every live row shares the cache's length ``L``; a row is left-padded within it (its
first real token at column ``pad``, its RoPE position 0, the columns before it masked: the
cache's per-row tables), so a row computes exactly what its prompt alone would. A joining prompt
is run through the model once (with the other prompts joining at the same step, left-padded to
one width) and its keys and values are copied into a free slot so that its last token sits at
column ``L - 1``; its first token is drawn from that pass, and from then on it steps with the
others, one token per row. When a prompt is longer than ``L``, the live rows' columns move right;
when a join would not fit in ``max_len`` (or half of ``L`` is padding every row skips), the
leading columns no live row needs are dropped. A row that ends (a stop token or its own
``max_new_tokens``) frees its slot at once: the last live row moves into it, so a step decodes
exactly the live rows, ``[n, 1]`` tokens, and costs what ``n`` rows cost.

Rows drawn differently (temperature, top-p) and with different stop tokens share a step: the
logits of the rows drawn alike are sampled together (:func:`palm.decode.generate._next_token`).
A request is admitted only if every live row still fits ``max_len`` with it, so a step never
has to stop for room; one that does not fit waits (first come, first served).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import torch

from palm.core.config import check
from palm.core.errors import ConfigError
from palm.decode import layouts
from palm.decode.cache import new_cache
from palm.decode.decoder import Decoder, FusedWeights
from palm.decode.generate import SamplingConfig, _check_whole_model, _next_token, left_pad
from palm.model import parallel
from palm.model.network import PaLM


@dataclasses.dataclass(eq=False)
class Request:
    """One continuation to decode: up to ``max_new_tokens`` after ``prompt``, ending early at any
    of ``stop_ids`` (the stop token is emitted, as the last). ``tag``: the caller's own."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: frozenset[int] = frozenset()
    tag: Any = None


@dataclasses.dataclass(frozen=True)
class Event:
    """A token of ``request``; ``end``: ``"stop"`` (``token`` is a stop id), ``"length"`` (its
    ``max_new_tokens``-th token) or ``None`` (more to come)."""

    request: Request
    token: int
    end: str | None


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    pad: int  # the column of its first real token
    made: int = 0  # tokens emitted


class Batcher:
    """The decoding state of continuous batching (see the module docstring). ``add`` requests
    from one thread, call :meth:`step` in a loop while :attr:`idle` is false.

    ``slots``: most rows decoded together; ``max_len``: the cache's positions (default the
    model's ``seq_len``); ``weights``: int8 weights to decode with (:func:`palm.decode.quant.quantize`),
    else the model's own in the plan :meth:`Decoder.plan` measures for ``slots`` rows (and a
    second copy in the plan for one row, where that differs);
    ``continuous=False``: static batching, for comparison: requests join only an empty batch, so
    a batch runs until its last row ends. ``gather_steps``: while rows are live, waiting requests
    may be held back up to this many steps until an eighth of the slots' worth (or every free
    slot) is waiting: a prompt pass costs a few times a step's fixed costs (its many small
    operations), so requests that trickle in join several to a pass.
    """

    def __init__(self, model: PaLM, slots: int, *, max_len: int | None = None,
                 weights: FusedWeights | None = None, generator: torch.Generator | None = None,
                 pad_id: int = 0, continuous: bool = True, gather_steps: int = 0):
        _check_whole_model(model)
        check(slots >= 1, "slots", f"must be >= 1, got {slots}")
        self.model, self.slots, self.generator, self.pad_id = model, slots, generator, pad_id
        self.continuous, self.gather_steps = continuous, gather_steps
        self.held = 0  # steps the waiting requests have been held back (gather_steps)
        self.prompt_passes = 0  # passes of joining prompts so far
        self.max_len = max_len or model.cfg.seq_len
        self.vocab = model.cfg.vocab_size
        self.device = model.embedding.weight.device
        self.plan = layouts.DecodePlan(torch.float32) if weights is not None else Decoder.plan(model, slots, self.max_len)
        # every row gets per-row tables (pad 1 here; set_starts places each row when it joins)
        cache = new_cache(model, slots, self.max_len, torch.ones(slots, dtype=torch.long), dtype=self.plan.dtype)
        self.decoder = Decoder(model, cache, self.plan, weights)
        self.cache = cache
        # one live row (a lone user) in the plan measured for one row, where that is another
        # layout: a layout fast for many rows can be slow for one (oneDNN's packed weights)
        self.single: tuple[Decoder, layouts.DecodePlan] | None = None
        one = self.plan if weights is not None or slots == 1 else Decoder.plan(model, 1, self.max_len)
        if one != self.plan and one.dtype == self.plan.dtype:
            self.single = Decoder(model, cache, one), one
        self._views: dict[int, tuple[Decoder, layouts.DecodePlan]] = {}  # n -> over the first n slots
        self.rows: list[_Row] = []  # live rows, in slot order
        self.last = torch.zeros(slots, 1, dtype=torch.long, device=self.device)  # each slot's last token
        self.length = 0  # L: columns every live row shares
        self.pending: collections.deque[Request] = collections.deque()

    @property
    def idle(self) -> bool:
        return not self.rows and not self.pending

    def add(self, request: Request) -> None:
        """Queue ``request``; it joins at a coming step. Raises ``ConfigError`` for one that can
        never be decoded here."""
        p = len(request.prompt)
        if p == 0:
            raise ConfigError("prompt", "the prompt is empty (give at least one token)")
        check(request.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {request.max_new_tokens}")
        check(p + request.max_new_tokens <= self.max_len, "max_new_tokens",
              f"prompt {p} + max_new_tokens {request.max_new_tokens} exceeds the cache's {self.max_len} positions")
        check(all(0 <= t < self.vocab for t in request.prompt), "prompt",
              f"token ids must be in [0, {self.vocab}) (the model's vocabulary)")
        self.pending.append(request)

    def reset(self) -> list[Request]:
        """Drop every live and waiting request (after a failed step); returns them."""
        dropped = [r.request for r in self.rows] + list(self.pending)
        self.rows, self.length = [], 0
        self.pending.clear()
        return dropped

    def step(self) -> list[Event]:
        """Admit the waiting requests that fit (their first tokens), then one token for every
        live row. Returns the tokens made, in slot order."""
        with torch.inference_mode():
            with layouts.decode_threads(self.plan):
                events = self._admit()
            if self.rows:
                view, plan = self._view(len(self.rows))
                view.cache.length = self.length
                with layouts.decode_threads(plan):
                    logits = view(self.last[:len(self.rows)])  # [n, V_local]
                self.length += 1
                events += self._emit(logits, self.rows)
        return events

    # --- joining ----------------------------------------------------------------------------
    def _placement(self, joining: list[Request]) -> int | None:
        """The new shared length ``L'`` with ``joining`` added (the live columns then move by ``L' - L``),
        or ``None`` where they do not fit. Each row still needs one column per token to come."""
        width = max(len(r.prompt) for r in joining)
        need = max([r.max_new_tokens - 1 for r in joining]
                   + [row.request.max_new_tokens - row.made for row in self.rows])
        if not self.rows:
            return width if width + need <= self.max_len else None
        drop = min(row.pad for row in self.rows)  # leading columns no live row attends
        keep = max(self.length, width)
        if keep + need <= self.max_len and 2 * drop < self.length:
            return keep
        compact = max(self.length - drop, width)
        return compact if compact + need <= self.max_len else None

    def _admit(self) -> list[Event]:
        joining: list[Request] = []
        if self.rows and self.pending and self.held < self.gather_steps:
            if len(self.pending) < min(self.slots - len(self.rows), -(-self.slots // 8)):
                self.held += 1  # more may come: one prompt pass for several
                return []
        if self.continuous or not self.rows:
            while self.pending and len(self.rows) + len(joining) < self.slots:
                if self._placement([*joining, self.pending[0]]) is None:
                    break  # first come, first served: it waits for rows to end
                joining.append(self.pending.popleft())
        if not joining:
            return []
        self.held = 0
        self.prompt_passes += 1
        new_len = self._placement(joining)
        self._move(new_len - self.length if self.rows else 0)
        self.length = new_len
        # the joining prompts in one pass, left-padded to one width, on a cache of their own
        width, n, k = max(len(r.prompt) for r in joining), len(self.rows), len(joining)
        prompt, pad = left_pad([r.prompt for r in joining], self.pad_id, width, self.device)
        pre = self.decoder.over(new_cache(self.model, k, width, pad, dtype=self.plan.dtype))
        logits = pre(prompt)  # [k, V_local]: what follows each prompt
        for layer in self.cache.k:  # their keys and values into slots n..n+k, ending at column L'-1
            self.cache.k[layer][n:n + k, new_len - width:new_len] = pre.cache.k[layer]
            self.cache.v[layer][n:n + k, new_len - width:new_len] = pre.cache.v[layer]
        rows = [_Row(r, new_len - len(r.prompt)) for r in joining]
        self.decoder.set_starts(torch.arange(n, n + k), torch.tensor([row.pad for row in rows]))
        self.rows += rows
        return self._emit(logits, rows, first=n)

    def _move(self, shift: int) -> None:
        """Move the live rows' columns ``[0, L)`` by ``shift`` (right: room for a longer prompt;
        left: drop leading columns no row needs); their starts move with them."""
        n, length = len(self.rows), self.length
        if shift == 0 or n == 0:
            return
        src, dst = (slice(0, length), slice(shift, length + shift)) if shift > 0 else \
            (slice(-shift, length), slice(0, length + shift))
        for kv in (self.cache.k, self.cache.v):
            for t in kv.values():
                t[:n, dst] = t[:n, src].clone()  # the ranges overlap
        for row in self.rows:
            row.pad += shift
        self.decoder.set_starts(torch.arange(n), torch.tensor([row.pad for row in self.rows]))

    def _view(self, n: int) -> tuple[Decoder, layouts.DecodePlan]:
        if n not in self._views:
            base, plan = self.single if n == 1 and self.single else (self.decoder, self.plan)
            # the tables of self.decoder, which set_starts keeps
            self._views[n] = base.over(self.cache.head(n), (self.decoder.cos[:n], self.decoder.sin[:n])), plan
        return self._views[n]

    # --- tokens -----------------------------------------------------------------------------
    def _emit(self, logits: torch.Tensor, rows: list[_Row], first: int = 0) -> list[Event]:
        """Draw a token for each of ``rows`` (slots ``first, first+1, ...``) from ``logits [m,
        V_local]``; rows that end leave their slots."""
        logits = parallel.gather_vocab(logits.float())[:, :self.vocab]  # [m, V]
        groups: dict[SamplingConfig, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.request.sampling, []).append(i)
        if len(groups) == 1:
            tokens = _next_token(logits, rows[0].request.sampling, self.generator)[0]
        else:  # rows drawn alike together
            tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            for cfg, idx in groups.items():
                index = torch.tensor(idx, device=logits.device)
                tokens[index] = _next_token(logits[index], cfg, self.generator)[0]
        self.last[first:first + len(rows), 0] = tokens
        events, ended = [], []
        for i, (row, t) in enumerate(zip(rows, tokens.tolist())):
            row.made += 1
            end = "stop" if t in row.request.stop_ids else "length" if row.made >= row.request.max_new_tokens else None
            events.append(Event(row.request, t, end))
            if end is not None:
                ended.append(first + i)
        for slot in reversed(ended):  # the last live row moves into the freed slot
            self._free(slot)
        return events

    def _free(self, slot: int) -> None:
        last = len(self.rows) - 1
        if slot != last:
            for kv in (self.cache.k, self.cache.v):
                for t in kv.values():
                    t[slot, :self.length] = t[last, :self.length]
            self.rows[slot] = self.rows[last]
            self.last[slot] = self.last[last]
            self.decoder.set_starts(torch.tensor([slot]), torch.tensor([self.rows[slot].pad]))
        self.rows.pop()
        if not self.rows:
            self.length = 0
