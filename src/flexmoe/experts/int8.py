"""Weight-only int8 experts: per-output-channel scales, and the expert FFN computed from them.

Legend: N rows (tokens routed to the expert), D model dim, F expert hidden dim, H
first-projection width (2F gated, else F), O output channels, I input channels.

A weight ``w [O, I]`` (``transformers``' ``[out, in]`` layout) is stored as
``q [O, I]`` int8 and ``scale [O]``: ``w ≈ q * scale[:, None]`` with
``scale = max|w[o]| / 127`` and ``q = round(w / scale)``, so each weight is off by at
most ``scale / 2`` and an expert takes half the bytes of bf16 (plus ``4 (O)`` bytes of
fp32 scales). Only the weights are quantized; the activations stay in the model's dtype.

On CPU, ``torch._weight_int8pack_mm`` multiplies bf16, fp16 or fp32 activations by the
int8 weight directly (16-bit ones when the input width is a multiple of 16, as in every
real model); elsewhere (CUDA, fp64, odd widths) the weight is dequantized on use. Both
compute ``x @ (q * scale)^T``. ``Int8Linear`` is an ``nn.Linear`` for inference held
the same way (the attention's and the head's weights of a model whose experts are int8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.experts.rows import rows_int8, takes_int8

__all__ = ["SCALE_SUFFIX", "Int8Linear", "Int8Weight", "int8_linear", "quantize_int8"]

SCALE_SUFFIX = "_scale"  # a quantized tensor ``name`` has its scales in ``name + SCALE_SUFFIX``
_INT8_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` of ``w [..., I]``: int8 ``q`` of ``w``'s shape, fp32 ``scale [...]`` per row.

    Symmetric and per output channel (each row over the last dim, the input dim of
    ``transformers``' ``[out, in]`` weights): ``|w - q * scale| <= scale / 2``. An all-zero
    row gets scale 1 (its ``q`` is zero).
    """
    if w.dim() < 1 or not w.is_floating_point():
        raise ValueError(
            f"quantize_int8 needs a floating-point tensor of dim >= 1, got {w.dtype} {tuple(w.shape)}"
        )
    w32 = w.float()
    amax = w32.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w32 / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass(frozen=True)
class Int8Weight:
    """A weight ``[O, I]`` held as int8 ``q [O, I]`` and per-output-channel ``scale [O]``."""

    q: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-d int8 tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        if tuple(self.scale.shape) != (self.q.shape[0],):
            raise ValueError(f"scale must have shape ({self.q.shape[0]},), got {tuple(self.scale.shape)}")

    @classmethod
    def quantize(cls, w: Tensor) -> Int8Weight:
        """``w [O, I]`` quantized (see ``quantize_int8``)."""
        return cls(*quantize_int8(w))

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I)``."""
        return int(self.q.shape[0]), int(self.q.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held: the int8 values and the scales."""
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``q * scale[:, None]`` in ``dtype`` (computed in fp32, or fp64 for fp64)."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.q.to(compute) * self.scale.to(compute).unsqueeze(1)).to(dtype)

    def to(self, device: torch.device | str, scale_dtype: torch.dtype | None = None) -> Int8Weight:
        """On ``device``, the scales cast to ``scale_dtype`` (default: kept)."""
        return Int8Weight(self.q.to(device), self.scale.to(device, scale_dtype or self.scale.dtype))


def int8_linear(x_NI: Tensor, weight: Int8Weight) -> Tensor:
    """``x @ (q * scale)^T`` in ``x``'s dtype: ``[N, I] -> [N, O]``."""
    if takes_int8(x_NI, weight.q):  # a few rows: streamed at memory speed (flexmoe.experts.rows)
        return rows_int8(x_NI, weight.q, weight.scale)
    if _int8_kernel_takes(x_NI):
        # the int8 values are read as they are, scaled per output channel after the sum
        return torch._weight_int8pack_mm(x_NI.contiguous(), weight.q, weight.scale.to(x_NI.dtype))
    return F.linear(x_NI, weight.dequantize(x_NI.dtype))


def _int8_kernel_takes(x_NI: Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` handles ``x``: CPU, fp32 or 16-bit with ``I % 16 == 0``.

    Its 16-bit CPU kernel works in blocks of 16 input channels and crashes the process on
    other widths (torch 2.13), so those are dequantized instead.
    """
    if x_NI.device.type != "cpu" or x_NI.dtype not in _INT8_MM_DTYPES or x_NI.shape[0] == 0:
        return False
    return x_NI.dtype == torch.float32 or x_NI.shape[1] % 16 == 0


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference whose weight is held as int8 with per-output-channel scales.

    ``Int8Linear.of(linear)`` quantizes the layer's weight (``quantize_int8``: each weight
    off by at most half its row's scale) and keeps its bias; the float weight is then no
    longer needed, and a decoded token reads half the bytes of a bf16 weight. Forwards
    compute ``x @ (q * scale)^T + b`` in ``x``'s dtype with ``int8_linear``; with a
    gradient to compute for ``x``, on the dequantized weight (no gradient reaches the
    int8 weight).
    """

    q: Tensor
    scale: Tensor

    def __init__(self, weight: Int8Weight, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        """``linear``'s weight quantized to int8, its bias kept."""
        with torch.no_grad():
            return cls(Int8Weight.quantize(linear.weight), linear.bias)

    @property
    def weight(self) -> Int8Weight:
        """The int8 weight and its scales."""
        return Int8Weight(self.q, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ (q * scale)^T + b`` over the last dimension of ``x``."""
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.weight.dequantize(x.dtype), self.bias)
        y_NO = int8_linear(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y_NO = y_NO + self.bias.to(y_NO.dtype)
        return y_NO.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:  # noqa: D102
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"
