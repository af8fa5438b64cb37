"""The CPU compatibility context (palm/model/megatron_compat.py): what it bridges, and exactly where.

``PINNED`` is every megatron-core line the context had to bridge while training TP/PP/
interleaved/DP, bf16 with fp32 main weights, gradient clipping, and a dist_checkpointing save and
load. A megatron upgrade that adds a CUDA-only line on these paths changes the set and fails here
(review the new line, then update the list); one that removes lines does too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm.model.megatron_compat import CALL_SITES, cpu_compat

ROOT = Path(__file__).resolve().parents[1]

PINNED = {
    "megatron/core/dist_checkpointing/strategies/filesystem_async.py:preload_tensors",
    "megatron/core/dist_checkpointing/strategies/state_dict_saver.py:save_state_dict_async_finalize",
    "megatron/core/distributed/param_and_grad_buffer.py:__init__",
    "megatron/core/optimizer/clip_grads.py:clip_grad_by_total_norm_fp32",
    "megatron/core/optimizer/clip_grads.py:get_grad_norm_fp32",
    "megatron/core/optimizer/optimizer.py:__init__",
    "megatron/core/pipeline_parallel/p2p_communication.py:create_tensor_recv_next",
    "megatron/core/pipeline_parallel/p2p_communication.py:create_tensor_recv_prev",
    "megatron/core/pipeline_parallel/schedules.py:forward_backward_no_pipelining",
    "megatron/core/pipeline_parallel/schedules.py:forward_backward_pipelining_with_interleaving",
    "megatron/core/pipeline_parallel/schedules.py:forward_backward_pipelining_without_interleaving",
    "megatron/core/utils.py:local_multi_tensor_l2_norm",
}


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_the_megatron_call_sites_it_bridges_are_pinned(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "dist" / "parity_worker.py"), str(tmp_path),
           "2,1,1,1", "1,2,1,1", "1,2,1,2", "1,1,2,1", "bf16,1,2", "bf16,2,1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set()
    for f in tmp_path.glob("sites.rank*.json"):
        seen |= set(json.loads(f.read_text()))
    if torch.cuda.is_available():
        assert seen == set()  # a no-op with CUDA
    else:
        assert seen == PINNED, f"new: {sorted(seen - PINNED)}; gone: {sorted(PINNED - seen)}"
    assert all(x == x for x in json.loads((tmp_path / "bf16.json").read_text()))  # finite losses


@pytest.mark.skipif(torch.cuda.is_available(), reason="the context is a no-op with CUDA")
def test_context_rewrites_cuda_only_inside_and_restores_everything():
    before = torch.cuda.current_device, torch.cuda.synchronize
    CALL_SITES.discard("<outside megatron>")
    with cpu_compat():
        t = torch.zeros(3, device="cuda")
        assert t.device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor" and t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert t.cuda() is t
        assert torch.cuda.current_device() == "cpu"
        torch.cuda.synchronize()
    assert "<outside megatron>" in CALL_SITES  # calls from outside megatron are recorded too
    assert (torch.cuda.current_device, torch.cuda.synchronize) == before
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # outside the context CUDA is still absent


def test_importing_the_training_code_compiles_nothing():
    """megatron-core's import-time ``torch.compile`` decorations stay megatron's no-op (palm/__init__.py):
    a fresh process that imports the model, the engine and the checkpoints has not loaded TorchDynamo,
    and a decorated megatron fusion is the plain function."""
    code = ("import sys, palm.model.network, palm.train.engine, palm.train.checkpoint\n"
            "import megatron.core.jit as jit\n"
            "from megatron.core.fusions.fused_bias_swiglu import bias_swiglu\n"
            "print(jit.jit_fuser is jit.noop_decorator, 'torch._dynamo' in sys.modules, type(bias_swiglu).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "function"], out.stdout
