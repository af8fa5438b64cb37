"""PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", §2) on
megatron-core's tensor-parallel layers.

Reads top to bottom: config, RoPE, norm, multi-query attention (filling a KV cache when decoding
hands one in: :mod:`palm.decode.cache`),
SwiGLU MLP, the parallel block, the model (one pipeline stage of it, or all of it). Activations
are batch-first ``[b, s, h]`` (so multi-query attention needs no transposes); only between
pipeline stages do they travel as megatron's ``[s, b, h]``.

Which weights are column-/row-parallel or replicated, and how layers are split into pipeline
stages, is decided in :mod:`palm.model.parallel` (the parallel plan, and the collectives over the
vocabulary shards); this file only asks for layers. The model returns per-token quantities
(logits, or the label's negative log-likelihood and log Z); objectives (losses, masks, z-loss)
live with the training stages in :mod:`palm.train`; decoding (the KV cache, the fused decoder,
sampling) in :mod:`palm.decode`.
The same code runs TP x PP x DP on CPU (gloo) and GPU (NCCL), and in a single process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from palm.core.config import check
from palm.model import parallel


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
    autograd makes a negated half, a concatenation and two full products each way: faster alone,
    equal to within fp32 rounding; the whole training step unchanged (numbers:
    benchmarks/records/code-notes-2026-12-06.md#rotate)."""

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
    transposes (rows are already position-major): faster than CPU SDPA, in bf16 by far (numbers:
    benchmarks/records/code-notes-2026-12-06.md#mqa-attention).
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
    tile, the scatter and the sum of the two) and keep the logits instead (the training step is
    faster, the same loss bit for bit: ``benchmarks/output_layer.py``). With the entropy it keeps
    the log-probabilities too, and the gradient gains ``-g_H * p * (log p + H)``; PPO's actor
    step is faster than with autograd through the same formulas
    (``benchmarks/ppo_throughput.py``). Numbers:
    benchmarks/records/code-notes-2026-12-06.md#tile-nll.
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
        stays in cache between the GEMM, the fp32 cast and the softmax (a faster bf16 training
        step; numbers: benchmarks/records/code-notes-2026-12-06.md#token-nll).
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
                cache: KVCache | None = None, vocab: int | None = None) -> Any:
        """First stage takes ``tokens [b, s]``; later stages read :meth:`set_input_tensor`.

        Returns, on the last stage, ``(nll, logz)`` (each ``[b, s]`` fp32, see :meth:`token_nll`;
        ``vocab``: over the first ``vocab`` columns only) if ``labels`` are given, else the logits
        ``[b, s, vocab_local]`` (this rank's vocabulary shard); on other stages the activations
        ``[s, b, d]`` for the next stage.
        """
        x = self.trunk(tokens, cache)
        if not self.post_process:
            return x.transpose(0, 1).contiguous()  # [s, b, d] for megatron's p2p
        if labels is not None:
            return self.token_nll(x, labels, vocab=vocab)
        return self.logits(x)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[b, s, d]`` (full width on every TP rank), for scalar heads."""
        assert self.pre_process and self.post_process, "hidden_states needs the whole model"
        return self.final_norm(self.trunk(tokens))
