"""The muon recipe's optimizer against independent implementations: torch.optim.Muon for the
matrices (same bf16 Newton-Schulz, same Nesterov momentum and decoupled weight decay) and torch's
fused AdamW for the rest; the warmup-stable-decay schedule's shape; one-line config errors.
Layout parity (TP/PP under Muon) is in tests/test_parallel_numerics.py."""

from __future__ import annotations

import math

import pytest
import torch

from palm.core.config import ConfigError  # noqa: E402
from palm.train.engine import OptimConfig  # noqa: E402
from palm.train.optim import MuonAdamW, orthogonalize, rms_matched  # noqa: E402


def test_orthogonalize_in_bf16_is_torchs_newton_schulz():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    for shape in ((64, 16), (16, 64), (32, 32)):
        x = torch.randn(shape, generator=g)
        ref = _zeropower_via_newtonschulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert torch.equal(orthogonalize(x, torch.bfloat16), ref), shape


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 40, 24, generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        whole = orthogonalize(stack, dtype)
        for i in range(3):
            assert torch.allclose(whole[i].float(), orthogonalize(stack[i], dtype).float(), atol=tol), dtype


def test_orthogonalize_in_fp32_flattens_the_spectrum():
    """Five quintic steps bring every singular value into about [0.7, 1.2] (Jordan 2024) from a
    condition number of 100 (they amplify small ones about 490x), and keep the singular vectors."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    s = torch.logspace(-1, 1, 24)
    x = u[:, :24] @ torch.diag(s) @ v.T  # condition number 100
    y = orthogonalize(x, torch.float32)
    sv = torch.linalg.svdvals(y)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    # same singular vectors: U^T y V is diagonal
    d = u[:, :24].T @ y @ v
    assert (d - torch.diag(torch.diagonal(d))).abs().max() < 1e-4


def test_muon_adamw_steps_like_torchs_muon_and_fused_adamw():
    g = torch.Generator().manual_seed(2)
    shapes = [(24, 16), (16, 40), (40,), (24,)]  # two matrices (Muon), two vectors (AdamW)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    lr, wd = 0.01, 0.1

    ours = [torch.nn.Parameter(t.clone()) for t in init]
    opt = MuonAdamW([{"params": ours, "lr": lr, "weight_decay": wd}], is_matrix=lambda p: p.ndim == 2,
                    betas=(0.9, 0.95), eps=1e-8, momentum=0.95, lr_mult=1.0, ns_dtype=torch.bfloat16)
    mats = [torch.nn.Parameter(t.clone()) for t in init[:2]]
    vecs = [torch.nn.Parameter(t.clone()) for t in init[2:]]
    muon = torch.optim.Muon(mats, lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(vecs, lr=lr, weight_decay=wd, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for step in grads:
        for p, q, gr in zip(ours, mats + vecs, step):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        muon.step()
        adamw.step()
    for p, q in zip(ours, mats + vecs):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), (p - q).abs().max()
    assert rms_matched(lr, (24, 16)) == pytest.approx(lr * 0.2 * math.sqrt(24))


def test_a_matrix_picker_that_picks_a_vector_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.1, "weight_decay": 0.0}],
                  is_matrix=lambda p: True, betas=(0.9, 0.95), eps=1e-8, momentum=0.95, lr_mult=1.0,
                  ns_dtype=torch.float32)


def test_wsd_holds_the_peak_then_decays_linearly_to_min_lr():
    from palm.model import parallel
    from palm.model.network import ModelConfig
    from palm.train.engine import Engine

    model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, seq_len=32)
    optim = OptimConfig(name="muon", schedule="wsd", decay_fraction=0.25, lr=1e-2, min_lr=1e-3, warmup_steps=4)
    with parallel.process_groups():
        engine = Engine(model, optim, forward_step=lambda b, m: None, train_steps=40, micro_batch_size=2)
        lrs = []
        for _ in range(40):
            lrs.append(engine.optimizer.param_groups[0]["lr"])
            engine.scheduler.step(increment=1)
    assert lrs[0] == 0 and lrs[4] == pytest.approx(1e-2)
    assert all(x == pytest.approx(1e-2) for x in lrs[4:31])  # stable until the last quarter
    assert lrs[35] == pytest.approx(1e-2 - (1e-2 - 1e-3) * 5 / 10)
    assert lrs[31] > lrs[32] > lrs[39] > 1e-3


@pytest.mark.parametrize("field, value", [("name", "sgd"), ("schedule", "linear"), ("decay_fraction", 0.0),
                                          ("muon_momentum", 1.0), ("muon_lr_mult", 0.0)])
def test_bad_optimizer_fields_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        OptimConfig(**{field: value})
