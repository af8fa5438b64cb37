"""The training dtype probe (``dtype: auto``) and the flags it trusts."""

from __future__ import annotations

import pytest
import torch

from palm.train import metrics


def test_x86_without_native_bf16_is_fp32_whatever_a_probe_would_say(monkeypatch):
    monkeypatch.setattr(metrics, "cpu_flags", lambda: {"sse2", "avx2", "fma"})
    # a probe fooled by a loaded machine (bf16 "faster") must not be consulted at all
    monkeypatch.setattr(metrics, "_matmul_seconds", lambda a, b: 1.0 if a.dtype == torch.float32 else 0.0)
    assert metrics.bf16_is_fast() is False
    assert metrics.resolve_dtype("auto") == torch.float32


@pytest.mark.parametrize("flags", [{"sse2", "avx512_bf16"}, {"fp", "asimd", "bf16"}, None])
def test_elsewhere_the_probe_decides(monkeypatch, flags):
    monkeypatch.setattr(metrics, "cpu_flags", lambda: flags)
    monkeypatch.setattr(metrics, "_matmul_seconds", lambda a, b: 0.5 if a.dtype == torch.bfloat16 else 1.0)
    assert metrics.bf16_is_fast() is True
    monkeypatch.setattr(metrics, "_matmul_seconds", lambda a, b: 2.0 if a.dtype == torch.bfloat16 else 1.0)
    assert metrics.bf16_is_fast() is False


def test_the_probe_times_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    monkeypatch.setattr(metrics, "cpu_flags", lambda: None)
    monkeypatch.setattr(metrics, "_matmul_seconds", lambda a, b: seen.append(torch.get_num_threads()) or 1.0)
    before = torch.get_num_threads()
    metrics.bf16_is_fast()
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_this_machine_without_native_bf16_trains_in_fp32():
    flags = metrics.cpu_flags()
    if flags is None or "sse2" not in flags or flags & metrics.X86_BF16:
        pytest.skip("not an x86 Linux CPU without native bf16")
    assert metrics.resolve_dtype("auto") == torch.float32


def test_default_threads_honour_omp_num_threads(monkeypatch):
    """threads: 0 means OMP_NUM_THREADS where it is set (parallel test workers set 1), else the
    cores shared out between the processes; a value that is not a positive number is ignored."""
    import os

    from palm.core.process import default_threads

    cores = os.cpu_count() or 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads(1) == 1 and default_threads(2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(2) == 3
    for junk in ("", "zero", "0"):
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert default_threads(2) == max(1, cores // 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(1) == cores and default_threads(cores * 2) == 1
