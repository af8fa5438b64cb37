"""The forward pass of PaLM for KV-cached decoding: the parallel block with its matmuls fused
(PaLM §2 "Parallel Layers"), and the per-CPU plan of how its few rows meet the weights."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from palm.decode import layouts, native
from palm.decode.cache import KVCache, new_cache
from palm.model import lora, parallel
from palm.model.network import PaLM, RotaryEmbedding, mqa_attention

_PLANS: dict[tuple, layouts.DecodePlan] = {}  # Decoder.plan's measurements, per process
PLAN_MARGIN = 0.1  # Decoder.plan: plans within this fraction of the fastest tie; the first of them wins
PLAN_KEEP_BYTES = 1 << 30  # Decoder.plan: candidates' weight copies kept between rounds up to this


def stack(model: "PaLM", dtype: torch.dtype, hold: Callable[[torch.Tensor], Any],
          hold_output: Callable[[torch.Tensor], Any]) -> tuple[list[tuple], torch.Tensor, Any]:
    """The fused weights of :class:`Decoder` (see there) in ``dtype``: ``[(layer, heads,
    hold(w_in), hold(w_out))]`` per block, the final norm's weight (scaled), and
    ``hold_output(output weight)``; ``hold`` makes the callable ``x -> x @ w.T`` a step uses."""
    blocks = []
    d = model.cfg.d_model
    head_dim = model.cfg.head_dim
    with torch.no_grad():
        for block in model.layers.values():
            attn, mlp = block.attn, block.mlp
            # each weight with its LoRA adapter folded in, if it has one (a policy in training)
            w_in = torch.cat([lora.weight(attn.q), lora.weight(attn.kv), lora.weight(mlp.gate),
                              lora.weight(mlp.up)]).float()
            w_in[:attn.q.weight.shape[0]] *= head_dim ** -0.5  # the scores' 1/sqrt(hd) on the
            # query rows (RoPE is linear: it commutes)
            w_in = (w_in * block.norm.weight.float()).to(dtype)  # one rounding in bf16
            w_out = torch.cat([lora.weight(attn.out), lora.weight(mlp.down)], dim=1).to(dtype)
            heads = attn.q.weight.shape[0] // head_dim  # this rank's query heads
            blocks.append((block.layer, heads, hold(w_in), hold(w_out)))
        final_norm = (model.final_norm.weight.float() * d ** -0.5).to(dtype)
        output = hold_output(model.shared_embedding_or_output_weight().to(dtype))
    return blocks, final_norm, output


class FusedWeights(Protocol):
    """Fused weights made once for many decoders (:class:`palm.decode.quant.Int8Weights`): what
    :func:`stack` returns, and ``check(model)``, which raises unless they are ``model``'s own."""
    blocks: list[tuple]
    final_norm: torch.Tensor
    output: Any

    def check(self, model: "PaLM") -> None: ...


class Decoder:
    """The forward pass of :class:`PaLM` for KV-cached decoding (no autograd), with each block's
    four input projections as one matmul and its two output projections as another.

    PaLM §2 notes that the parallel formulation ``x + attn(ln(x)) + mlp(ln(x))`` lets the MLP and
    attention input matmuls be fused: both read the same ``ln(x)``. Here the query, key/value,
    gate and up weights are stacked into one ``w_in [(h+2)*hd + 2f, d]`` (the norm's weight folded
    in: ``W (w * n) = (W diag(w)) n``), and since the block's output is the *sum* of the two
    branches, ``W_o o + W_d a = [W_o W_d] [o; a]``: one ``w_out [d, h*hd + f]``. Under TP each
    rank stacks its own shards (its query heads, the whole K/V head, its SwiGLU columns) and the
    two row-parallel all-reduces of a block become one (:func:`parallel.tp_sum`). The query rows
    carry the attention scores' 1/sqrt(hd) (an unmasked step's scores are then one plain ``bmm``),
    the final norm's weight the output layer's 1/sqrt(d). The same RoPE tables, KV cache and
    attention (:func:`mqa_attention`) as the model's own path; equal to it within fp32 rounding
    (``tests/test_generate.py``).

    Why: decoding one token per row is a chain of small operations whose per-call overhead
    costs more than their arithmetic on CPU. Per block this makes 2 matmuls out of 6, and RoPE
    three calls for the queries and the key together (:meth:`RotaryEmbedding.rolled`, its tables
    made once per batch) instead of seven for each (``benchmarks/generate_throughput.py`` measures
    it; numbers: benchmarks/records/code-notes-2026-12-06.md#decoder).

    How the few rows of a step meet the weights, in which dtype and layout, is measured per CPU
    (:meth:`plan`): e.g. with AMX a bf16 model decodes one prompt faster from an fp32 copy of its
    weights; on an AVX2-only AMD CPU one prompt decodes fastest through numpy's BLAS (call the
    decoder inside ``layouts.decode_threads(plan)``, as :func:`palm.decode.generate.generate` does:
    the same numbers outside, far slower). The returned logits are then fp32 computed from the
    model's bf16 weights (closer to the exact function than the bf16 pass, not bit-equal to it).

    For fp32 on CPU, a one-token step's work between a block's two matmuls (RoPE, the cache
    write, attention, SwiGLU's product: a dozen small torch calls) is one call of a C kernel
    (:class:`palm.decode.native.DecodeMix`, compiled at first use) that reads each row's cached keys and
    values once for all its heads and allocates nothing; :meth:`_mix` is the same in torch ops,
    for the prompt pass, other dtypes and devices, and a machine without a C compiler
    (``tests/test_native.py`` holds the two together). The kernel decodes faster at one prompt and
    at 16 (numbers: benchmarks/records/code-notes-2026-12-06.md#decoder).

    A snapshot: the stacked weights are copies (the blocks' weights once more in memory while it
    lives), so make a new one after the weights change (:func:`palm.decode.generate.generate` makes one
    per call). Needs the whole model (no pipeline stages).
    """

    def __init__(self, model: "PaLM", cache: KVCache, plan: layouts.DecodePlan | None = None,
                 weights: FusedWeights | None = None):
        """``weights``: the model's fused weights made once, e.g. in int8
        (:func:`palm.decode.quant.quantize`; fp32 plan and cache); else the plan's copies of the
        current weights (:func:`stack`)."""
        assert model.pre_process and model.post_process, "the decoder needs the whole model"
        self.model, self.cache = model, cache
        self.eps, self.d = model.cfg.norm_eps, model.cfg.d_model
        self.head_dim = model.cfg.head_dim
        self._starts: tuple[torch.Tensor, torch.Tensor] | None = None  # set_starts' rolled table
        plan = plan or layouts.DecodePlan(model.final_norm.weight.dtype)
        self.dtype = plan.dtype  # the cache's too (made with new_cache(..., dtype=plan.dtype))
        k = next(iter(cache.k.values()))  # [b, max_len, hd]: the first layer's keys
        assert k.dtype == self.dtype, "the cache must be made in the plan's dtype"
        with torch.no_grad():
            if weights is not None:
                assert self.dtype == torch.float32, "weights made once decode in fp32"
                weights.check(model)
                self.blocks, self.final_norm, self.output = weights.blocks, weights.final_norm, weights.output
            else:
                held = lambda w: layouts.DecodeWeight(w, plan.layout, rows=k.shape[0])  # noqa: E731
                self.blocks, self.final_norm, self.output = stack(model, self.dtype, held, held)
            self.cos, self.sin = model.rope.rolled_tables(cache)  # [b or 1, max_len, 1, hd]
            # a one-token step's work between w_in and w_out in one native call (fp32 on CPU;
            # None elsewhere or without a C compiler: the torch ops below, the same function)
            self.mix = None
            if self.dtype == torch.float32:
                ffn = next(iter(model.layers.values())).mlp.gate.weight.shape[0]  # this rank's SwiGLU width
                self.mix = native.DecodeMix.make(cache.k, cache.v, self.cos, self.sin, cache.key_bias,
                                                 self.blocks[0][1], ffn)

    def over(self, cache: KVCache, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Decoder":
        """This decoder's weights (shared, not copied) over another ``cache`` of its dtype: the
        prompt pass of joining requests and the live rows of :class:`palm.decode.batcher.Batcher`.
        ``tables``: rolled RoPE tables to use (views of this decoder's, which :meth:`set_starts`
        rewrites in place); else made from ``cache``."""
        other = copy.copy(self)
        other.cache = cache
        other.cos, other.sin = tables if tables is not None else self.model.rope.rolled_tables(cache)
        if self.mix is not None:
            other.mix = native.DecodeMix.make(cache.k, cache.v, other.cos, other.sin, cache.key_bias,
                                              self.mix.h, self.mix.f)
        return other

    def set_starts(self, rows: torch.Tensor, pad: torch.Tensor) -> None:
        """:meth:`KVCache.set_starts` on this decoder's cache and its rolled RoPE tables."""
        cache = self.cache
        cache.set_starts(rows, pad)
        if self._starts is None:  # the rolled form of the cache's table, made once
            cos, sin = cache.starts_table()[:2]
            self._starts = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        for r, q in zip(rows.tolist(), pad.tolist()):
            window = slice(cache.max_len - q, 2 * cache.max_len - q)
            self.cos[r], self.sin[r] = self._starts[0][window], self._starts[1][window]

    @staticmethod
    def plan(model: "PaLM", batch: int, length: int) -> layouts.DecodePlan:
        """The fastest way to decode ``batch`` rows up to ``length`` positions with ``model`` on
        this CPU, measured once per process, model shape and size class (rows and length rounded
        up to a power of two; about a second at the default size): each candidate (the
        model's dtype or an fp32 copy of the weights, times each weight layout of
        :data:`layouts.LAYOUTS`: MKL from the weights or from their stored transposes, oneDNN
        from weights packed once, numpy's BLAS) decodes a dummy batch at half that length, the
        candidates taking turns in an untimed round, then five rounds of a warm-up and two timed
        steps (a shared host's speed drifts within a second: with one block of steps per
        candidate, the noise picked the layout); the first candidate whose best step time is
        within ``PLAN_MARGIN`` of the fastest one's wins, the model's own plan (its dtype,
        weight-major) first. A layout this CPU has no kernels for is skipped. On GPU: the model's
        dtype.

        Why measure: a decoding step reads every weight once for a few rows, so its speed is set
        by memory, by the kernels' fixed costs and by attention over the cache, all of which differ
        between CPUs, BLAS libraries, dtypes and lengths: e.g. the stored transpose wins with
        AVX-512 kernels and loses with MKL held to AVX2; with AMX one prompt of a bf16 model is
        fastest from an fp32 copy; on an AVX2-only AMD CPU one prompt is fastest through numpy's
        BLAS (MKL's one-row GEMMs are slow on AMD) and 16 from oneDNN's packed weights (a BLAS
        GEMM repacks its operands at every call; oneDNN's weights are packed once per decoder).
        Numbers: benchmarks/records/code-notes-2026-12-06.md#decoder-plan."""
        dtype = model.final_norm.weight.dtype
        if model.final_norm.weight.is_cuda:
            return layouts.DecodePlan(dtype)
        rows = 1 if batch == 1 else min(parallel.FEW_ROWS, 1 << (batch - 1).bit_length())
        length = min(model.cfg.seq_len, 1 << (max(length, 2) - 1).bit_length())
        key = (repr(model.cfg), tuple(model.layers), dtype, rows, length, parallel.tp_size())
        if key not in _PLANS:
            _PLANS[key] = layouts.tp_agree(Decoder._fastest(model, dtype, rows, length))  # TP: rank 0's
        return _PLANS[key]

    @staticmethod
    @torch.inference_mode()  # as generate() decodes
    def _fastest(model: "PaLM", dtype: torch.dtype, rows: int, length: int, steps: int = 2,
                 rounds: int = 5) -> layouts.DecodePlan:
        candidates = [layouts.DecodePlan(dt, layout) for dt in dict.fromkeys((dtype, torch.float32))
                      for layout in layouts.LAYOUTS if layout != "openblas" or dt == torch.float32]
        tokens = torch.ones(rows, 1, dtype=torch.long, device=model.final_norm.weight.device)
        if model.cfg.seq_len < 2 * (steps + 1):  # no room for the untimed round and one timed
            return candidates[0]
        rounds = min(rounds, model.cfg.seq_len // (steps + 1) - 1)  # the untimed round, then these
        size = (rounds + 1) * (steps + 1)  # positions the rounds fill
        start = max(0, min(length // 2, length - size))  # mid-way: attention over half the cache
        # the decoders live through every round where their weight copies fit PLAN_KEEP_BYTES: a
        # stacked fp32 copy each, and a second (transpose, packing) for every layout but the
        # model's own. Counted as one copy each, d_model 1024 kept 1.6 GiB alive and raised PPO's
        # peak RSS by as much (benchmarks/records/lora-memory-2026-12-06.md)
        copies = sum(1 if c.layout == "weight" else 2 for c in candidates)
        keep = copies * 4 * sum(p.numel() for p in model.parameters()) <= PLAN_KEEP_BYTES
        kept: dict[layouts.DecodePlan, Decoder] = {}
        best = {c: math.inf for c in candidates}
        # rounds of a few steps of each candidate in turn, a warm-up step first (its threads may
        # have slept): a shared host's speed drifts within a second, so every candidate gets
        # several chances at a quiet moment, and the best step of each is compared. The untimed
        # first round keeps the thread pools' first calls out of the timings, where they had made
        # numpy's BLAS lose (numbers: benchmarks/records/code-notes-2026-12-06.md#decoder-fastest)
        for r in range(rounds + 1):  # round 0 untimed: first calls (thread pools, kernels' JIT)
            for c in list(best):
                decoder = kept.get(c)
                if decoder is None:
                    try:
                        decoder = Decoder(model, new_cache(model, rows, start + size, dtype=c.dtype), c)
                    except RuntimeError:  # no kernels for it on this CPU (oneDNN's bf16 needs AVX-512)
                        del best[c]
                        continue
                    decoder.cache.length = start  # zeros as keys: the same work as real ones
                    if keep:
                        kept[c] = decoder
                with layouts.decode_threads(c):
                    decoder(tokens)
                    for _ in range(steps):
                        t = time.perf_counter()
                        # with a pass over the vocabulary, as generate()'s pick makes one next (greedy's
                        # native pass or sampling's log_softmax; a softmax stands for both): it runs
                        # in the plan's threads too (numpy's BLAS leaves torch one)
                        decoder(tokens).float().softmax(dim=-1)
                        if r:
                            best[c] = min(best[c], time.perf_counter() - t)
        return Decoder._settle(best)

    @staticmethod
    def _settle(best: dict[layouts.DecodePlan, float]) -> layouts.DecodePlan:
        """The first plan of ``best`` (plan -> step time, the model's own plan first) within
        ``PLAN_MARGIN`` of the fastest: near-ties would let the timing noise of each run pick
        the plan, and the rounding with it (a run's numbers must repeat), between the model's
        own plan and another as between two others (oneDNN's packed weights and numpy's BLAS
        decode 16 prompts nearly as fast on some CPUs; numbers:
        benchmarks/records/code-notes-2026-12-06.md#decoder-settle)."""
        fastest = min(best.values())
        return next(c for c, t in best.items() if (1 - PLAN_MARGIN) * t <= fastest)

    def _mix(self, y: torch.Tensor, layer: int, heads: int, start: int, cos: torch.Tensor,
             sin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A block's work between its two matmuls in torch ops: ``y`` (the fused input projection)
        -> ``[b, s, heads*hd + ffn_local]``, the attention output then ``silu(gate) * up``, with
        RoPE and the cache write on the way. What :mod:`palm.decode.native`'s kernel computes for a
        one-token step (its reference and its fallback)."""
        cache, hd, s = self.cache, self.head_dim, y.shape[1]
        qk = RotaryEmbedding.rolled(y[..., :(heads + 1) * hd].unflatten(-1, (heads + 1, hd)), cos, sin)
        cache.k[layer][:, start:start + s] = qk[:, :, heads]  # [b, s, hd]: the shared key head
        cache.v[layer][:, start:start + s] = y[..., (heads + 1) * hd:(heads + 2) * hd]
        o = mqa_attention(qk[:, :, :heads], cache.k[layer][:, :start + s], cache.v[layer][:, :start + s],
                          start, bias, scale=1.0)  # [b, s, heads * hd]: q came scaled
        gate, up = y[..., (heads + 2) * hd:].chunk(2, dim=-1)  # [b, s, ffn_local] each
        return torch.cat([o, F.silu(gate) * up], dim=-1)

    @torch.inference_mode()  # no autograd bookkeeping (see palm.decode.generate.generate): logits are inference tensors
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next ``tokens [b, s]`` of every row (a prompt, then one at a time) -> the logits of
        the last position ``[b, vocab_local]`` (this rank's vocabulary shard); fills the cache."""
        cache, model = self.cache, self.model
        x = model.embedding(tokens).to(self.dtype)  # [b, s, d]
        b, s, _ = x.shape
        start = cache.length
        cos, sin = self.cos[:, start:start + s], self.sin[:, start:start + s]  # the same for every block
        bias = cache.bias(start, s, self.blocks[0][1])  # the attention mask, also the same
        for layer, heads, w_in, w_out in self.blocks:
            y = w_in(F.layer_norm(x, (self.d,), None, None, self.eps))  # [b, s, (heads+2)*hd + 2*ffn_local]
            if s == 1 and self.mix is not None:  # the same as _mix, in one native call
                z = self.mix(y, layer, start)
            else:
                z = self._mix(y, layer, heads, start, cos, sin, bias)
            x = x + parallel.tp_sum(w_out(z))  # [b, s, d]
        cache.length += s
        h = F.layer_norm(x[:, -1], (self.d,), self.final_norm, None, self.eps)  # [b, d], scaled
        return self.output(h)
