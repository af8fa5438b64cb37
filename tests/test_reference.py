"""Our PaLM against a deliberately naive one written from the paper (Chowdhery et al. 2022, §2).

The parity and KV-cache tests elsewhere compare the code with itself (TP=2 with TP=1, the cached
decode with the uncached one), so a bug shared by every path -- RoPE rotating the wrong halves,
the key and value swapped, SwiGLU gating the wrong branch, a missing 1/sqrt(d) -- passes them all.
This file recomputes the model independently: plain torch, float64, one sequence and one head at
a time, RoPE from its formula element by element, an explicit causal mask, a hand-written
LayerNorm and softmax. Nothing here imports megatron or calls the model's own layers.

The only conventions taken from ``palm/model/network.py`` (where the paper leaves a choice open):
- weights are ``[out, in]`` (``y = x @ W.T``);
- RoPE pairs dimension ``j`` with ``j + head_dim/2`` (the "rotate half" layout, as in GPT-NeoX
  and palm-rlhf-pytorch), frequency ``base ** (-2j / head_dim)``;
- ``attn.kv.weight`` is ``[2 * head_dim, d]``: rows ``[0, head_dim)`` the key, the rest the value;
  ``attn.q.weight`` rows are head-major (head ``i`` owns rows ``[i * head_dim, (i+1) * head_dim)``);
- the vocabulary is padded to a multiple of 128; the logits (and the softmax of the loss) cover
  all padded rows, generation looks only at the real ``vocab_size`` ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import redraw_weights

from palm.decode.generate import generate
from palm.model import parallel
from palm.model.network import ModelConfig, PaLM


def our_nll_and_logz(model: PaLM, tokens: torch.Tensor, labels: torch.Tensor):
    """Our per-token NLL and log Z, ``[b, s]`` each: the one place that knows the loss API."""
    return model(tokens, labels=labels)


# Small but with every dimension distinct, so a transposed or misassigned weight cannot line up by
# accident: n_heads * head_dim (24) != d_model (48) != ffn (120), vocab 300 padded to 384.
CFG = ModelConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=3, head_dim=8, ffn_mult=2.5,
                  seq_len=24)
ATOL = 1e-5  # fp32 model vs the float64 reference (absolute); observed: 4e-6 on logits up to ~4


# --- the naive reference --------------------------------------------------------------------------

def naive_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without bias (PaLM §2 "No biases"), biased variance as in the usual LayerNorm."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight


def naive_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE (Su et al. 2021) on ``x [s, head_dim]`` at positions 0..s-1, one element pair at a time:
    the pair (j, j + half) is rotated by the angle ``position * base ** (-2j / head_dim)``."""
    s, hd = x.shape
    half = hd // 2
    out = torch.empty_like(x)
    for pos in range(s):
        for j in range(half):
            angle = pos * base ** (-2.0 * j / hd)
            c, sn = math.cos(angle), math.sin(angle)
            a, b = x[pos, j], x[pos, j + half]
            out[pos, j] = a * c - b * sn
            out[pos, j + half] = a * sn + b * c
    return out


def naive_softmax(scores: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def naive_attention(h: torch.Tensor, w: dict, p: str, cfg: ModelConfig) -> torch.Tensor:
    """Multi-query attention (Shazeer 2019) for one sequence ``h [s, d]``: every query head
    attends over the same single key/value head, causally."""
    s, hd = h.shape[0], cfg.head_dim
    kv = h @ w[p + "attn.kv.weight"].T  # [s, 2 * hd]
    k = naive_rope(kv[:, :hd], cfg.rope_base)
    v = kv[:, hd:]
    q_all = h @ w[p + "attn.q.weight"].T  # [s, n_heads * hd]
    causal = torch.tensor([[0.0 if j <= i else -math.inf for j in range(s)] for i in range(s)],
                          dtype=h.dtype)
    heads = []
    for i in range(cfg.n_heads):
        q = naive_rope(q_all[:, i * hd:(i + 1) * hd], cfg.rope_base)  # [s, hd]
        scores = q @ k.T / math.sqrt(hd) + causal  # [s, s]
        heads.append(naive_softmax(scores) @ v)  # [s, hd]
    return torch.cat(heads, dim=-1) @ w[p + "attn.out.weight"].T  # [s, d]


def naive_swiglu(h: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    """SwiGLU (Shazeer 2020): down(silu(gate(h)) * up(h)), silu(x) = x * sigmoid(x)."""
    gate = h @ w[p + "mlp.gate.weight"].T
    up = h @ w[p + "mlp.up.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down.weight"].T


def naive_logits(tokens: torch.Tensor, w: dict, cfg: ModelConfig) -> torch.Tensor:
    """``tokens [b, s]`` -> logits ``[b, s, padded_vocab]``, one sequence at a time."""
    emb = w["embedding.weight"]  # [padded_vocab, d]; also the output projection (tied)
    out = []
    for seq in tokens:
        x = emb[seq]  # [s, d]
        for layer in range(cfg.n_layers):
            p = f"layers.{layer}."
            h = naive_layer_norm(x, w[p + "norm.weight"], cfg.norm_eps)  # one norm feeds both
            x = x + naive_attention(h, w, p, cfg) + naive_swiglu(h, w, p)  # the parallel block
        h = naive_layer_norm(x, w["final_norm.weight"], cfg.norm_eps)
        out.append(h @ emb.T / math.sqrt(cfg.d_model))  # PaLM §2: logits scaled by d ** -0.5
    return torch.stack(out)


def naive_nll_and_logz(logits: torch.Tensor, labels: torch.Tensor):
    """Per-token cross entropy and log Z over the whole (padded) vocabulary."""
    m = logits.max(dim=-1, keepdim=True).values
    logz = (m + torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True))).squeeze(-1)
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return logz - picked, logz


def naive_greedy(prompt: torch.Tensor, new_tokens: int, w: dict, cfg: ModelConfig):
    """Greedy continuation recomputing the whole sequence each step (no cache). Also returns the
    smallest top-1/top-2 logit gap seen, so a near tie (where float noise could pick either
    token) shows up as a broken premise rather than a mismatch."""
    tokens, min_gap = prompt.clone(), math.inf
    for _ in range(new_tokens):
        last = naive_logits(tokens, w, cfg)[:, -1, : cfg.vocab_size]  # real vocabulary only
        top2 = last.topk(2, dim=-1).values
        min_gap = min(min_gap, float((top2[:, 0] - top2[:, 1]).min()))
        tokens = torch.cat([tokens, last.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens, min_gap


# --- fixtures ---------------------------------------------------------------------------------

EXPECTED_NAMES = {"embedding.weight", "final_norm.weight"} | {
    f"layers.{i}.{n}" for i in range(CFG.n_layers)
    for n in ("norm.weight", "attn.q.weight", "attn.kv.weight", "attn.out.weight",
              "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")}


@pytest.fixture(scope="module")
def groups():
    parallel.init_distributed()
    yield
    parallel.teardown()


@pytest.fixture(scope="module")
def models(groups):
    """Our model with weights redrawn so every part matters (see ``redraw_weights``), and those
    weights as float64 for the reference."""
    model = PaLM(CFG).eval()
    # a parameter the reference does not know about (a bias, a new norm) must fail the test
    assert set(dict(model.named_parameters())) == EXPECTED_NAMES
    redraw_weights(model)
    weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    return model, weights


# --- tests ------------------------------------------------------------------------------------

def test_logits_and_loss_equal_the_naive_reference(models):
    model, w = models
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=g)
    labels = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=g)
    with torch.no_grad():
        ours = model(tokens)
        nll, logz = our_nll_and_logz(model, tokens, labels)
    want = naive_logits(tokens, w, CFG)
    want_nll, want_logz = naive_nll_and_logz(want, labels)
    assert ours.shape == (2, CFG.seq_len, CFG.padded_vocab_size) and ours.dtype == torch.float32
    assert want.abs().max() > 1.0  # the logits are not trivially small (the tolerance means something)
    diff = (ours.double() - want).abs().max().item()
    assert diff <= ATOL, f"logits differ from the naive reference by {diff:.3g}"
    for name, got, ref in (("nll", nll, want_nll), ("logz", logz, want_logz)):
        assert got.shape == (2, CFG.seq_len), name
        d = (got.double() - ref).abs().max().item()
        assert d <= ATOL, f"per-token {name} differs from the naive reference by {d:.3g}"


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_the_naive_reference(models, use_cache):
    """The KV-cache decode (and the uncached one) of a left-padded batch of prompts of different
    lengths continue each prompt exactly as the naive model does that prompt alone, recomputing
    everything from scratch each step: an independent check of the cache path (positions of the
    cached keys, RoPE offsets, the causal mask at an offset) and of the padding (per-row RoPE
    positions, padded keys never attended)."""
    model, w = models
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (5, 2, 4)]
    new = 7
    got = generate(model, prompts, new, use_cache=use_cache)
    assert got.tokens.shape == (3, 5 + new) and got.response_mask.all()
    for r, p in enumerate(prompts):
        want, min_gap = naive_greedy(p[None], new, w, CFG)
        assert min_gap > 1e-3, f"near tie in the reference (gap {min_gap:.2g}): choose another seed"
        # premise: the continuation is not just the last token repeated (then attention hardly matters)
        assert len(set(want[0, len(p):].tolist())) > 2, want
        assert torch.equal(got.tokens[r, got.pad[r]:], want[0]), \
            f"row {r}: ours {got.tokens[r].tolist()}\nnaive {want[0].tolist()}"
