"""PaLM as exported by palm-rlhf (``palm export hf``), in plain PyTorch for transformers.

The same computation as the project's model (``palm/model/network.py``, PaLM §2), op for op:

    x = embed(tokens)                                         # [b, s, d], no scaling
    per block:  h = LayerNorm(x)                              # weight, no bias
                x = x + attention(h) + mlp(h)                 # the parallel block
    attention:  multi-query: H query heads, one key/value head; RoPE ("rotate half", fp64 angles)
                on queries and key; scores scaled by 1/sqrt(head_dim), causal
    mlp:        down(silu(gate(h)) * up(h))                   # SwiGLU
    logits:     (LayerNorm(x) / sqrt(d)) @ embedding^T        # tied, first vocab_size columns
    score:      score(LayerNorm(x)) at the last real token    # the reward model's head

Padding: each row's positions come from ``attention_mask`` (its first real token is position 0,
as in the project's batched decoding) and padded keys are never attended, so a padded row
computes what it would alone. The key/value cache is transformers' ``Cache`` (a ``DynamicCache``
unless one is passed), holding the single key/value head as ``[b, 1, t, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .configuration_palm import PalmConfig


class PalmLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (PaLM §2 "No biases")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, s, d]
        return F.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)


def rope_tables(position_ids: torch.Tensor, head_dim: int, base: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[b, s, 1, head_dim/2]`` at ``position_ids [b or 1, s]``: the angles in
    float64, then cast, as the project makes its tables (no buffer: nothing to restore when
    transformers builds the model on the meta device)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device)
                               / head_dim))
    angles = position_ids.to(torch.float64)[..., None] * inv_freq  # [b, s, hd/2]
    return (angles.cos().float()[:, :, None].to(dtype), angles.sin().float()[:, :, None].to(dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [b, s, heads, hd]``: channel ``i`` pairs with ``i + hd/2``,
    ``(x1 cos - x2 sin, x2 cos + x1 sin)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([(x1 * cos).addcmul_(x2, sin, value=-1.0), (x2 * cos).addcmul_(x1, sin)], dim=-1)


class PalmAttention(nn.Module):
    """Causal multi-query attention (Shazeer 2019): every query head shares one key/value head."""

    def __init__(self, config: PalmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_key_values: Cache | None) -> torch.Tensor:
        b, s, _ = h.shape  # h: [b, s, d], already normed
        hd = self.head_dim
        q = rotate(self.q_proj(h).view(b, s, self.num_heads, hd), cos, sin)  # [b, s, H, hd]
        k = rotate(self.k_proj(h).view(b, s, 1, hd), cos, sin)  # [b, s, 1, hd]
        v = self.v_proj(h).view(b, s, 1, hd)
        if past_key_values is not None:  # the cache holds [b, heads=1, t, hd]
            k, v = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k[:, 0], v[:, 0]  # [b, t, hd]
        else:
            k, v = k[:, :, 0], v[:, :, 0]
        # every query row of every head against the one key head: [b, s*H, hd] @ [b, hd, t]
        scores = torch.baddbmm(bias, q.reshape(b, s * self.num_heads, hd), k.transpose(1, 2), alpha=hd ** -0.5)
        o = torch.bmm(scores.softmax(dim=-1), v)  # [b, s*H, hd], rows ordered (position, head)
        return self.o_proj(o.view(b, s, self.num_heads * hd))


class PalmMLP(nn.Module):
    """SwiGLU (Shazeer 2020)."""

    def __init__(self, config: PalmConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, s, d]
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class PalmBlock(nn.Module):
    """PaLM's parallel block: ``x + attention(norm(x)) + mlp(norm(x))``, one norm for both."""

    def __init__(self, config: PalmConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = PalmLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = PalmAttention(config, layer_idx)
        self.mlp = PalmMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_key_values: Cache | None) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, cos, sin, bias, past_key_values) + self.mlp(h)


class PalmPreTrainedModel(PreTrainedModel):
    config_class = PalmConfig
    config: PalmConfig
    base_model_prefix = "model"
    _no_split_modules = ["PalmBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = False


def attention_bias(attention_mask: torch.Tensor | None, past: int, s: int, heads: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """Additive mask ``[b or 1, s*heads, past+s]`` of ``s`` queries after ``past`` cached
    positions, rows ordered (position, head). A query sees the keys up to its own position that
    ``attention_mask [b, past+s]`` marks real; a padding query sees only itself (a fully masked
    row would make NaN, which would reach the real rows through that position's values)."""
    t = past + s
    q_pos = torch.arange(past, t, device=device)[:, None]  # [s, 1]
    k_pos = torch.arange(t, device=device)  # [t]
    allowed = (k_pos <= q_pos)[None]  # [1, s, t]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != t:
            raise ValueError(f"attention_mask must be 2D [batch, {t}] (past {past} + {s} new positions), "
                             f"got shape {tuple(attention_mask.shape)}")
        allowed = allowed & (attention_mask.bool()[:, None, :] | (k_pos == q_pos))  # [b, s, t]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    return bias.repeat_interleave(heads, dim=1)


class PalmModel(PalmPreTrainedModel):
    """Embedding, blocks and final norm: ``last_hidden_state`` is the final-normed ``[b, s, d]``."""

    def __init__(self, config: PalmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PalmBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = PalmLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [b, s, d]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        s = x.shape[1]
        if position_ids is None:
            if attention_mask is not None:  # each row's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=x.device)[None]
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        bias = attention_bias(attention_mask, past, s, self.config.num_attention_heads, x.dtype, x.device)
        for block in self.layers:
            x = block(x, cos, sin, bias, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       past_key_values=past_key_values if use_cache else None)


class PalmHead(PalmPreTrainedModel):
    """A head on ``self.model`` (a :class:`PalmModel`): its embedding is the model's."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value


class PalmForCausalLM(PalmHead, GenerationMixin):
    """The language model: logits over the tokenizer's ``vocab_size`` tokens."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PalmConfig):
        super().__init__(config)
        self.model = PalmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # PaLM §2: the tied output layer's input is scaled by 1/sqrt(d); the embedding's padding
        # rows (beyond the tokenizer's vocabulary) are never predicted
        logits = self.lm_head(h[:, keep] * (self.config.hidden_size ** -0.5))[..., :self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class PalmForSequenceClassification(PalmHead):
    """The reward model: ``score`` (``num_labels`` = 1, no bias) on the final-normed hidden state
    of each row's last real token: the last position ``attention_mask`` marks, or without a mask
    the last token that is not ``pad_token_id`` (as transformers' sequence classifiers do); so
    left or right padding give the same scores."""

    def __init__(self, config: PalmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PalmModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> SequenceClassifierOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=bool(use_cache))
        values = self.score(out.last_hidden_state)  # [b, s, num_labels]
        b, s = values.shape[:2]
        cols = torch.arange(s, device=values.device)
        if attention_mask is not None:
            real = attention_mask[:, -s:].bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        elif b == 1:
            real = torch.ones(1, s, dtype=torch.bool, device=values.device)
        else:
            raise ValueError("a batch of several rows needs an attention_mask or a pad_token_id in the config")
        last = (cols * real).argmax(-1)  # [b]: the rightmost real position
        logits = values[torch.arange(b, device=values.device), last]  # [b, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=values, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["PalmForCausalLM", "PalmForSequenceClassification", "PalmModel", "PalmPreTrainedModel"]
