"""How a decoding step multiplies its few rows by the weights on this CPU: the weight layouts a
:class:`~palm.decode.decoder.Decoder` can hold, the plan that picks one, and the thread pools
around it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any

import numpy
import torch
from megatron.core import parallel_state

from palm.model import parallel

# How a decoding step multiplies its few rows by a weight on CPU (DecodePlan.layout):
#   weight      plain_linear from the weight itself (MKL)
#   transposed  plain_linear from a stored contiguous transpose (MKL)
#   packed      oneDNN's inner product from weights reordered once into its blocked layout
#               (mkldnn._reorder_linear_weight / _linear_pointwise: the ops PyTorch's compiler
#               uses for frozen linears); no packing of the weights at every call
#   openblas    numpy's BLAS (OpenBLAS in numpy's wheels) from a stored transpose, torch's own
#               ops on one thread meanwhile (decode_threads): two thread pools spinning on the
#               same cores ruin both (numbers: benchmarks/records/code-notes-2026-12-06.md#layouts)
LAYOUTS = ("weight", "transposed", "packed", "openblas")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How a decoding step multiplies a few rows by the weights: in which ``dtype`` (the
    model's, or fp32 from a copy of the weights) and which ``layout`` (:data:`LAYOUTS`)."""
    dtype: torch.dtype
    layout: str = "weight"

    def __post_init__(self) -> None:
        assert self.layout in LAYOUTS, self.layout
        assert self.layout != "openblas" or self.dtype == torch.float32, "numpy has no bf16 GEMM"


class DecodeWeight:
    """A weight ``[out, in]`` held in a plan's layout: ``self(x)`` is ``x @ weight.T`` without
    autograd, ``[..., in]`` -> ``[..., out]``, for any number of rows (the prompt pass too);
    ``rows``: the rows a step will bring (oneDNN's packing is chosen for it). On GPU: ``F.linear``.
    Raises ``RuntimeError`` where the CPU lacks the layout's kernels (oneDNN refuses bf16
    without AVX-512 or AVX-NE-CONVERT)."""

    def __init__(self, weight: torch.Tensor, layout: str, rows: int):
        self.weight, self.layout = weight, layout
        self.t = weight.t().contiguous() if layout in ("transposed", "openblas") and not weight.is_cuda else None
        self.packed = None
        if layout == "packed" and not weight.is_cuda:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.array = self.t.numpy() if layout == "openblas" and self.t is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if self.array is not None:
            rows = x.numel() // x.shape[-1]
            out = numpy.matmul(x.detach().reshape(rows, -1).numpy(), self.array)
            return torch.from_numpy(out).view(*x.shape[:-1], -1)
        return parallel.plain_linear(x, self.weight, self.t)


_DECODE_THREADS = threading.RLock()


@functools.cache
def _blas_threads() -> Any:
    import threadpoolctl  # scans the loaded libraries once (a few ms)
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


@contextlib.contextmanager
def decode_threads(plan: DecodePlan):
    """Around decoding with ``plan``: for the ``openblas`` layout, torch's ops on one thread and
    numpy's BLAS on as many as torch had (restored after; one such decoding at a time per
    process); otherwise nothing."""
    if plan.layout != "openblas":
        yield
        return
    with _DECODE_THREADS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _blas_threads().limit(limits=threads):
                yield
        finally:
            torch.set_num_threads(threads)


def tp_agree(plan: DecodePlan) -> DecodePlan:
    """The plan of the tensor-parallel group's first rank on every rank of the group (a probe
    may measure differently on each, and the ranks' partial sums must share a dtype)."""
    if parallel.tp_size() == 1:
        return plan
    codes = (torch.bfloat16, torch.float32, torch.float16)
    box = torch.tensor([codes.index(plan.dtype), LAYOUTS.index(plan.layout)])
    torch.distributed.broadcast(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                group=parallel_state.get_tensor_model_parallel_group())
    return DecodePlan(codes[int(box[0])], LAYOUTS[int(box[1])])
