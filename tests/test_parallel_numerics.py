"""Acceptance 1: every TP/PP/DP layout trains exactly like one process (CPU, gloo).

Three launches in all: the one-process reference, a 2-process torchrun that runs TP=2, PP=2
(1F1B), PP=2 with 2 virtual stages (interleaved 1F1B), DP=2 and TP=2 decoding one after another,
and a 4-process TP=2 x PP=2 run. The masked layouts give every micro-batch (and so every DP rank)
a different number of valid tokens: they must still match one plain backward of the per-token
mean over all valid tokens (per-micro-batch averaging would not). All start from the same initial weights (seeded per weight) and
see the same micro-batches (DP=2: half each, so one process with twice the micro-batches of a DP
rank is the reference). Tolerances are fp32 reduction-order noise, stated per assertion.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "parity_worker.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def launch(out: Path, nproc: int, *layouts: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable] if nproc == 1 else
           [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]) + [str(WORKER), str(out), *layouts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity")
    launch(out, 1, "1,1,1,1", "1,1,1,1,mask", "1,1,1,1,muon", "naive", "decode,1", "fwd,1,1", "reward,1,1")
    launch(out, 2, "2,1,1,1", "1,2,1,1", "1,2,1,2", "1,1,2,1", "decode,2",
           "2,1,1,1,mask", "1,2,1,1,mask", "1,1,2,1,mask", "fwd,2,1", "fwd,1,2", "reward,2,1", "reward,1,2",
           "2,1,1,1,muon", "1,2,1,1,muon", "1,1,2,1,muon")
    launch(out, 4, "2,2,1,1", "2,2,1,1,muon")
    return out


def load(out: Path, layout: str) -> dict:
    """Merge the per-stage files of one layout into whole-model dicts."""
    merged: dict = {"grads": {}, "weights": {}}
    files = sorted(glob.glob(str(out / f"{layout}.rank*.pt")))
    assert files, f"no results for {layout}"
    for f in files:
        part = torch.load(f)
        merged["losses"] = part["losses"]
        for kind in ("grads", "weights"):
            merged[kind].update(part[kind])
    # the last stage's copy of the tied embedding must equal the embedding itself
    copy = merged["weights"].pop("output_embedding.weight", None)
    if copy is not None:
        assert torch.equal(copy, merged["weights"]["embedding.weight"])
        merged["grads"].pop("output_embedding.weight")
    return merged


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def compare(out: Path, layout: str, *, loss_tol: float, grad_tol: float | None, weight_tol: float,
            ref_layout: str = "1,1,1,1"):
    ref, got = load(out, ref_layout), load(out, layout)
    assert set(got["weights"]) == set(ref["weights"])
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) <= loss_tol * abs(b), (layout, got["losses"], ref["losses"])
    if grad_tol is not None:
        worst = max(ref["grads"], key=lambda k: rel(got["grads"][k], ref["grads"][k]))
        assert rel(got["grads"][worst], ref["grads"][worst]) <= grad_tol, (layout, worst)
    for k in ref["weights"]:
        diff = (got["weights"][k] - ref["weights"][k]).abs().max().item()
        assert diff <= weight_tol, (layout, k, diff)


pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]


def test_tp2_equals_tp1(runs):
    # loss equal (fp32 reduction order only), first-step gradients within 1e-5 relative
    compare(runs, "2,1,1,1", loss_tol=1e-6, grad_tol=1e-5, weight_tol=1e-4)


def test_pp2_1f1b_equals_pp1_over_3_steps(runs):
    compare(runs, "1,2,1,1", loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4)


def test_pp2_interleaved_equals_pp1(runs):
    compare(runs, "1,2,1,2", loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4)


def test_tp2_pp2_equals_single_process(runs):
    compare(runs, "2,2,1,1", loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4)


def test_dp2_equals_one_process_with_twice_the_microbatches(runs):
    compare(runs, "1,1,2,1", loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4)


@pytest.mark.parametrize("layout", ["2,1,1,1", "1,2,1,1", "1,1,2,1", "2,2,1,1"])
def test_muon_trains_every_layout_like_one_process(runs, layout):
    """The muon recipe (wsd schedule): a TP shard's update is orthogonalised whole (gathered), so
    every layout takes one process's steps; orthogonalising each shard alone would not."""
    compare(runs, f"{layout},muon", loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4, ref_layout="1,1,1,1,muon")


def test_muon_is_not_adamw(runs):
    """The comparison above is of Muon's steps: its weights after 3 steps are far from AdamW's."""
    muon, adamw = load(runs, "1,1,1,1,muon"), load(runs, "1,1,1,1")
    diff = max((muon["weights"][k] - adamw["weights"][k]).abs().max().item()
               for k in muon["weights"] if k.startswith("layers.") and muon["weights"][k].ndim == 2)
    assert diff > 1e-3, diff


@pytest.mark.parametrize("layout", ["1,1,1,1,mask", "2,1,1,1,mask", "1,2,1,1,mask", "1,1,2,1,mask"])
def test_masks_that_differ_per_micro_batch_and_dp_rank_give_the_per_token_mean(runs, layout):
    naive, got = torch.load(runs / "naive.pt"), load(runs, layout)
    # first step: loss and gradients of the plain per-token mean over all valid tokens
    assert abs(got["losses"][0] - naive["loss"]) <= 1e-5 * abs(naive["loss"]), (got["losses"][0], naive["loss"])
    worst = max(naive["grads"], key=lambda k: rel(got["grads"][k], naive["grads"][k]))
    assert rel(got["grads"][worst], naive["grads"][worst]) <= 1e-5, (layout, worst)
    if layout != "1,1,1,1,mask":  # and 3 optimizer steps like the one-process engine
        compare(runs, layout, loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4, ref_layout="1,1,1,1,mask")


@pytest.mark.parametrize("layout", ["2,1", "1,2"])
def test_engine_forward_logprobs_equal_a_single_process_forward(runs, layout):
    ref = torch.load(runs / "fwd.1,1.rank0.pt")  # [micro * b, s]
    assert ref.shape == (8, 32) and (ref < 0).all()
    for rank in (0, 1):  # PP=2: the first stage receives the last stage's tensors
        got = torch.load(runs / f"fwd.{layout}.rank{rank}.pt")
        assert (got - ref).abs().max().item() < 1e-5, (layout, rank)


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_cached_decoding_equals_full_recompute(runs, tp):
    d = torch.load(runs / f"decode.tp{tp}.pt")
    # incremental logits (prompt, then one token at a time) match one full forward pass
    assert (d["incremental"] - d["full"]).abs().max().item() < 1e-4
    # and so do the fused decoder's (the last position of each step: 11, then 12..19)
    assert (d["fused"] - d["full"][:, 11:]).abs().max().item() < 1e-4
    assert set(d["layouts"]) == {"transposed", "packed", "openblas"}
    for layout, logits in d["layouts"].items():  # stored transposes, oneDNN's packing, numpy's BLAS
        assert (logits - d["full"][:, 11:]).abs().max().item() < 1e-4, layout
    # greedy generation of prompts of lengths 6 and 3 (left-padded): same tokens cached and not
    assert torch.equal(d["cached"], d["uncached"])
    assert d["cached"].shape == (2, 16)
    # the sampled tokens' raw log-probs equal a full forward pass over each final sequence
    assert d["sampled_raw"].shape == (2, 10)
    assert (d["sampled_raw"] - d["full_raw"]).abs().max().item() < 1e-4
    # top-k 20 / top-p 0.9 renormalise: each token is likelier under the sampling distribution
    assert (d["sampled_logp"] >= d["sampled_raw"] - 1e-6).all()
    ranks = [torch.load(f) for f in sorted(runs.glob(f"decode.tp{tp}.tokens.rank*.pt"))]
    assert len(ranks) == tp
    for other in ranks[1:]:  # every TP rank returns the same tokens
        assert torch.equal(other["cached"], ranks[0]["cached"])
        assert torch.equal(other["sampled"], ranks[0]["sampled"])


def test_tp2_decoding_and_hidden_states_match_tp1(runs):
    one, two = torch.load(runs / "decode.tp1.pt"), torch.load(runs / "decode.tp2.pt")
    assert one["hidden"].shape == (2, 20, 64)
    assert (one["hidden"] - two["hidden"]).abs().max().item() < 1e-5
    assert (one["full"] - two["full"]).abs().max().item() < 1e-4
    assert torch.equal(one["cached"], two["cached"])
    assert torch.equal(one["sampled"], two["sampled"])  # same generator seed on every rank


@pytest.mark.parametrize("layout", ["2,1", "1,2"])
def test_reward_model_at_tp2_and_pp2_equals_one_process(runs, layout):
    """PaLM + scalar head with the pairwise loss: rewards (Engine.forward), losses, accuracy,
    first-step gradients (the head's included) and weights after 3 steps."""
    ref, got = load(runs, "reward.1,1"), load(runs, f"reward.{layout}")
    assert "head.weight" in ref["grads"] and ref["grads"]["head.weight"].abs().sum() > 0
    before = ref["weights"]["rewards_before"]
    assert before.shape == (2 * 2 * 4,) and before.std() > 0  # MICRO x 2 MBS sequences, not all equal
    compare(runs, f"reward.{layout}", loss_tol=1e-5, grad_tol=1e-5, weight_tol=1e-4, ref_layout="reward.1,1")
