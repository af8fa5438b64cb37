"""Run megatron-core's CUDA-only lines on CPU: one small context, entered only around megatron calls.

megatron-core 0.16.1 assumes CUDA in a handful of places that matter to us (docs/megatron-cpu.md
has the full account): the pipeline schedules and p2p communication allocate tensors with
``device="cuda"`` or ``torch.cuda.current_device()``, megatron DDP and the optimizer create small
``device="cuda"`` buffers, ``dist_checkpointing.save`` does the same, and gradient clipping / the
fp16-param optimizer assert ``Tensor.type() == "torch.cuda.FloatTensor"``.

:func:`cpu_compat` bridges exactly those lines when CUDA is absent:

* a :class:`~torch.overrides.TorchFunctionMode` rewrites ``device="cuda"`` (or ``cuda:N``) in
  factory calls and ``Tensor.cuda()`` to CPU, and answers ``Tensor.type()`` with the CUDA name of
  the same dtype (so megatron's dtype checks see what they expect; the data stays on CPU);
* ``torch.cuda.current_device`` returns ``"cpu"`` and ``torch.cuda.synchronize`` does nothing.

Every bridged call records the megatron line that made it in :data:`CALL_SITES`;
``tests/test_megatron_compat.py`` pins that set, so an upgrade that adds a new CUDA-only line fails
loudly instead of silently running somewhere unexpected. With CUDA present the context does
nothing at all.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

#: ``"megatron/core/<file>.py:<function>"`` for every megatron line the context bridged.
CALL_SITES: set[str] = set()

_CUDA_TYPE = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int64: "torch.cuda.LongTensor",
}


def _record() -> None:
    """Remember the innermost megatron frame on the stack (the line that wanted CUDA)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/megatron/core/" in name:
            rel = "megatron/core/" + name.split("/megatron/core/", 1)[1]
            CALL_SITES.add(f"{rel}:{frame.f_code.co_name}")
            return
        frame = frame.f_back
    CALL_SITES.add("<outside megatron>")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means a CUDA ordinal


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            _record()
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE:
                _record()
                return _CUDA_TYPE[tensor.dtype]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            _record()
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _current_device() -> str:
    _record()
    return "cpu"


def _synchronize(device: Any = None) -> None:
    _record()


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Bridge megatron-core's CUDA-only lines to CPU inside the block; a no-op with CUDA."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device, torch.cuda.synchronize = _current_device, _synchronize
    try:
        with _CudaToCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved


def device() -> torch.device:
    """The device this process computes on: its CUDA device when there is one, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["CALL_SITES", "cpu_compat", "device"]
