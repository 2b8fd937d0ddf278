"""Grouped-GEMM backends for the routed experts' FFN over expert-major segments.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E local experts.

Every backend computes, for each expert ``e`` and its rows ``x_e`` (with optional
per-row routing weights ``w``):
``y_e = (w_e * act(x_e @ w_in[e]^T + b_in[e])) @ w_out[e]^T + w_e * b_out[e]``,
i.e. ``w * FFN_e(x)``, and returns the rows in the same order. Scaling the hidden
activation instead of the output touches ``F`` instead of ``D`` values per row and
lets the backward get the routing-weight gradient without storing the output.

``loop`` is the plain-autograd version (also the clean fallback); ``fused`` has a
hand-written backward that writes every GEMM into preallocated buffers and recomputes
the activation instead of storing it; ``grouped_mm`` calls ``torch._grouped_mm``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.experts.activations import activate, activate_backward, activate_parts

__all__ = [
    "grouped_ffn",
    "grouped_ffn_fused",
    "grouped_ffn_grouped_mm",
    "grouped_ffn_loop",
    "grouped_mm_available",
]


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty segment."""
    segments = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, start, start + n))
            start += n
    return segments


def _expert_of_row(counts: list[int], device: torch.device) -> Tensor:
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
    )


def grouped_ffn_loop(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """Per-expert loop under plain autograd."""
    outputs = []
    for e, start, end in _segments(counts):
        a = activate(F.linear(x_ND[start:end], w_in[e], None if b_in is None else b_in[e]), activation)
        if row_weights_N is None:
            outputs.append(F.linear(a, w_out[e], None if b_out is None else b_out[e]))
            continue
        w = row_weights_N[start:end, None]
        y = F.linear(a * w, w_out[e])
        outputs.append(y if b_out is None else y + w * b_out[e])
    if not outputs:
        return x_ND.new_zeros(0, w_out.shape[1])
    return torch.cat(outputs)


class _FusedGroupedFFN(torch.autograd.Function):
    """The fused per-expert loop: GEMMs into preallocated buffers, activation recomputed."""

    @staticmethod
    def forward(
        ctx: Any,
        x_ND: Tensor,
        w_in: Tensor,
        w_out: Tensor,
        b_in: Tensor | None,
        b_out: Tensor | None,
        row_weights_N: Tensor | None,
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
        if row_weights_N is not None:
            a_NF.mul_(row_weights_N[:, None])
        y_ND = x_ND.new_empty(N, w_out.shape[1])
        for e, s, t in segments:
            if b_out is None:
                torch.mm(a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
            elif row_weights_N is None:
                torch.addmm(b_out[e], a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
            else:
                torch.mm(a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
                y_ND[s:t].addcmul_(row_weights_N[s:t, None], b_out[e])
        ctx.save_for_backward(x_ND, h_NH, w_in, w_out, b_out, row_weights_N)
        ctx.segments = segments
        ctx.activation = activation
        ctx.has_b_in = b_in is not None
        return y_ND

    @staticmethod
    def backward(ctx: Any, grad_y_ND: Tensor) -> tuple[Tensor | None, ...]:
        x_ND, h_NH, w_in, w_out, b_out, row_weights_N = ctx.saved_tensors
        segments = ctx.segments
        need_x, need_w_in, need_w_out, need_b_in, need_b_out, need_rw = ctx.needs_input_grad[:6]
        grad_y_ND = grad_y_ND.contiguous()
        a_NF, act_gate_NF = activate_parts(h_NH, ctx.activation)

        # 1. Through the down projection: grad of the (weighted) activation.
        grad_a_NF = torch.empty_like(a_NF)
        for e, s, t in segments:
            torch.mm(grad_y_ND[s:t], w_out[e], out=grad_a_NF[s:t])
        grad_rw = None
        if row_weights_N is not None:
            w_N1 = row_weights_N[:, None]
            if need_rw:
                # d/dw of w * (a @ W^T + b): <grad_y, a @ W^T> + <grad_y, b> = <grad_a, a> + <grad_y, b>.
                grad_rw = (grad_a_NF * a_NF).sum(-1)
                if b_out is not None:
                    for e, s, t in segments:
                        grad_rw[s:t] += grad_y_ND[s:t] @ b_out[e]
            a_NF.mul_(w_N1)
            grad_a_NF.mul_(w_N1)
        grad_w_out = None
        if need_w_out:
            grad_w_out = _empty_grad_like(w_out, segments)
            for e, s, t in segments:
                torch.mm(grad_y_ND[s:t].t(), a_NF[s:t], out=grad_w_out[e])
        del a_NF

        # 2. Through the activation.
        grad_h_NH = activate_backward(grad_a_NF, h_NH, ctx.activation, act_gate_NF)
        del grad_a_NF, act_gate_NF

        # 3. Through the up projection.
        grad_w_in = None
        if need_w_in:
            grad_w_in = _empty_grad_like(w_in, segments)
            for e, s, t in segments:
                torch.mm(grad_h_NH[s:t].t(), x_ND[s:t], out=grad_w_in[e])
        grad_x_ND = None
        if need_x:
            grad_x_ND = torch.empty_like(x_ND)
            for e, s, t in segments:
                torch.mm(grad_h_NH[s:t], w_in[e], out=grad_x_ND[s:t])
        grad_b_in = _segment_sums(grad_h_NH, segments, w_in.shape[:2]) if ctx.has_b_in and need_b_in else None
        grad_b_out = None
        if b_out is not None and need_b_out:
            weighted = grad_y_ND if row_weights_N is None else grad_y_ND * row_weights_N[:, None]
            grad_b_out = _segment_sums(weighted, segments, w_out.shape[:2])
        return grad_x_ND, grad_w_in, grad_w_out, grad_b_in, grad_b_out, grad_rw, None, None


def _empty_grad_like(weight: Tensor, segments: list[tuple[int, int, int]]) -> Tensor:
    """Uninitialised per-expert gradient, zeroed only for experts that get no rows."""
    grad = torch.empty_like(weight)
    active = {e for e, _, _ in segments}
    for e in range(weight.shape[0]):
        if e not in active:
            grad[e].zero_()
    return grad


def _segment_sums(rows_NX: Tensor, segments: list[tuple[int, int, int]], shape: torch.Size) -> Tensor:
    sums = rows_NX.new_zeros(shape)
    for e, s, t in segments:
        sums[e] = rows_NX[s:t].sum(0)
    return sums


def grouped_ffn_fused(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """Per-expert GEMMs into preallocated buffers with a hand-written backward.

    Saves only ``x`` and the pre-activation ``h`` for backward (the activation output is
    recomputed), and never materialises per-expert temporaries.
    """
    return _FusedGroupedFFN.apply(  # type: ignore[no-any-return]
        x_ND.contiguous(), w_in, w_out, b_in, b_out, row_weights_N, counts, activation
    )


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and dtype == torch.bfloat16
    return device.type == "cpu"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    ``_grouped_mm``'s backward rejects the stride-0 gradients that ``sum()`` produces.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_ffn_grouped_mm(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """``torch._grouped_mm`` over the segments (its autograd formula does the backward)."""
    offsets = torch.tensor(counts, device=x_ND.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    expert_of_row = _expert_of_row(counts, x_ND.device) if (b_in is not None or b_out is not None) else None
    h_NH = torch._grouped_mm(x_ND, w_in.transpose(-2, -1), offs=offsets)
    if b_in is not None:
        h_NH = h_NH + b_in[expert_of_row]
    a_NF = activate(h_NH, activation)
    if row_weights_N is not None:
        a_NF = a_NF * row_weights_N[:, None]
    y_ND: Tensor = _ContiguousGrad.apply(torch._grouped_mm(a_NF, w_out.transpose(-2, -1), offs=offsets))
    if b_out is not None:
        bias_ND = b_out[expert_of_row]
        y_ND = y_ND + (bias_ND if row_weights_N is None else bias_ND * row_weights_N[:, None])
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
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """Run the named backend (``auto`` is resolved by the caller)."""
    return _BACKENDS[backend](x_ND, counts, w_in, w_out, b_in, b_out, activation, row_weights_N)
