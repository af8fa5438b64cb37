"""Single-process model checks against slow obvious versions (megatron groups of size 1)."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT

from palm.model import parallel
from palm.model.network import ModelConfig, PaLM

CFG = ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=2, head_dim=16, seq_len=16)
Z_LOSS = 1e-2


@pytest.fixture(scope="module")
def groups():
    parallel.init_distributed()
    yield
    parallel.teardown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_and_log_z_are_cross_entropy_and_logsumexp(groups, dtype):
    """The model's per-token NLL / log Z (one softmax pass over the vocabulary shards) against
    F.cross_entropy and torch.logsumexp of its own logits, values and gradients; and the
    pretraining objective's loss against cross entropy + z-loss, summed over the masked tokens."""
    from palm.train.pretrain import lm_forward_step

    model = PaLM(CFG, parallel.megatron_config(CFG, dtype=dtype))
    tokens = torch.randint(0, CFG.vocab_size, (3, 5))
    labels = torch.randint(0, CFG.vocab_size, (3, 5))
    mask = (torch.rand(3, 5) < 0.6).float()
    x = model.trunk(tokens).detach()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    nll, logz = model.token_nll(a, labels)
    logits = model.logits(b).float()
    want_nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 5)
    want_logz = torch.logsumexp(logits, dim=-1)
    assert nll.dtype == logz.dtype == torch.float32
    assert torch.allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logz, want_logz, rtol=1e-5, atol=1e-5)
    weight = model.shared_embedding_or_output_weight()  # the tied output weight gets its gradient too
    ((nll + Z_LOSS * logz.square()) * mask).sum().backward()
    ours, weight.grad = weight.grad.clone(), None
    ((want_nll + Z_LOSS * want_logz.square()) * mask).sum().backward()
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.grad.float(), b.grad.float(), **tol)
    assert torch.allclose(ours.float(), weight.grad.float(), **tol)

    output, loss_func = lm_forward_step(Z_LOSS)({"tokens": tokens, "labels": labels, "loss_mask": mask}, model)
    loss, count, metrics = loss_func(output)
    full = model(tokens).float()
    ce = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none").view(3, 5)
    want = ((ce + Z_LOSS * torch.logsumexp(full, -1).square()) * mask).sum()
    assert count == mask.sum() and torch.allclose(loss, want, rtol=1e-4)
    assert torch.allclose(metrics["nll"].float(), torch.stack([(ce * mask).sum(), mask.sum()]), rtol=1e-4)


@pytest.mark.parametrize("grad, entropy_grad", [(True, True), (True, False), (False, True)])
def test_log_probs_and_entropy_over_the_real_vocabulary(groups, grad, entropy_grad):
    """``token_nll(vocab=..., entropy=True)`` (PPO's log-probs and entropy, one fused pass that
    also makes the gradient) against autograd through the textbook formulas on the first
    ``vocab`` logits (the padding rows of the embedding excluded): values, and the gradients of
    the hidden states and of the tied weight under a loss that weights both outputs, 12 tokens
    (more than one tile when LOSS_CHUNK_TOKENS is small) and without autograd the same values.
    ``entropy_grad=False`` (the entropy a metric): the same values, no gradient through the
    entropy, and the log-probs' gradients unchanged."""
    from palm.model import network as palm_model

    model = PaLM(CFG)
    assert CFG.padded_vocab_size == 256 > CFG.vocab_size  # premise: 56 padding columns to exclude
    tokens = torch.randint(0, CFG.vocab_size, (3, 4))
    labels = torch.randint(0, CFG.vocab_size, (3, 4))
    wl, we = torch.randn(3, 4), torch.randn(3, 4)  # loss weights of log p and of the entropy
    x = model.trunk(tokens).detach()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    tile = palm_model.LOSS_CHUNK_TOKENS
    palm_model.LOSS_CHUNK_TOKENS = 8  # two tiles of one row (4 tokens) each, then one
    try:
        with torch.set_grad_enabled(grad):
            nll, logz, ent = model.token_nll(a, labels, vocab=CFG.vocab_size, entropy=True,
                                             entropy_grad=entropy_grad)
    finally:
        palm_model.LOSS_CHUNK_TOKENS = tile
    logits = model.logits(b).float()[..., :CFG.vocab_size]
    logp = logits.log_softmax(-1)
    want_logp = logp.gather(-1, labels[..., None]).squeeze(-1)
    want_ent = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(-nll, want_logp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    assert torch.allclose(logz, torch.logsumexp(logits, -1), atol=1e-5)
    if not grad:
        return
    weight = model.shared_embedding_or_output_weight()
    assert ent.requires_grad == entropy_grad
    if not entropy_grad:
        we = torch.zeros_like(we)  # the entropy is a constant: only the log-probs' gradient
    (-(nll * wl) + (ent * we if entropy_grad else 0)).sum().backward()
    ours, weight.grad = weight.grad.clone(), None
    (want_logp * wl + want_ent * we).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours, weight.grad, rtol=1e-4, atol=1e-6)
    assert (ours[CFG.vocab_size:] == 0).all()  # the padding rows get no gradient through the logits


def test_parameter_count_and_tied_output(groups):
    model = PaLM(CFG)
    assert sum(p.numel() for p in model.parameters()) == CFG.num_params()
    x = torch.randint(0, CFG.vocab_size, (2, 8))
    h = model.hidden_states(x)  # [b, s, d], final-normed
    logits = model(x)
    assert torch.allclose(logits, F.linear(h * CFG.d_model ** -0.5, model.embedding.weight), atol=1e-5)


def test_attention_is_causal(groups):
    model = PaLM(CFG).eval()
    x = torch.randint(0, CFG.vocab_size, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % CFG.vocab_size  # change only the future
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-6)


def test_without_autograd_the_linears_skip_megatrons_wrappers_with_the_same_result(groups):
    """Decoding runs under no_grad, where the TP linears are plain matmuls of their shards
    (megatron's autograd wrapper costs more than a one-token matmul): same logits either way."""
    model = PaLM(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        fast = model(tokens)
        out, bias = model.layers["0"].mlp.down(torch.randn(2, 9, CFG.ffn_dim))
    assert bias is None and out.shape == (2, 9, CFG.d_model)
    slow = model(tokens)
    assert slow.requires_grad and not fast.requires_grad
    assert torch.allclose(fast, slow.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="FTZ/DAZ is an x86 mode")
def test_subnormal_floats_count_as_zero_once_the_groups_exist(groups):
    """``parallel.init_distributed`` (every training, scoring and decoding process starts there)
    flushes subnormals: on x86 each operation on one costs ~100 cycles, which slowed the real
    pretrain by a fifth from step 40 on (palm/model/parallel.py ``flush_denormals``)."""
    tiny = torch.tensor([1e-39, 3e-39])  # below 2^-126: subnormal in fp32
    assert (tiny * 1.0 == 0).all()
    assert (torch.tensor([1e-37]) * 1.0).item() > 0  # normal numbers are untouched


_FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
if {keep}:
    from palm.model import parallel
    assert parallel.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm-up
    x = torch.ones(16 << 20)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    del x
before = faults()
for _ in range(8):
    x = torch.ones(16 << 20)
    del x
print(faults() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_memory_is_reused():
    """``parallel.keep_freed_memory`` (called by ``init_distributed``) keeps freed memory: a
    64 MiB block allocated, filled and freed 8 more times page-faults almost never, not 8 x
    16,384 times (by default glibc maps such a block fresh each time: every out-of-place op on a
    big activation paid ~1 us per 4 KiB page). Each case in a fresh process (the setting is
    process-wide); the control without it shows the check can fail here."""
    import subprocess
    import sys

    root = str(ROOT)
    counts = {keep: int(subprocess.run([sys.executable, "-c", _FAULTS.format(root=root, keep=keep)], check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for keep in (False, True)}
    assert counts[False] > 8 * 8000, counts  # the control: a fresh mapping of 16,384 pages each time
    assert counts[True] < 2000, counts
    # and every process that trains, scores or decodes sets it where its groups start
    wired = ("import sys; sys.path.insert(0, %r); from palm.model import parallel; calls = []; "
             "parallel.keep_freed_memory = lambda: calls.append(1) or True; parallel.init_distributed(); "
             "print(len(calls))" % root)
    assert subprocess.run([sys.executable, "-c", wired], check=True, capture_output=True,
                          text=True).stdout.split()[-1] == "1"
