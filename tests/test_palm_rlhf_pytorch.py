"""Our PaLM computes the same logits as ``palm-rlhf-pytorch``'s ``PaLM`` given the same weights.

A second, independently written implementation of the same architecture (the one the training
benchmark compares against); the weight mapping is ``benchmarks/palm_rlhf_ref.py``, shared with
``benchmarks/train_throughput.py``. Skipped when the optional benchmark extra
(``requirements-bench.txt``) is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, redraw_weights

from palm.model import parallel
from palm.model.network import ModelConfig, PaLM

pytest.importorskip(
    "palm_rlhf_pytorch",
    reason="palm-rlhf-pytorch not installed (optional benchmark extra: "
           "pip install -r requirements-bench.txt -c requirements.lock)")

sys.path.insert(0, str(ROOT / "benchmarks"))
from palm_rlhf_ref import port_weights, reference_palm  # noqa: E402

# Several heads and layers, n_heads * head_dim != d_model, and a vocabulary that is padded
# (300 -> 384 rows), so the mapping has to slice our embedding.
CFG = ModelConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=3, head_dim=8, ffn_mult=3.0,
                  seq_len=32)
ATOL = 1e-5  # absolute, fp32 against fp32; observed: 4.4e-6 on logits up to ~4


@pytest.fixture(scope="module")
def groups():
    parallel.init_distributed()
    yield
    parallel.teardown()


@pytest.mark.parametrize("flash", [False, True], ids=["einsum-attention", "sdpa-attention"])
def test_logits_equal_palm_rlhf_pytorch(groups, flash):
    ours = PaLM(CFG).eval()
    redraw_weights(ours)  # varied norm gains, so the gain - 1 mapping is exercised
    ref = reference_palm(CFG, flash=flash).eval()
    port_weights(ref, dict(ours.named_parameters()), CFG)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(tokens)[..., : CFG.vocab_size]  # the padded rows have no counterpart in theirs
        want = ref(tokens)
    assert want.shape == got.shape == (2, CFG.seq_len, CFG.vocab_size)
    assert want.abs().max() > 1.0  # not trivially small, so the tolerance means something
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"logits differ from palm-rlhf-pytorch by {diff:.3g}"


def test_port_refuses_what_the_reference_cannot_compute():
    """Their model hard-codes RoPE base 10000: a port would silently compute another function."""
    with pytest.raises(ValueError, match="rope_base"):
        reference_palm(ModelConfig(vocab_size=300, d_model=48, n_layers=1, n_heads=3, head_dim=8,
                                   seq_len=32, rope_base=500.0))
