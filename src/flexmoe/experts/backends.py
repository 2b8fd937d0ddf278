"""Grouped-GEMM backends for the routed experts' FFN over expert-major segments.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E local experts.

Every backend computes, for each expert ``e`` and its rows ``x_e``:
``y_e = act(x_e @ w_in[e]^T + b_in[e]) @ w_out[e]^T + b_out[e]`` and returns the rows
in the same order. ``loop`` is the plain-autograd version; ``fused`` has a hand-written
backward that writes every GEMM into preallocated buffers and recomputes the
activation instead of storing it; ``grouped_mm`` calls ``torch._grouped_mm``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.experts.activations import activate, activate_backward

__all__ = ["grouped_ffn", "grouped_ffn_fused", "grouped_ffn_grouped_mm", "grouped_ffn_loop", "grouped_mm_available"]


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty segment."""
    segments = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, start, start + n))
            start += n
    return segments


def grouped_ffn_loop(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    """Per-expert loop under plain autograd (also the clean fallback for any device)."""
    outputs = []
    for e, start, end in _segments(counts):
        h = F.linear(x_ND[start:end], w_in[e], None if b_in is None else b_in[e])
        outputs.append(F.linear(activate(h, activation), w_out[e], None if b_out is None else b_out[e]))
    if not outputs:
        return x_ND.new_zeros(0, w_out.shape[1]) + 0.0 * w_out.sum()
    return torch.cat(outputs)


class _FusedGroupedFFN(torch.autograd.Function):
    """The fused per-expert loop: GEMMs into preallocated buffers, activation recomputed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_ND: Tensor,
        w_in: Tensor,
        w_out: Tensor,
        b_in: Tensor | None,
        b_out: Tensor | None,
        counts: list[int],
        activation: str,
    ) -> Tensor:
        segments = _segments(counts)
        N = x_ND.shape[0]
        h_NH = x_ND.new_empty(N, w_in.shape[1])
        for e, s, t in segments:
            if b_in is None:
                torch.mm(x_ND[s:t], w_in[e].t(), out=h_NH[s:t])
            else:
                torch.addmm(b_in[e], x_ND[s:t], w_in[e].t(), out=h_NH[s:t])
        a_NF = activate(h_NH, activation)
        y_ND = x_ND.new_empty(N, w_out.shape[1])
        for e, s, t in segments:
            if b_out is None:
                torch.mm(a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
            else:
                torch.addmm(b_out[e], a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
        ctx.save_for_backward(x_ND, h_NH, w_in, w_out)
        ctx.segments = segments
        ctx.activation = activation
        ctx.has_bias = (b_in is not None, b_out is not None)
        return y_ND

    @staticmethod
    def backward(ctx: Any, grad_y_ND: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_ND, h_NH, w_in, w_out = ctx.saved_tensors
        segments = ctx.segments
        grad_y_ND = grad_y_ND.contiguous()
        a_NF = activate(h_NH, ctx.activation)
        grad_a_NF = torch.empty_like(a_NF)
        grad_w_out = torch.zeros_like(w_out) if ctx.needs_input_grad[2] else None
        for e, s, t in segments:
            torch.mm(grad_y_ND[s:t], w_out[e], out=grad_a_NF[s:t])
            if grad_w_out is not None:
                torch.mm(grad_y_ND[s:t].t(), a_NF[s:t], out=grad_w_out[e])
        del a_NF
        grad_h_NH = activate_backward(grad_a_NF, h_NH, ctx.activation)
        del grad_a_NF
        grad_x_ND = torch.empty_like(x_ND) if ctx.needs_input_grad[0] else None
        grad_w_in = torch.zeros_like(w_in) if ctx.needs_input_grad[1] else None
        for e, s, t in segments:
            if grad_w_in is not None:
                torch.mm(grad_h_NH[s:t].t(), x_ND[s:t], out=grad_w_in[e])
            if grad_x_ND is not None:
                torch.mm(grad_h_NH[s:t], w_in[e], out=grad_x_ND[s:t])
        grad_b_in = grad_b_out = None
        if ctx.has_bias[0] and ctx.needs_input_grad[3]:
            grad_b_in = w_in.new_zeros(w_in.shape[0], w_in.shape[1])
            for e, s, t in segments:
                grad_b_in[e] = grad_h_NH[s:t].sum(0)
        if ctx.has_bias[1] and ctx.needs_input_grad[4]:
            grad_b_out = w_out.new_zeros(w_out.shape[0], w_out.shape[1])
            for e, s, t in segments:
                grad_b_out[e] = grad_y_ND[s:t].sum(0)
        return grad_x_ND, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None


def grouped_ffn_fused(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    """Per-expert GEMMs into preallocated buffers with a hand-written backward.

    Saves only ``x`` and the pre-activation ``h`` for backward (the activation output is
    recomputed), and never materialises per-expert temporaries.
    """
    return _FusedGroupedFFN.apply(x_ND.contiguous(), w_in, w_out, b_in, b_out, counts, activation)  # type: ignore[no-any-return]


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and dtype == torch.bfloat16
    return device.type == "cpu"


def grouped_ffn_grouped_mm(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    """``torch._grouped_mm`` over the segments (its autograd formula does the backward)."""
    offsets = torch.tensor(counts, device=x_ND.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    h_NH = torch._grouped_mm(x_ND, w_in.transpose(-2, -1), offs=offsets)
    if b_in is not None or b_out is not None:
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts), device=x_ND.device), torch.tensor(counts, device=x_ND.device)
        )
    if b_in is not None:
        h_NH = h_NH + b_in[expert_of_row]
    y_ND = torch._grouped_mm(activate(h_NH, activation), w_out.transpose(-2, -1), offs=offsets)
    if b_out is not None:
        y_ND = y_ND + b_out[expert_of_row]
    return y_ND


_BACKENDS = {"loop": grouped_ffn_loop, "fused": grouped_ffn_fused, "grouped_mm": grouped_ffn_grouped_mm}


def grouped_ffn(
    backend: str,
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    """Run the named backend (``auto`` is resolved by the caller)."""
    return _BACKENDS[backend](x_ND, counts, w_in, w_out, b_in, b_out, activation)
