"""The benchmarks' own arithmetic: ``benchmarks/ppo_throughput.py --profile`` counts every
matmul's FLOPs from the shapes the profiler records, so its layout of those shapes (``bmm``'s two
operands first, ``baddbmm``'s after the tensor it adds to) is checked here against known calls.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from ppo_throughput import matmul_flops  # noqa: E402


def test_matmul_flops_from_profiler_shapes():
    a, w = torch.randn(6, 5), torch.randn(5, 7)
    x, y = torch.randn(3, 4, 5), torch.randn(3, 5, 2)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.mm(a, w)
        torch.bmm(x, y)
        torch.baddbmm(torch.zeros(1, 1, 2), x, y)  # the added tensor broadcasts: its shape is not the output's
    counted = {e.key: matmul_flops(e.key, e.input_shapes) for e in prof.key_averages(group_by_input_shape=True)
               if e.key in ("aten::mm", "aten::bmm", "aten::baddbmm")}
    assert counted == {"aten::mm": 2 * 6 * 5 * 7, "aten::bmm": 2 * 3 * 4 * 5 * 2, "aten::baddbmm": 2 * 3 * 4 * 5 * 2}
