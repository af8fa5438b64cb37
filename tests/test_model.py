"""Single-process model checks against slow obvious versions (megatron groups of size 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palm import parallel
from palm.model import ModelConfig, PaLM

CFG = ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=2, head_dim=16, seq_len=16, z_loss_weight=1e-2)


@pytest.fixture(scope="module")
def groups():
    parallel.init_distributed()
    yield
    parallel.teardown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_is_cross_entropy_plus_z_loss(groups, dtype):
    model = PaLM(CFG)
    logits = torch.randn(3, 5, CFG.padded_vocab_size, dtype=dtype) * 4
    labels = torch.randint(0, CFG.vocab_size, (3, 5))
    a = logits.clone().requires_grad_()
    b = logits.clone().float().requires_grad_()
    got = model.loss(a, labels)  # megatron's vocab-parallel cross entropy works in place: a stays intact
    want = F.cross_entropy(b.flatten(0, 1), labels.flatten(), reduction="none").view(3, 5) \
        + CFG.z_loss_weight * torch.logsumexp(b, dim=-1).square()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.detach(), logits)
    got.sum().backward()
    want.sum().backward()
    assert torch.allclose(a.grad.float(), b.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3 if dtype == torch.bfloat16 else 1e-6)


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
