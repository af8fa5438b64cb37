"""Batched, KV-cached generation from PaLM: the rollouts of PPO, the replies of ``palm chat`` and
the samples of ``evaluate``.

A batch of prompts of different lengths is left-padded to one width ``P``; each row's first real
token is its RoPE position 0 and padding is never attended (both held by the model's
:class:`~palm.decode.cache.KVCache`, made once per batch), so a row continues exactly as its prompt
alone would. The cache holds ``P + max_new_tokens`` positions, allocated once; each step feeds one
token per row, through :class:`~palm.decode.decoder.Decoder` (the model's blocks with their matmuls
fused, made from the current weights at each call). Rows stop independently at a stop token
(end of turn): from then on they emit ``pad_id``, masked out of the response, and the loop ends
when every row has stopped.

Sampling (:func:`sampling_logprobs`): temperature, then top-k, then top-p (nucleus) on the
full-vocabulary logits; temperature 0 is greedy. Under tensor parallelism every rank gathers the
vocabulary shards and draws from the same generator state, so all ranks return the same tokens
(call :func:`generate` on every TP rank with the same arguments and equally seeded generators).
Pipeline parallelism is refused: decoding one token at a time needs the whole model per process.

Log-probabilities come back twice, for PPO: under the distribution the token was actually drawn
from (after temperature and truncation; 0 for greedy, which is a point mass), and under the raw
model (temperature 1, no truncation), the behaviour policy's log-prob that PPO's importance ratio
and KL need, with no extra forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch
from megatron.core import parallel_state

from palm.core.config import check
from palm.core.errors import ConfigError, UserError
from palm.decode import layouts, native
from palm.decode.cache import new_cache
from palm.decode.decoder import Decoder, FusedWeights
from palm.model import parallel
from palm.model.network import PaLM


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How each next token is drawn (the keyword arguments of :func:`generate`, same defaults:
    greedy unless a temperature is given)."""

    temperature: float = 0.0  # 0: greedy (argmax); else logits / temperature
    top_k: int | None = None  # keep the k most likely tokens (ties with the k-th kept); None: all
    top_p: float | None = None  # keep the smallest top set whose probability reaches top_p; None: all

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "temperature", f"must be >= 0 (0: greedy), got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or null, got {self.top_k}")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p",
              f"must be in (0, 1] or null, got {self.top_p}")


@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns (all on the model's device). ``n <= max_new_tokens`` is the
    number of steps run: fewer when every row stopped early."""

    tokens: torch.Tensor  # [b, P + n] int64: left-padded prompts, then the responses
    pad: torch.Tensor  # [b] int64: left padding of each row; its prompt is tokens[r, pad[r]:P]
    prompt_len: int  # P, the padded prompt width: responses start at column P
    response_mask: torch.Tensor  # [b, n] bool: generated tokens, each row's stop token included
    logprobs: torch.Tensor  # [b, n] fp32: log-prob under the sampling distribution used (0: masked)
    raw_logprobs: torch.Tensor  # [b, n] fp32: log-prob under the model at temperature 1 (0: masked)
    stopped: torch.Tensor  # [b] bool: the row ended with a stop token (else it ran out of tokens)

    @property
    def response(self) -> torch.Tensor:
        """``[b, n]``: the generated tokens (``pad_id`` after a row's stop token)."""
        return self.tokens[:, self.prompt_len:]

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[b, P + n]`` bool: real tokens (neither left padding nor padding after a stop)."""
        cols = torch.arange(self.prompt_len, device=self.tokens.device)
        return torch.cat([cols >= self.pad[:, None], self.response_mask], dim=1)


def sampling_logprobs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Log-probabilities ``[b, V]`` of the distribution tokens are drawn from, ``-inf`` outside
    the kept set: ``logits / temperature``, then top-k, then top-p over what top-k kept
    (renormalised). Needs ``temperature > 0``."""
    z = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < z.shape[-1]:
        kth = z.topk(cfg.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        ranked, order = z.sort(dim=-1, descending=True)
        p = ranked.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p; the first is always kept
        ranked = ranked.masked_fill(p.cumsum(dim=-1) - p >= cfg.top_p, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, order, ranked)
    return z.log_softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs [b, V]`` (non-negative weights, each row's sum > 0), drawn
    with probability proportional to its weight, ``[b]`` int64: by inverse CDF, the first index
    whose running sum exceeds ``u * sum`` for one uniform ``u`` per row.

    Why not ``torch.multinomial``: it draws one exponential per vocabulary entry (``V`` random
    numbers per row, then an argmax); this draws one per row, a cumulative sum and a binary
    search: ``multinomial`` took a seventh of a PPO rollout's time, this a small part of that
    (numbers: benchmarks/records/code-notes-2026-12-06.md#draw).
    An index of zero weight is never drawn (its running sum equals its predecessor's, so the
    search stops before it; ``u * sum`` is kept below the row's sum), so top-k/top-p hold
    exactly. The running sum is fp32, as is ``multinomial``'s arithmetic: the interval of each
    index is exact to one fp32 rounding of the sum (~3e-8 absolute)."""
    cdf = probs.float().cumsum(dim=-1)  # [b, V]
    total = cdf[:, -1:]  # [b, 1]
    u = torch.rand(total.shape, generator=generator, dtype=total.dtype, device=total.device)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # in [0, total)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


GREEDY_BLOCK = 128  # greedy_max: the vocabulary is scanned in blocks of this many entries


def greedy_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.max(dim=-1)`` of ``x [b, V]`` (contiguous): each row's maximum and the first index
    holding it, ``[b]`` each. Over several rows, in blocks of ``GREEDY_BLOCK``: the blocks'
    maxima first (``amax``, which the CPU vectorises), then the first block holding the row's
    maximum, then the first index in that block; the same answer, ties included. Why: ``max``
    with indices scans element by element on CPU, the blocks take about half its time for 16
    rows; for one row ``max`` is faster (numbers:
    benchmarks/records/code-notes-2026-12-06.md#greedy-max)."""
    b, v = x.shape
    if b == 1 or v % GREEDY_BLOCK or v < 4 * GREEDY_BLOCK:
        return x.max(dim=-1)
    blocks = x.view(b, v // GREEDY_BLOCK, GREEDY_BLOCK)
    best, j = blocks.amax(dim=-1).max(dim=-1)  # [b]: the maximum, the first block holding it
    i = blocks[torch.arange(b, device=x.device), j].max(dim=-1).indices  # [b]: where in that block
    return best, j * GREEDY_BLOCK + i


def _next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[b, V]`` fp32 logits -> (token, its sampling log-prob, its raw log-prob), each ``[b]``."""
    if cfg.temperature == 0:  # the most likely token and its log-prob together
        picked = native.greedy(logits)  # native passes (fp32 on CPU), faster than the torch ops
        if picked is None:  # torch ops: argmax alone is no faster; softmax runs on every core
            # where log_softmax keeps to one, and the log of the top probability (>= 1/V) loses
            # nothing (numbers: benchmarks/records/code-notes-2026-12-06.md#next-token)
            top, token = greedy_max(logits.softmax(dim=-1))
            picked = token, top.log()
        token, raw = picked
        return token, torch.zeros_like(raw), raw  # the sampling log-prob of a point mass: 0
    # one fused pass over the vocabulary (logsumexp makes four: max, subtract, exp and sum)
    raw_lp = logits.log_softmax(dim=-1)
    plain = cfg.temperature == 1 and cfg.top_k is None and cfg.top_p in (None, 1)
    lp = raw_lp if plain else sampling_logprobs(logits, cfg)  # (the same numbers when plain)
    token = draw(lp.exp(), generator)
    logp = lp.gather(-1, token[:, None]).squeeze(-1)
    return token, logp, raw_lp.gather(-1, token[:, None]).squeeze(-1)


def _check_whole_model(model: PaLM) -> None:
    pp = (parallel_state.get_pipeline_model_parallel_world_size()
          if parallel_state.model_parallel_is_initialized() else 1)
    if pp > 1 or not (model.pre_process and model.post_process):
        raise UserError(f"generation needs the whole model in every process: use pipeline_parallel=1 "
                        f"(got {pp}); tensor and data parallelism are fine")


def left_pad(prompts: Iterable[Sequence[int] | torch.Tensor], pad_id: int, width: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, width]`` int64 with each prompt at the right end, and the left padding ``[b]``."""
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):  # once per batch, not per token
        out[i, width - len(r):] = r
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long)
    return out.to(device), pad.to(device)


def generate(model: PaLM, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Iterable[int] = (), pad_id: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_token: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             weights: FusedWeights | None = None) -> Generation:
    """Continue each prompt (a list of token ids, or a row of a ``[b, s]`` tensor) by up to
    ``max_new_tokens``; see the module docstring. ``temperature=0`` is greedy; ``generator``
    (on the model's device) makes sampling reproducible. A row stops after emitting any of
    ``stop_ids``. ``use_cache=False`` recomputes the whole sequence at every step through the
    model's own forward pass (a fresh cache filled in one pass, so the same masking code): the reference the
    cached, fused path is tested against.
    ``on_token(token, live)`` is called after every step with that step's tokens ``[b]`` and
    which rows were still generating ``[b]`` bool (stopped rows hold ``pad_id``): streaming, as
    ``palm chat`` prints a reply while it is made.
    ``weights``: decode with these int8 weights of ``model`` (:func:`palm.decode.quant.quantize`;
    chat and serving only, never PPO's rollouts) instead of the model's own.

    Runs in inference mode (no autograd bookkeeping at all, not even version counters: a decoding
    step's hundred-odd small calls each cost less; numbers:
    benchmarks/records/code-notes-2026-12-06.md#generate); the returned tensors are copies made
    outside it, so PPO's update may use them under autograd (an inference tensor cannot be saved
    for backward).
    """
    with torch.inference_mode():
        gen = _generate(model, prompts, max_new_tokens, SamplingConfig(temperature, top_k, top_p),
                        stop_ids, pad_id, generator, use_cache, on_token, weights)
    return Generation(**{f.name: v.clone() if isinstance(v := getattr(gen, f.name), torch.Tensor) else v
                         for f in dataclasses.fields(gen)})


def _generate(model: PaLM, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
              cfg: SamplingConfig, stop_ids: Iterable[int], pad_id: int, generator: torch.Generator | None,
              use_cache: bool, on_token: Callable[[torch.Tensor, torch.Tensor], None] | None,
              weights: FusedWeights | None = None) -> Generation:
    _check_whole_model(model)
    prompts = list(prompts)
    lengths = [len(p) for p in prompts]
    check(len(prompts) > 0, "prompts", "no prompts to generate from")
    if 0 in lengths:
        raise ConfigError("prompts", f"prompt {lengths.index(0)} is empty (give at least one token)")
    check(max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    width, seq_len = max(lengths), model.cfg.seq_len
    total = width + max_new_tokens
    check(total <= seq_len, "max_new_tokens",
          f"longest prompt {width} + max_new_tokens {max_new_tokens} = {total} exceeds model.seq_len={seq_len}")
    device = model.embedding.weight.device
    prompt, pad = left_pad(prompts, pad_id, width, device)
    vocab = model.cfg.vocab_size
    check(bool((prompt >= 0).all() and (prompt < vocab).all()), "prompts",
          f"token ids must be in [0, {vocab}) (the model's vocabulary)")

    b = prompt.shape[0]
    tokens = torch.cat([prompt, torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)], 1)
    mask = torch.zeros(b, max_new_tokens, dtype=torch.bool, device=device)
    logprobs = torch.zeros(b, max_new_tokens, device=device)
    raw_logprobs = torch.zeros(b, max_new_tokens, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    decoder, plan = None, layouts.DecodePlan(torch.float32)
    if weights is not None:  # int8 weights, fp32 around them (no plan to measure)
        check(use_cache, "use_cache", "int8 weights decode with the KV cache only")
        decoder = Decoder(model, new_cache(model, b, total, pad, dtype=torch.float32), plan, weights)
    elif use_cache:
        plan = Decoder.plan(model, b, total)
        decoder = Decoder(model, new_cache(model, b, total, pad, dtype=plan.dtype), plan)
    step_input, n = prompt, 0
    with layouts.decode_threads(plan):  # the plan's threads (openblas: torch's ops on one)
        for i in range(max_new_tokens):
            if decoder is not None:
                last = decoder(step_input)  # [b, V_local]: the last position's logits
            else:  # the reference: everything so far, from scratch, through the model's own forward
                h = model.trunk(tokens[:, :width + i], new_cache(model, b, width + i, pad))[:, -1:]  # [b, 1, d]
                last = model.logits(h)[:, 0]
            logits = parallel.gather_vocab(last.float())[:, :vocab]  # [b, V] on every rank
            token, logp, raw = _next_token(logits, cfg, generator)
            live = ~done
            tokens[:, width + i] = token.masked_fill(done, pad_id)
            mask[:, i] = live
            logprobs[:, i] = logp.masked_fill(done, 0.0)
            raw_logprobs[:, i] = raw.masked_fill(done, 0.0)
            n = i + 1
            if on_token is not None:
                on_token(tokens[:, width + i], live)
            if len(stop):
                done |= live & torch.isin(token, stop)
                if bool(done.all()):
                    break
            step_input = tokens[:, width + i:width + i + 1]
    return Generation(tokens=tokens[:, :width + n], pad=pad, prompt_len=width, response_mask=mask[:, :n],
                      logprobs=logprobs[:, :n], raw_logprobs=raw_logprobs[:, :n], stopped=done)
