"""PaLM as exported by palm-rlhf (``palm export hf``): the transformers configuration.

Shipped inside every exported folder beside ``modeling_palm.py``; needs transformers 5.x.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class PalmConfig(PreTrainedConfig):
    """The architecture of palm-rlhf's PaLM (its ``model`` section, renamed to transformers'
    usual field names), the special token ids, and the project's own ``config.json``
    (``palm_export``), kept so that ``palm import hf`` gives the original export back."""

    model_type = "palm_rlhf"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 8192  # tokenizer vocabulary: the logits have this many columns
    padded_vocab_size: int = 8192  # embedding rows (vocab_size rounded up to 128; the rest is never predicted)
    hidden_size: int = 256  # residual width d
    intermediate_size: int = 1024  # SwiGLU hidden width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 1  # multi-query attention: one key/value head shared by all query heads
    head_dim: int = 64
    max_position_embeddings: int = 256  # the context the model was trained with
    rope_theta: float = 10000.0  # RoPE frequency base
    layer_norm_eps: float = 1e-5  # LayerNorm (weight, no bias) epsilon
    initializer_range: float = 0.02  # std of projection weights when initialised (the embedding: N(0, 1))
    tie_word_embeddings: bool = True  # the output projection is the embedding matrix
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    palm_export: dict[str, Any] | None = None  # palm-rlhf's config.json of the exported model

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads != 1:
            raise ValueError(f"PaLM uses multi-query attention (one key/value head), got num_key_value_heads="
                             f"{self.num_key_value_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        super().__post_init__(**kwargs)


__all__ = ["PalmConfig"]
