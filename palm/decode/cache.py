"""The KV cache of batched decoding: keys and values of every layer, and the per-row RoPE tables
and key mask of a left-padded batch. The model's attention fills it (:mod:`palm.model.network`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from palm.core.config import check

if TYPE_CHECKING:
    from palm.model.network import PaLM, RotaryEmbedding


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
        self.length, self.max_len, self.rope = 0, max_len, rope
        self.cos = self.sin = self.key_bias = self.real = None
        self._bias: dict[tuple, torch.Tensor] = {}
        self._starts: tuple[torch.Tensor, ...] | None = None  # starts_table(), made on first use
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

    def set_starts(self, rows: torch.Tensor, pad: torch.Tensor) -> None:
        """Make each of ``rows [m]`` start (its RoPE position 0) at column ``pad [m]``, in place:
        continuous batching (:mod:`palm.decode.batcher`) places a joining prompt and moves rows.
        Needs the per-row tables (a cache made with some ``pad > 0``)."""
        assert self.key_bias is not None, "a cache without per-row tables (made with pad=None)"
        ext = self.starts_table()
        for r, q in zip(rows.tolist(), pad.tolist()):  # a row's tables are a window of the table: copies
            window = slice(self.max_len - q, 2 * self.max_len - q)
            self.cos[r], self.sin[r], self.real[r], self.key_bias[r, 0] = (t[window] for t in ext)
        self._bias = {}

    def starts_table(self) -> tuple[torch.Tensor, ...]:
        """cos, sin ``[2 max_len, 1, hd/2]``, real and the key mask ``[2 max_len]`` of columns
        ``-max_len .. max_len-1`` of a row starting at column 0, made once: a row starting at
        ``pad`` is the window ``[max_len - pad, 2 max_len - pad)`` (:meth:`set_starts`)."""
        if self._starts is None:
            pos = torch.arange(-self.max_len, self.max_len, device=self.real.device)
            cos, sin = self.rope.at(pos.clamp(min=0)[None], self.cos.dtype)
            bias = torch.zeros(pos.shape, dtype=self.key_bias.dtype, device=pos.device).masked_fill(pos < 0, float("-inf"))
            self._starts = (cos[0], sin[0], pos >= 0, bias)
        return self._starts

    def head(self, n: int) -> KVCache:
        """The first ``n`` rows as a cache of their own: views of this one's tensors (contiguous),
        so what either writes the other sees; its ``length`` is its own."""
        view = KVCache.__new__(KVCache)
        view.k = {i: t[:n] for i, t in self.k.items()}
        view.v = {i: t[:n] for i, t in self.v.items()}
        view.length, view.max_len, view.rope, view._bias, view._starts = self.length, self.max_len, self.rope, {}, None
        view.cos, view.sin, view.key_bias, view.real = (None if t is None else t[:n] for t in
                                                        (self.cos, self.sin, self.key_bias, self.real))
        return view


def new_cache(model: "PaLM", batch: int, max_len: int | None = None,
          pad: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len`` positions (default:
    ``seq_len``); ``pad [b]``: left-padding tokens per row; ``dtype``: the weights' unless
    given (a :class:`Decoder` computing in another). Sampling loops live in
    :mod:`palm.decode.generate`."""
    max_len = max_len or model.cfg.seq_len
    check(max_len <= model.cfg.seq_len, "model.seq_len",
          f"a KV cache of {max_len} positions exceeds model.seq_len={model.cfg.seq_len}")
    w = model.layers[next(iter(model.layers))].attn.kv.weight
    return KVCache([int(i) for i in model.layers], batch, max_len, model.cfg.head_dim, dtype or w.dtype,
                   w.device, model.rope, pad)
