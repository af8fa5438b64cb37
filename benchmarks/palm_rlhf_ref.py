"""``palm-rlhf-pytorch``'s ``PaLM`` (the optional benchmark extra) computing the same function as ours.

Shared by ``benchmarks/train_throughput.py`` (it trains both side by side) and
``tests/test_palm_rlhf_pytorch.py`` (it asserts equal logits), so the weight mapping exists once.

The two models are the same architecture (PaLM §2: parallel block, multi-query attention, SwiGLU,
RoPE in the rotate-half layout, bias-free LayerNorm, tied embedding) and differ in three details
that :func:`port_weights` removes:

- theirs applies xPos (Sun et al. 2022) on top of RoPE by default: turned off;
- their LayerNorm stores ``gain - 1`` (``gamma + 1`` at use): our gains minus 1;
- their tied output projection has no 1/sqrt(d) logit scale: a scaled tied head replaces it.

Their weight layout: one fused input projection ``[q | k | v | ff_x | ff_gate]`` (SwiGLU computes
``silu(gate) * x``, so our ``up`` goes before our ``gate``), ``attn_out``, ``ff_out[2]`` (down).
Their vocabulary is not padded: the first ``vocab_size`` rows of our embedding are theirs.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


class ScaledTiedLogits(torch.nn.Module):
    """``x @ E^T * scale``: the tied output projection with PaLM's 1/sqrt(d) logit scale."""

    def __init__(self, emb: torch.nn.Embedding, scale: float):
        super().__init__()
        self.emb, self.scale = emb, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.emb.weight) * self.scale


def reference_palm(cfg: Any, flash: bool = False) -> torch.nn.Module:
    """Their ``PaLM`` at the size of ``cfg`` (a ``palm.model.network.ModelConfig``), with its own init.

    Raises ``ValueError`` for settings their model cannot express (it hard-codes RoPE base 10000
    and LayerNorm eps 1e-5 and takes an integer ffn multiplier), rather than silently computing
    another function.
    """
    from palm_rlhf_pytorch import PaLM

    if cfg.rope_base != 10000.0 or cfg.norm_eps != 1e-5 or cfg.ffn_mult != int(cfg.ffn_mult):
        raise ValueError("palm-rlhf-pytorch needs rope_base=10000, norm_eps=1e-5 and an integer "
                         f"ffn_mult; got {cfg.rope_base}, {cfg.norm_eps}, {cfg.ffn_mult}")
    return PaLM(num_tokens=cfg.vocab_size, dim=cfg.d_model, depth=cfg.n_layers,
                dim_head=cfg.head_dim, heads=cfg.n_heads, ff_mult=int(cfg.ffn_mult),
                flash_attn=flash, cross_entropy_ignore_index=-100)


@torch.no_grad()
def port_weights(ref: torch.nn.Module, ours: Mapping[str, torch.Tensor], cfg: Any) -> None:
    """Make ``ref`` (from :func:`reference_palm`) compute our function from our named parameters
    (``dict(model.named_parameters())`` of the whole, single-process model)."""
    ref.token_emb.weight.copy_(ours["embedding.weight"][: cfg.vocab_size])
    for i, res in enumerate(ref.layers):
        blk, p = res.fn, f"layers.{i}."
        blk.rotary_emb.use_xpos = False
        blk.pos_emb = None  # drop a table cached before xPos was turned off
        blk.norm.gamma.copy_(ours[p + "norm.weight"] - 1)
        blk.fused_attn_ff_proj.weight.copy_(torch.cat(
            [ours[p + "attn.q.weight"], ours[p + "attn.kv.weight"],
             ours[p + "mlp.up.weight"], ours[p + "mlp.gate.weight"]]))
        blk.attn_out.weight.copy_(ours[p + "attn.out.weight"])
        blk.ff_out[2].weight.copy_(ours[p + "mlp.down.weight"])
    ref.norm.gamma.copy_(ours["final_norm.weight"] - 1)
    ref.to_logits = ScaledTiedLogits(ref.token_emb, cfg.d_model ** -0.5)
