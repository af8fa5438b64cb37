"""PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", §2) on
megatron-core's tensor-parallel layers.

Reads top to bottom: config, RoPE, norm, multi-query attention (and the KV cache decoding fills),
SwiGLU MLP, the parallel block, the model (one pipeline stage of it, or all of it). Activations
are batch-first ``[b, s, h]`` (so multi-query attention needs no transposes); only between
pipeline stages do they travel as megatron's ``[s, b, h]``.

Which weights are column-/row-parallel or replicated, and how layers are split into pipeline
stages, is decided in :mod:`palm.parallel` (the parallel plan, and the collectives over the
vocabulary shards); this file only asks for layers. The model returns per-token quantities
(logits, or the label's negative log-likelihood and log Z); objectives (losses, masks, z-loss)
live with the training stages in :mod:`palm.train`, sampling loops in :mod:`palm.generate`.
The same code runs TP x PP x DP on CPU (gloo) and GPU (NCCL), and in a single process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from palm import native, parallel
from palm.config import check


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The PaLM architecture (``params.yaml`` section ``model``). Defaults: a ~6 M-param model."""

    vocab_size: int = 8192  # tokenizer vocabulary; the embedding is padded up to a multiple of 128
    d_model: int = 256  # residual width d
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads (there is one shared key/value head: multi-query attention)
    head_dim: int = 64  # width of each query head and of the single key/value head
    ffn_mult: float = 4.0  # SwiGLU hidden width = ffn_mult * d_model (PaLM: 4)
    seq_len: int = 256  # training context length (RoPE tables and KV cache hold this many)
    rope_base: float = 10000.0  # RoPE frequency base (Su et al. 2021)
    init_std: float = 0.02  # normal init std of projection weights (embeddings: N(0, 1), PaLM §2)
    norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "seq_len"):
            check(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        check(self.ffn_mult > 0, "ffn_mult", f"must be positive, got {self.ffn_mult}")
        check(self.ffn_dim == self.ffn_mult * self.d_model, "ffn_mult",
              f"ffn_mult * d_model must be an integer, got {self.ffn_mult} * {self.d_model}")
        check(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        check(self.rope_base > 1, "rope_base", f"must be > 1, got {self.rope_base}")
        check(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
        check(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")

    @property
    def ffn_dim(self) -> int:
        return int(self.ffn_mult * self.d_model)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab rounded up to 128 so any TP size up to 128 splits it evenly."""
        return -(-self.vocab_size // 128) * 128

    def num_params(self) -> int:
        """Parameters of the whole model (the tied embedding counted once)."""
        d, f, hd = self.d_model, self.ffn_dim, self.head_dim
        block = d + d * self.n_heads * hd + d * 2 * hd + self.n_heads * hd * d + 3 * d * f
        return self.padded_vocab_size * d + self.n_layers * block + d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight use plus causal attention (PaLM appendix B)."""
        s = seq_len or self.seq_len
        d, f, hd, h = self.d_model, self.ffn_dim, self.head_dim, self.n_heads
        matmul_weights = self.n_layers * (d * h * hd + d * 2 * hd + h * hd * d + 3 * d * f)
        matmul_weights += self.padded_vocab_size * d  # output logits (tied embedding)
        attention = self.n_layers * 2 * h * hd * s  # QK^T and AV, halved by the causal mask x 2
        return 6.0 * matmul_weights + 6.0 * attention

    def check_parallel(self, tensor_parallel: int, pipeline_parallel: int,
                       virtual_stages: int = 1, section: str = "pretrain") -> None:
        """Refuse a TP/PP layout this model cannot be split into; errors name both fields."""
        tp, pp = tensor_parallel, pipeline_parallel
        check(self.n_heads % tp == 0, f"{section}.tensor_parallel",
              f"model.n_heads={self.n_heads} is not divisible by tensor_parallel={tp}")
        check(self.ffn_dim % tp == 0, f"{section}.tensor_parallel",
              f"model ffn width {self.ffn_dim} (ffn_mult*d_model) is not divisible by tensor_parallel={tp}")
        check(self.padded_vocab_size % tp == 0, f"{section}.tensor_parallel",
              f"padded vocab {self.padded_vocab_size} is not divisible by tensor_parallel={tp}")
        check(self.n_layers % (pp * virtual_stages) == 0, f"{section}.pipeline_parallel",
              f"model.n_layers={self.n_layers} is not divisible by pipeline_parallel={pp}"
              + (f" x virtual_stages={virtual_stages}" if virtual_stages > 1 else ""))


# --- RoPE (Su et al. 2021, "RoFormer"; PaLM §2 "RoPE embeddings") --------------------------------

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``x`` rotated pairwise by the angles of ``cos``/``sin`` (each ``[..., hd/2]``, broadcast
    over ``x [..., hd]``): channel ``i`` pairs with ``i + hd/2`` ("rotate half"),
    ``x1 cos - x2 sin`` and ``x2 cos + x1 sin``; ``sign=-1`` rotates back (the transpose)."""
    out = torch.empty_like(x)
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class Rotate(torch.autograd.Function):
    """RoPE as one function: four kernels forward and four backward (the gradient is the inverse
    rotation), into one output, where the textbook ``x * cos + cat(-x2, x1) * sin`` under
    autograd makes a negated half, a concatenation and two full products each way. Measured
    once (forward + backward alone at the default shapes, one thread, 2-core AVX2 CPU): 1.2x
    faster on the 4 query heads, 1.4x on the key, equal to within 5e-7; the whole default
    training step unchanged within noise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, sin, -1.0), None, None


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables ``[seq_len, hd/2]`` of positions ``[0, seq_len)``, one angle per channel
    pair; applied to queries and the shared key."""

    def __init__(self, head_dim: int, seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [s, hd/2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, start: int = 0, cache: "KVCache | None" = None) -> torch.Tensor:
        """x: ``[b, s, heads, hd]`` at positions ``start .. start+s`` (with a left-padded ``cache``:
        each row's own positions, made once per batch by the cache)."""
        s = x.shape[1]
        if cache is not None and cache.cos is not None:
            cos, sin = cache.cos[:, start:start + s], cache.sin[:, start:start + s]  # [b, s, 1, hd/2]
        else:
            key = (start, s, x.dtype, x.device)
            if key not in self._tables:  # [s, 1, hd/2] in the activation dtype, made once per shape
                self._tables[key] = tuple(t[start:start + s, None].to(x.dtype) for t in (self.cos, self.sin))
            cos, sin = self._tables[key]
        if torch.is_grad_enabled():
            return Rotate.apply(x, cos, sin)
        return _rotate(x, cos, sin, 1.0)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at per-row ``positions [b, t]`` -> ``[b, t, 1, hd/2]`` each."""
        return tuple(t[positions.to(t.device)][:, :, None].to(dtype) for t in (self.cos, self.sin))

    def rolled_tables(self, cache: "KVCache") -> tuple[torch.Tensor, torch.Tensor]:
        """``C = [cos, cos]`` and ``S = [-sin, sin]`` ``[b or 1, max_len, 1, hd]`` over the
        positions of ``cache`` (its per-row positions for a left-padded batch), for :meth:`rolled`."""
        k = next(iter(cache.k.values()))
        if cache.cos is not None:
            cos, sin = cache.cos, cache.sin
        else:
            cos, sin = (t[:k.shape[1], None].to(device=k.device, dtype=k.dtype)[None] for t in (self.cos, self.sin))
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    @staticmethod
    def rolled(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The rotation of :func:`_rotate` as ``x C + roll(x) S`` (``roll`` swaps the halves):
        three calls instead of seven, for decoding, where each call costs more than its work."""
        return torch.addcmul(x * c, x.roll(x.shape[-1] // 2, dims=-1), s)


# --- Norm: LayerNorm without bias (PaLM §2 "No biases") ------------------------------------------

class LayerNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, s, d]
        return F.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


# --- Multi-query attention (Shazeer 2019; PaLM §2): sharded query heads, one shared K/V head -----

class KVCache:
    """Decoding state of one batch, allocated once: keys and values of every layer
    ``[b, max_len, hd]`` and, for a batch of left-padded prompts, where each row starts.

    ``pad [b]``: left-padding tokens of each row. A row's first real token is its RoPE position 0
    (so a padded row computes exactly what the prompt alone would), and its padding is never
    attended: the per-row cos/sin tables and the key mask are made here, once per batch, so a
    decoding step only slices them. ``pad=None`` (or all zero): every row starts at position 0
    and attention is plain causal.
    ``length``: positions already filled; the model advances it after each forward pass.
    """

    def __init__(self, layers: Iterable[int], batch: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, rope: RotaryEmbedding | None = None,
                 pad: torch.Tensor | None = None):
        shape = (batch, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.length = 0
        self.cos = self.sin = self.key_bias = None
        self._bias: dict[tuple, torch.Tensor] = {}
        if pad is not None and bool((pad > 0).any()):
            pad = pad.to(device)
            pos = torch.arange(max_len, device=device) - pad[:, None]  # [b, max_len]
            self.cos, self.sin = rope.at(pos.clamp(min=0), dtype)  # padding sits at position 0: unseen
            self.real = pos >= 0  # [b, max_len]: not left padding
            # additive key mask [b, 1, max_len]; a decoding step's query is real and sees all
            # real keys before it, so this slice is its whole mask
            self.key_bias = torch.zeros(batch, 1, max_len, dtype=dtype, device=device).masked_fill(
                ~self.real[:, None], float("-inf"))

    def bias(self, start: int, s: int, heads: int) -> torch.Tensor | None:
        """The additive attention mask of ``s`` queries at ``start`` over keys ``[0, start+s)``
        of a left-padded batch (``None`` when no row is padded), broadcastable to
        ``[b, s * heads, t]``, rows ordered (position, head) as in :func:`mqa_attention`."""
        if self.key_bias is None:
            return None
        t = start + s
        if s == 1:
            return self.key_bias[:, :, :t]  # a view: nothing is built per decoding step
        key = (start, s, heads)
        if key not in self._bias:  # a prompt pass: made by the first layer, reused by the others
            q_pos = torch.arange(start, t, device=self.real.device)[:, None]  # [s, 1]
            k_pos = torch.arange(t, device=self.real.device)  # [t]
            # a padding query sees only itself (never a fully masked row: softmax would give NaN
            # there and the NaN would reach the real rows through that position's keys)
            allowed = (k_pos <= q_pos) & (self.real[:, None, :t] | (k_pos == q_pos))  # [b, s, t]
            bias = torch.zeros(allowed.shape, dtype=self.key_bias.dtype, device=allowed.device)
            self._bias = {key: bias.masked_fill(~allowed, float("-inf")).repeat_interleave(heads, dim=1)}
        return self._bias[key]


@functools.lru_cache(maxsize=16)
def _causal_bias(rows: int, cols: int, start: int, heads: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Additive mask ``[rows * heads, cols]``, rows ordered (position, head): query position
    ``start + i`` sees keys ``<= start + i``."""
    allowed = torch.ones(rows, cols, dtype=torch.bool, device=device).tril(start)
    bias = torch.zeros(rows, cols, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    return bias.repeat_interleave(heads, dim=0)


def mqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                  bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal multi-query attention: ``q [b, s, h, hd]``, ``k, v [b, t, hd]`` -> ``[b, s, h*hd]``.
    ``bias``: the whole additive mask of a left-padded batch (:meth:`KVCache.bias`; or any
    additive mask broadcastable to ``[b, s*h, t]``), or ``None`` for plain causal attention.
    ``scale``: of the scores, ``1/sqrt(hd)`` unless given (the decoder folds it into its query
    weights and gives 1).

    On GPU: fused SDPA. On CPU the single K/V head lets every query row of every head share one
    GEMM, ``[b, s*h, hd] @ [b, hd, t]``, with the causal mask added in the same ``baddbmm`` and no
    transposes (rows are already position-major). 3.5x faster than CPU SDPA in bf16 and 15 %
    in fp32 (d=256, s=256, b=8, 2 cores).
    """
    b, s, h, hd = q.shape
    t = k.shape[1]
    scale = hd ** -0.5 if scale is None else scale
    if q.is_cuda:
        if bias is not None:  # [b or 1, s*h or 1, t] -> [b or 1, h or 1, s, t]
            mask = bias.view(bias.shape[0], -1, 1 if bias.shape[1] == 1 else h, t).transpose(1, 2)
        else:  # one query at the end sees every key: no mask
            mask = None if start == 0 or s == 1 else torch.ones(s, t, dtype=torch.bool, device=q.device).tril(start)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k[:, None], v[:, None], attn_mask=mask,
                                           is_causal=mask is None and start == 0 and s > 1,
                                           enable_gqa=True, scale=scale)  # [b, h, s, hd]
        return o.transpose(1, 2).reshape(b, s, h * hd)
    q, k_t = q.reshape(b, s * h, hd), k.transpose(1, 2)
    if bias is None and s == 1:  # one query at the end sees every key: no mask
        scores = torch.bmm(q, k_t) if scale == 1 else torch.bmm(q, k_t).mul_(scale)
    else:
        if bias is None:
            bias = _causal_bias(s, t, start, h, q.dtype, q.device).expand(b, -1, -1)
        scores = torch.baddbmm(bias, q, k_t, alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), v).view(b, s, h * hd)  # [b, s*h, t] @ [b, t, hd]


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the permuted K/V gradient would
    otherwise reach megatron's in-place gloo all-reduce non-contiguous (silently wrong sums)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class Attention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: Any):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q = parallel.column_linear(mcfg, cfg.d_model, cfg.n_heads * cfg.head_dim)
        self.kv = parallel.replicated_linear(mcfg, cfg.d_model, 2 * cfg.head_dim)
        self.out = parallel.row_linear(mcfg, cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, h: torch.Tensor, rope: RotaryEmbedding, layer: int,
                cache: KVCache | None = None) -> torch.Tensor:
        b, s, _ = h.shape  # h: [b, s, d], already normed
        q, _ = self.q(h)  # [b, s, heads_local * hd] (column-parallel: this rank's heads)
        kv = self.kv(h)  # [b, s, 2*hd]
        if torch.is_grad_enabled():  # (both are identities forward: skipped when decoding)
            # the single K/V head is whole on every rank; backward all-reduces its gradient over TP
            kv = ContiguousGrad.apply(copy_to_tensor_model_parallel_region(kv))
        k, v = kv.chunk(2, dim=-1)  # [b, s, hd] each
        start = cache.length if cache is not None else 0
        q = rope(q.view(b, s, -1, self.head_dim), start, cache)  # [b, s, heads_local, hd]
        k = rope(k.unsqueeze(2), start, cache).squeeze(2)
        bias = None
        if cache is not None:
            cache.k[layer][:, start:start + s] = k
            cache.v[layer][:, start:start + s] = v
            k, v = cache.k[layer][:, :start + s], cache.v[layer][:, :start + s]
            bias = cache.bias(start, s, q.shape[2])
        o = mqa_attention(q, k, v, start, bias)  # [b, s, heads_local * hd]
        out, _ = self.out(o)  # [b, s, d] (row-parallel: all-reduced over TP)
        return out


# --- SwiGLU MLP (Shazeer 2020; PaLM §2) ----------------------------------------------------------

class SwiGLU(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: Any):
        super().__init__()
        self.gate = parallel.column_linear(mcfg, cfg.d_model, cfg.ffn_dim)
        self.up = parallel.column_linear(mcfg, cfg.d_model, cfg.ffn_dim)
        self.down = parallel.row_linear(mcfg, cfg.ffn_dim, cfg.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, s, d]
        gate, _ = self.gate(h)  # [b, s, ffn_local]
        up, _ = self.up(h)
        out, _ = self.down(F.silu(gate) * up)
        return out


# --- The parallel block (PaLM §2 "Parallel Layers"): x + attn(ln(x)) + mlp(ln(x)) --------------

class ParallelBlock(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mcfg: Any, layer: int):
        super().__init__()
        self.layer = layer  # global index, used for the KV cache
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps, mcfg.params_dtype)
        self.attn = Attention(cfg, mcfg)
        self.mlp = SwiGLU(cfg, mcfg)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | None = None):
        h = self.norm(x)  # [b, s, d]
        return x + self.attn(h, rope, self.layer, cache) + self.mlp(h)


LOSS_CHUNK_TOKENS = 512  # CPU: tokens per output-layer tile (see PaLM.token_nll)


class TileNLL(torch.autograd.Function):
    """``-log p(label)`` and ``log Z`` of a tile of tokens from its output-layer input: ``h [n, d]``
    (normed, scaled), the (tied) output weight ``[V_local, d]``, ``labels [n]`` -> ``([n], [n])``
    fp32, over the full vocabulary (TP: across the shards, :func:`parallel.vocab_logsumexp`).
    Optionally also the entropy ``H = -sum p log p`` of each token's distribution ``[n]`` (PPO's
    bonus and metric), and only over the first ``vocab`` columns (the rest: the padding rows of
    the embedding, given probability exactly 0, as generation never draws them).

    Forward turns the tile's logits into softmax probabilities in place and keeps only those;
    backward scales them in place into the logits' gradient, ``p * (g_nll + g_logz)`` minus
    ``g_nll`` at each label, and does the two GEMMs. Autograd through logsumexp and gather would
    make five more passes over the ``[n, V]`` tile (exp again, the broadcast multiply, a zero
    tile, the scatter and the sum of the two) and keep the logits instead. Measured by
    ``benchmarks/output_layer.py``: the default fp32 training step 1.09x faster (0.69 vs 0.76 s,
    2-core AVX2 CPU), the same loss bit for bit. With the entropy it keeps the log-probabilities
    too, and the gradient gains ``-g_H * p * (log p + H)``. Measured in the iteration of
    ``benchmarks/ppo_throughput.py`` (16 x 64 response tokens, 2-core AVX2 CPU, median of 3),
    against autograd through the same formulas over every position: the actor's step 1.09 ->
    0.74 s, with PPO's log-probs made at the response positions only.
    """

    @staticmethod
    def values(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int | None = None):
        """``(logits, nll, logz)`` of a tile, fp32: ``h [..., d]`` -> ``[..., V_local]``, ``[...]``, ``[...]``."""
        logits = F.linear(h, weight).float()
        if vocab is not None and vocab < logits.shape[-1] * parallel.tp_size():  # padding rows to hide
            cols = parallel.vocab_columns(logits.shape[-1], logits.device)
            logits.masked_fill_(cols >= vocab, -1e9)  # exp() is exactly 0 there; never -inf * 0
        logz = parallel.vocab_logsumexp(logits)
        return logits, logz - parallel.vocab_pick(logits, labels), logz

    @staticmethod
    def entropy(logp: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``-sum p log p`` over the full vocabulary from this shard's ``[..., V_local]`` -> ``[...]``."""
        return parallel.vocab_sum(-(probs * logp).sum(-1))

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int | None = None,
                entropy: bool = False, entropy_grad: bool = True):
        logits, nll, logz = TileNLL.values(h, weight, labels, vocab)  # [n, V_local], [n], [n]
        ctx.entropy = entropy and entropy_grad
        if not entropy:
            probs = logits.sub_(logz.unsqueeze(-1)).exp_()  # softmax over the full vocabulary, this shard
            ctx.save_for_backward(h, weight, labels, probs)
            return nll, logz
        logp = logits.sub_(logz.unsqueeze(-1))
        probs = logp.exp()
        ent = TileNLL.entropy(logp, probs)
        if not entropy_grad:  # a metric only: backward as without it (no log-probs kept)
            ctx.mark_non_differentiable(ent)
            ctx.save_for_backward(h, weight, labels, probs)
            return nll, logz, ent
        ctx.save_for_backward(h, weight, labels, probs, logp, ent)
        return nll, logz, ent

    @staticmethod
    def backward(ctx, g_nll: torch.Tensor, g_logz: torch.Tensor, g_ent: torch.Tensor | None = None):
        h, weight, labels, probs, *kept = ctx.saved_tensors
        coef = (g_nll + g_logz).unsqueeze(-1)
        if ctx.entropy:  # dH/dz = -p (log p + H); in place: a graph is backpropagated once
            logp, ent = kept
            grad = logp.add_(ent.unsqueeze(-1)).mul_(-g_ent.unsqueeze(-1)).add_(coef).mul_(probs)
        else:
            grad = probs.mul_(coef)
        local, mine = parallel.vocab_local(labels, grad.shape[-1])
        grad.scatter_add_(-1, local.unsqueeze(-1), (-g_nll * mine).unsqueeze(-1))
        grad = grad.to(h.dtype)
        return grad @ weight, grad.t() @ h, None, None, None, None


# --- The model (or one pipeline stage of it) -----------------------------------------------------

class PaLM(MegatronModule):
    """PaLM, or the part of it one pipeline stage holds.

    ``layers`` are the global indices of this stage's blocks (``None``: all). The first stage
    (``pre_process``) holds the token embedding; the last (``post_process``) the final norm and the
    output projection, which is the same embedding matrix (tied): a separate copy marked
    ``.shared`` when the two ends live on different pipeline stages (:func:`parallel.tie_output`).
    """

    def __init__(self, cfg: ModelConfig, mcfg: Any = None, *, pre_process: bool = True,
                 post_process: bool = True, layers: Iterable[int] | None = None, seed: int = 0):
        mcfg = mcfg if mcfg is not None else parallel.megatron_config(cfg)
        super().__init__(config=mcfg)
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = True
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.input_tensor: torch.Tensor | None = None
        layers = list(range(cfg.n_layers)) if layers is None else list(layers)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_base)
        # Every weight is drawn from its own seed, so any TP/PP split starts from the same full model.
        if pre_process:
            torch.manual_seed(parallel.init_seed(seed, "embedding"))
            self.embedding = parallel.vocab_embedding(mcfg, cfg.padded_vocab_size, cfg.d_model)
        self.layers = torch.nn.ModuleDict()
        for i in layers:
            torch.manual_seed(parallel.init_seed(seed, f"layer{i}"))
            self.layers[str(i)] = ParallelBlock(cfg, mcfg, i)
        if post_process:
            self.final_norm = LayerNorm(cfg.d_model, cfg.norm_eps, mcfg.params_dtype)
            if not pre_process:
                torch.manual_seed(parallel.init_seed(seed, "embedding"))
                self.output_embedding = parallel.tie_output(mcfg, cfg.padded_vocab_size, cfg.d_model)

    # megatron's schedules and finalize_model_grads call these two
    def set_input_tensor(self, input_tensor: Any) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter:
        return self.embedding.weight if self.pre_process else self.output_embedding.weight

    def trunk(self, tokens: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """Embedding (first stage) and this stage's blocks: ``[b, s]`` tokens -> ``[b, s, d]``.

        Activations are batch-first; between pipeline stages they travel as megatron's
        ``[s, b, d]`` (the shape its p2p buffers are allocated with).
        """
        if self.pre_process:
            x = self.embedding(tokens)  # [b, s, d]
        else:
            x = self.input_tensor.transpose(0, 1)  # [s, b, d] from the previous stage -> [b, s, d]
        for block in self.layers.values():
            x = block(x, self.rope, cache)
        if cache is not None:
            cache.length += x.shape[1]  # after all blocks: every layer wrote the same positions
        return x

    def output_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the tied output projection multiplies: final norm, scaled (PaLM §2: scaling by
        1/sqrt(d) rather than the vocabulary columns); under autograd TP backward sums the
        vocabulary shards' gradients over the ranks."""
        h = self.final_norm(x) * (self.cfg.d_model ** -0.5)
        return copy_to_tensor_model_parallel_region(h) if torch.is_grad_enabled() else h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and tied output projection: ``[b, s, d]`` -> ``[b, s, vocab_local]``."""
        linear = F.linear if torch.is_grad_enabled() else parallel.plain_linear
        return linear(self.output_input(x), self.shared_embedding_or_output_weight())

    def token_nll(self, x: torch.Tensor, labels: torch.Tensor, *, vocab: int | None = None,
                  entropy: bool = False, entropy_grad: bool = True) -> tuple[torch.Tensor, ...]:
        """Per-token ``-log p(label)`` and ``log Z`` (fp32) from hidden states: ``[b, s, d]``,
        ``[b, s]`` -> ``([b, s], [b, s])``. ``log p = logit[label] - log Z`` over the full
        vocabulary (TP: across the shards), so both come from one softmax pass (:class:`TileNLL`).
        ``vocab``: only the first ``vocab`` columns (None: all, the embedding's padding rows
        included, as pretraining learns them); ``entropy``: a third output, each distribution's
        entropy ``[b, s]``, differentiable unless ``entropy_grad=False`` (a metric: backward then
        costs what it does without the entropy).

        On CPU the logits are made and consumed ~512 tokens at a time: a ``[512, vocab]`` tile
        stays in cache between the GEMM, the fp32 cast and the softmax (measured: the whole bf16
        training step 10 % faster at vocab 8192; fp32 unchanged within noise).
        """
        per = x.shape[0] if x.is_cuda else max(1, LOSS_CHUNK_TOKENS // x.shape[1])
        weight = self.shared_embedding_or_output_weight()
        outs = []
        for xc, lc in zip(x.split(per), labels.split(per)):
            b, s, d = xc.shape
            if torch.is_grad_enabled():
                out = TileNLL.apply(self.output_input(xc).reshape(b * s, d), weight, lc.reshape(-1), vocab, entropy,
                                    entropy_grad)
                outs.append([o.view(b, s) for o in out])
            else:  # no backward: no softmax tile to keep
                logits, n, lz = TileNLL.values(self.output_input(xc), weight, lc, vocab)
                outs.append([n, lz] + ([TileNLL.entropy(logits.sub_(lz.unsqueeze(-1)), logits.exp())]
                                       if entropy else []))
        return tuple(torch.cat(parts) for parts in zip(*outs))

    def forward(self, tokens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> Any:
        """First stage takes ``tokens [b, s]``; later stages read :meth:`set_input_tensor`.

        Returns, on the last stage, ``(nll, logz)`` (each ``[b, s]`` fp32, see :meth:`token_nll`)
        if ``labels`` are given, else the logits ``[b, s, vocab_local]`` (this rank's vocabulary
        shard); on other stages the activations ``[s, b, d]`` for the next stage.
        """
        x = self.trunk(tokens, cache)
        if not self.post_process:
            return x.transpose(0, 1).contiguous()  # [s, b, d] for megatron's p2p
        if labels is not None:
            return self.token_nll(x, labels)
        return self.logits(x)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[b, s, d]`` (full width on every TP rank), for scalar heads."""
        assert self.pre_process and self.post_process, "hidden_states needs the whole model"
        return self.final_norm(self.trunk(tokens))

    def new_cache(self, batch: int, max_len: int | None = None,
                  pad: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len`` positions (default:
        ``seq_len``); ``pad [b]``: left-padding tokens per row; ``dtype``: the weights' unless
        given (a :class:`Decoder` computing in another). Sampling loops live in
        :mod:`palm.generate`."""
        max_len = max_len or self.cfg.seq_len
        check(max_len <= self.cfg.seq_len, "model.seq_len",
              f"a KV cache of {max_len} positions exceeds model.seq_len={self.cfg.seq_len}")
        w = self.layers[next(iter(self.layers))].attn.kv.weight
        return KVCache([int(i) for i in self.layers], batch, max_len, self.cfg.head_dim, dtype or w.dtype,
                       w.device, self.rope, pad)


# --- Decoding: the parallel block with its matmuls fused (PaLM §2 "Parallel Layers") -------------

_PLANS: dict[tuple, parallel.DecodePlan] = {}  # Decoder.plan's measurements, per process
PLAN_MARGIN = 0.1  # Decoder.plan: plans within this fraction of the fastest tie; the first of them wins
PLAN_KEEP_BYTES = 1 << 30  # Decoder.plan: candidates' weight copies kept between rounds up to this


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
    made once per batch) instead of seven for each. Measured with
    ``benchmarks/generate_throughput.py`` (2-core CPU with native bf16, 256 new tokens, the same
    greedy tokens): against palm-rlhf-pytorch's ``generate``, 7.0x -> 9.1-9.9x at batch 1 and
    38.9x -> 51.5-55.6x for 16 prompts, about 1.35x the tokens/s of the unfused path.

    How the few rows of a step meet the weights, in which dtype and layout, is measured per CPU
    (:meth:`plan`): e.g. with AMX a bf16 model decodes one prompt faster from an fp32 copy of its
    weights; on an AMD EPYC one prompt decodes fastest through numpy's BLAS (call the decoder
    inside ``parallel.decode_threads(plan)``, as :func:`palm.generate.generate` does: the same
    numbers outside, far slower). The returned logits are then fp32 computed from the
    model's bf16 weights (closer to the exact function than the bf16 pass, not bit-equal to it).

    For fp32 on CPU, a one-token step's work between a block's two matmuls (RoPE, the cache
    write, attention, SwiGLU's product: a dozen small torch calls) is one call of a C kernel
    (:class:`palm.native.DecodeMix`, compiled at first use) that reads each row's cached keys and
    values once for all its heads and allocates nothing; :meth:`_mix` is the same in torch ops,
    for the prompt pass, other dtypes and devices, and a machine without a C compiler
    (``tests/test_native.py`` holds the two together). Measured in one process on a 2-core EPYC,
    interleaved, 8 pairs of 256-token generations, the same tokens: 1.19x at 16 prompts (3,646
    -> 4,330 tok/s) and 1.37x at one (541 -> 743).

    A snapshot: the stacked weights are copies (the blocks' weights once more in memory while it
    lives), so make a new one after the weights change (:func:`palm.generate.generate` makes one
    per call). Needs the whole model (no pipeline stages).
    """

    def __init__(self, model: "PaLM", cache: KVCache, plan: parallel.DecodePlan | None = None):
        assert model.pre_process and model.post_process, "the decoder needs the whole model"
        self.model, self.cache = model, cache
        self.eps, self.d = model.cfg.norm_eps, model.cfg.d_model
        self.head_dim = model.cfg.head_dim
        plan = plan or parallel.DecodePlan(model.final_norm.weight.dtype)
        self.dtype = plan.dtype  # the cache's too (made with new_cache(..., dtype=plan.dtype))
        k = next(iter(cache.k.values()))  # [b, max_len, hd]: the first layer's keys
        assert k.dtype == self.dtype, "the cache must be made in the plan's dtype"
        held = lambda w: parallel.DecodeWeight(w, plan.layout, rows=k.shape[0])  # noqa: E731
        self.blocks = []
        with torch.no_grad():
            for block in model.layers.values():
                attn, mlp = block.attn, block.mlp
                w_in = torch.cat([attn.q.weight, attn.kv.weight, mlp.gate.weight, mlp.up.weight]).float()
                w_in[:attn.q.weight.shape[0]] *= self.head_dim ** -0.5  # the scores' 1/sqrt(hd) on the
                # query rows (RoPE is linear: it commutes)
                w_in = (w_in * block.norm.weight.float()).to(self.dtype)  # one rounding in bf16
                w_out = torch.cat([attn.out.weight, mlp.down.weight], dim=1).to(self.dtype)
                heads = attn.q.weight.shape[0] // self.head_dim  # this rank's query heads
                self.blocks.append((block.layer, heads, held(w_in), held(w_out)))
            self.final_norm = (model.final_norm.weight.float() * self.d ** -0.5).to(self.dtype)
            self.output = held(model.shared_embedding_or_output_weight().to(self.dtype))
            self.cos, self.sin = model.rope.rolled_tables(cache)  # [b or 1, max_len, 1, hd]
            # a one-token step's work between w_in and w_out in one native call (fp32 on CPU;
            # None elsewhere or without a C compiler: the torch ops below, the same function)
            self.mix = None
            if self.dtype == torch.float32:
                ffn = next(iter(model.layers.values())).mlp.gate.weight.shape[0]  # this rank's SwiGLU width
                self.mix = native.DecodeMix.make(cache.k, cache.v, self.cos, self.sin, cache.key_bias,
                                                 self.blocks[0][1], ffn)

    @staticmethod
    def plan(model: "PaLM", batch: int, length: int) -> parallel.DecodePlan:
        """The fastest way to decode ``batch`` rows up to ``length`` positions with ``model`` on
        this CPU, measured once per process, model shape and size class (rows and length rounded
        up to a power of two; about 0.5-1.1 s at the default size on 2 cores): each candidate (the
        model's dtype or an fp32 copy of the weights, times each weight layout of
        :data:`parallel.LAYOUTS`: MKL from the weights or from their stored transposes, oneDNN
        from weights packed once, numpy's BLAS) decodes a dummy batch at half that length, the
        candidates taking turns in an untimed round, then five rounds of a warm-up and two timed
        steps (a shared host's speed drifts within a second: with one block of steps per
        candidate, 6 measurements in two processes on an EPYC picked three different layouts
        for one prompt); the first candidate whose best step time is within ``PLAN_MARGIN`` of
        the fastest one's wins, the model's own plan (its dtype, weight-major) first. A layout
        this CPU has no kernels for is skipped. On GPU: the model's dtype.

        Why measure: a decoding step reads every weight once for a few rows, so its speed is set
        by memory, by the kernels' fixed costs and by attention over the cache, all of which differ
        between CPUs, BLAS libraries, dtypes and lengths. Measured at the default size (d=256, 4
        layers, vocab 8192), generations of 256 tokens, the same greedy tokens from every plan:
        an fp32 model, 16 prompts: the stored transpose 1.12-1.16x faster with AVX-512 kernels,
        0.96x (slower) with MKL held to AVX2; a bf16 model on a CPU with AMX: one prompt 1.56x
        faster from an fp32 copy (0.33 vs 0.51 s), 16 prompts x 64 tokens fastest in bf16; on a
        2-core AMD EPYC (Zen 3, AVX2 only; interleaved, medians of 5; tok/s): one prompt 196
        weight-major, 269 transposed, 252 packed, 320 numpy's BLAS (MKL's one-row GEMMs are slow
        on AMD; OpenBLAS streams the weights at twice MKL's speed there); 16 prompts 1,498
        weight-major, 1,267 transposed, 1,918 packed (a BLAS GEMM repacks its operands at every
        call; oneDNN's weights are packed once per decoder), 1,802 numpy's BLAS."""
        dtype = model.final_norm.weight.dtype
        if model.final_norm.weight.is_cuda:
            return parallel.DecodePlan(dtype)
        rows = 1 if batch == 1 else min(parallel.FEW_ROWS, 1 << (batch - 1).bit_length())
        length = min(model.cfg.seq_len, 1 << (max(length, 2) - 1).bit_length())
        key = (repr(model.cfg), tuple(model.layers), dtype, rows, length, parallel.tp_size())
        if key not in _PLANS:
            _PLANS[key] = parallel.tp_agree(Decoder._fastest(model, dtype, rows, length))  # TP: rank 0's
        return _PLANS[key]

    @staticmethod
    @torch.inference_mode()  # as generate() decodes
    def _fastest(model: "PaLM", dtype: torch.dtype, rows: int, length: int, steps: int = 2,
                 rounds: int = 5) -> parallel.DecodePlan:
        candidates = [parallel.DecodePlan(dt, layout) for dt in dict.fromkeys((dtype, torch.float32))
                      for layout in parallel.LAYOUTS if layout != "openblas" or dt == torch.float32]
        tokens = torch.ones(rows, 1, dtype=torch.long, device=model.final_norm.weight.device)
        if model.cfg.seq_len < 2 * (steps + 1):  # no room for the untimed round and one timed
            return candidates[0]
        rounds = min(rounds, model.cfg.seq_len // (steps + 1) - 1)  # the untimed round, then these
        size = (rounds + 1) * (steps + 1)  # positions the rounds fill
        start = max(0, min(length // 2, length - size))  # mid-way: attention over half the cache
        # the decoders live through every round where their weight copies fit PLAN_KEEP_BYTES
        keep = len(candidates) * 4 * sum(p.numel() for p in model.parameters()) <= PLAN_KEEP_BYTES
        kept: dict[parallel.DecodePlan, Decoder] = {}
        best = {c: math.inf for c in candidates}
        # rounds of a few steps of each candidate in turn, a warm-up step first (its threads may
        # have slept): a shared host's speed drifts within a second, so every candidate gets
        # several chances at a quiet moment, and the best step of each is compared. Without the
        # untimed first round numpy's BLAS lost one prompt to MKL in the first measurement of
        # each of 2 processes on an EPYC (its pools' first calls); with it, it won all 8
        # measurements in 4 processes
        for r in range(rounds + 1):  # round 0 untimed: first calls (thread pools, kernels' JIT)
            for c in list(best):
                decoder = kept.get(c)
                if decoder is None:
                    try:
                        decoder = Decoder(model, model.new_cache(rows, start + size, dtype=c.dtype), c)
                    except RuntimeError:  # no kernels for it on this CPU (oneDNN's bf16 needs AVX-512)
                        del best[c]
                        continue
                    decoder.cache.length = start  # zeros as keys: the same work as real ones
                    if keep:
                        kept[c] = decoder
                with parallel.decode_threads(c):
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
    def _settle(best: dict[parallel.DecodePlan, float]) -> parallel.DecodePlan:
        """The first plan of ``best`` (plan -> step time, the model's own plan first) within
        ``PLAN_MARGIN`` of the fastest: near-ties would let the timing noise of each run pick
        the plan, and the rounding with it (a run's numbers must repeat), between the model's
        own plan and another as between two others (oneDNN's packed weights and numpy's BLAS
        decode 16 prompts within 6 % of each other on an EPYC)."""
        fastest = min(best.values())
        return next(c for c, t in best.items() if (1 - PLAN_MARGIN) * t <= fastest)

    def _mix(self, y: torch.Tensor, layer: int, heads: int, start: int, cos: torch.Tensor,
             sin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A block's work between its two matmuls in torch ops: ``y`` (the fused input projection)
        -> ``[b, s, heads*hd + ffn_local]``, the attention output then ``silu(gate) * up``, with
        RoPE and the cache write on the way. What :mod:`palm.native`'s kernel computes for a
        one-token step (its reference and its fallback)."""
        cache, hd, s = self.cache, self.head_dim, y.shape[1]
        qk = RotaryEmbedding.rolled(y[..., :(heads + 1) * hd].unflatten(-1, (heads + 1, hd)), cos, sin)
        cache.k[layer][:, start:start + s] = qk[:, :, heads]  # [b, s, hd]: the shared key head
        cache.v[layer][:, start:start + s] = y[..., (heads + 1) * hd:(heads + 2) * hd]
        o = mqa_attention(qk[:, :, :heads], cache.k[layer][:, :start + s], cache.v[layer][:, :start + s],
                          start, bias, scale=1.0)  # [b, s, heads * hd]: q came scaled
        gate, up = y[..., (heads + 2) * hd:].chunk(2, dim=-1)  # [b, s, ffn_local] each
        return torch.cat([o, F.silu(gate) * up], dim=-1)

    @torch.inference_mode()  # no autograd bookkeeping (see palm.generate.generate): logits are inference tensors
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
