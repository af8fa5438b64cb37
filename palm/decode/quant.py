"""int8 weight-only decoding on CPU, for ``palm chat --quantize int8`` and ``palm serve
--quantize int8``: the decoder's fused weights (:func:`palm.decode.decoder.stack`) rounded once to
int8 with one symmetric scale per output channel; activations, the KV cache, attention and the
logits stay fp32.

Why: a decoding step of one prompt streams every weight once for one row, so its speed is the
weights' bytes; read as one byte instead of four (:class:`palm.decode.native.Int8Linear` widens
them in registers, never into memory) a step moves a quarter of the bytes. Measured with
``benchmarks/int8_decode.py`` (records in ``benchmarks/records/int8-decode-*``).

Not for PPO: a rollout's log-probs must be the trainer's own, so the int8 weights are a separate
object that only chat and serving make and hand to :func:`palm.decode.generate.generate`; the model
itself is never changed. :func:`quantize` refuses a model with trainable parameters (a policy being
trained), and a decoder refuses int8 weights of another model or of weights changed since.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from palm.core.errors import UserError
from palm.decode import layouts, native
from palm.decode.decoder import stack
from palm.model.network import PaLM

KERNEL_ROWS = 64  # Int8Weight: up to this many rows through the int8 kernel; more (a prompt
# pass) through an fp32 copy made for the call, where a BLAS GEMM's blocking outruns the kernel


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [n, k]`` -> (``q [n, k]`` int8 in [-127, 127], ``scale [n]`` fp32) with ``w ~= q *
    scale[:, None]``: symmetric, one scale per output channel (row), ``max |w_row| / 127``, so
    each element is off by at most ``scale / 2`` (an all-zero row: scale 1, q 0)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale[:, None]`` in fp32: the weights an int8 matmul multiplies by."""
    return q.float() * scale[:, None]


class Int8Weight:
    """A weight ``[out, in]`` held as int8 with per-output-channel scales: ``self(x)`` is ``x @
    dequantize(q, scale).T`` in fp32, ``[..., in]`` -> ``[..., out]`` (a decoder's ``hold``)."""

    def __init__(self, weight: torch.Tensor):
        self.q, self.scale = quantize_rows(weight.detach())
        self.kernel = native.Int8Linear.make(self.q, self.scale)  # None: no kernel for it here

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (self.kernel is not None and rows <= KERNEL_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.is_contiguous()):
            return self.kernel(x)
        # many rows (a prompt pass), or no kernel: the same product from an fp32 copy
        return F.linear(x.float(), self.q.float()) * self.scale


class Int8Weights:
    """A frozen model's decoding weights in int8, made once (:func:`quantize`): what
    :func:`palm.decode.generate.generate` takes as ``weights=`` instead of stacking the model's
    own at every call. ``output``: the (tied) output layer in int8 too, else fp32 (the embedding
    lookup always reads the fp32 table)."""

    def __init__(self, model: PaLM, output: bool = True):
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if trainable:
            raise UserError(f"int8 weights are for chat and serving, not for a model in training ({trainable[0]} "
                            "requires grad): PPO's rollouts must have the trainer's own log-probs")
        if model.final_norm.weight.is_cuda:
            raise UserError("int8 decoding runs on CPU only")
        self.model = model
        self.versions = self._versions(model)
        hold_output = Int8Weight if output else (lambda w: layouts.DecodeWeight(w, "weight", rows=1))
        self.blocks, self.final_norm, self.output = stack(model, torch.float32, Int8Weight, hold_output)

    @staticmethod
    def _versions(model: PaLM) -> list[tuple[int, int]]:
        """Each parameter's version counter (bumped by every in-place change; an inference tensor,
        which cannot be changed outside inference mode, has none) and storage."""
        return [(-1 if p.is_inference() else p._version, p.data_ptr()) for p in model.parameters()]

    def check(self, model: PaLM) -> None:
        """Refuse to decode ``model`` with these weights unless they are its own, unchanged."""
        if model is not self.model:
            raise UserError("these int8 weights were made from another model")
        if self._versions(model) != self.versions:
            raise UserError("the model's weights changed since they were quantized: quantize it again")


def quantize(model: PaLM, mode: str) -> Int8Weights | None:
    """The weights ``palm chat`` / ``palm serve`` decode ``model`` with for ``--quantize mode``:
    ``None`` for ``none`` (the model's own, fp32 path), :class:`Int8Weights` for ``int8``."""
    if mode not in ("none", "int8"):
        raise UserError(f"--quantize: none or int8, got {mode!r}")
    return None if mode == "none" else Int8Weights(model)
