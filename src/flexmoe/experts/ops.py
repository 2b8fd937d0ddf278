"""The grouped expert FFN as PyTorch custom operators: what ``torch.compile`` sees of the experts.

The rows each expert gets decide the GEMM shapes, which the compiler cannot trace
(they depend on the routing). As custom operators, the fused backend runs as one
opaque node of the compiled graph, with a registered backward, and everything around
it keeps static shapes: the operators take all ``S = T*K`` routed rows, the kept rows
first in expert-major order (``counts_E[e]`` rows for expert ``e``), and leave the rows
after them (the dropped ones) at zero in every output.

Legend: S routed rows, D model dim, H first-projection width, E experts, n kept rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flexmoe.experts.backends import fused_backward, fused_forward, fused_inference
from flexmoe.experts.segments import segments_of
from flexmoe.workspace import WORKSPACE

__all__ = ["grouped_ffn_rows"]


def _segments(counts_E: Tensor) -> tuple[list[tuple[int, int, int]], int]:
    counts: list[int] = counts_E.tolist()  # NOTE: host sync, inside the operator
    return segments_of(counts), sum(counts)


@torch.library.custom_op("flexmoe::grouped_ffn", mutates_args=())
def _grouped_ffn(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_S: Tensor | None,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """``(y_SD, h)``: the weighted expert rows and the flat pre-activation ``[H, n]`` backward needs."""
    segments, n = _segments(counts_E)
    S, D = x_SD.shape
    H = w_in.shape[1]
    x_SD = x_SD.contiguous()
    y_SD = x_SD.new_empty(S, D)
    y_SD[n:].zero_()
    h_flat = x_SD.new_zeros(H * S)
    rw = None if row_weights_S is None else row_weights_S[:n]
    with torch.autocast(x_SD.device.type, enabled=False):
        fused_forward(
            x_SD[:n], w_in, w_out, b_in, b_out, rw, segments, activation, y_SD[:n], _hidden(h_flat, H, n)
        )
    return y_SD, h_flat


@_grouped_ffn.register_fake
def _(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_S: Tensor | None,
    activation: str,
) -> tuple[Tensor, Tensor]:
    S, D = x_SD.shape
    return x_SD.new_empty(S, D), x_SD.new_empty(w_in.shape[1] * S)


def _hidden(h_flat: Tensor, H: int, n: int) -> Tensor:
    """The ``[H, n]`` pre-activation at the front of the flat buffer (contiguous, as the fused path needs)."""
    return h_flat[: H * n].view(H, n)


@torch.library.custom_op("flexmoe::grouped_ffn_backward", mutates_args=())
def _grouped_ffn_backward(
    grad_y_SD: Tensor,
    x_SD: Tensor,
    h_flat: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    row_weights_S: Tensor | None,
    activation: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(x, w_in, w_out, b_in, b_out, row_weights)``; an empty tensor where not needed."""
    segments, n = _segments(counts_E)
    S, D = x_SD.shape
    H = w_in.shape[1]
    x_SD = x_SD.contiguous()
    grad_x_SD = x_SD.new_empty(S, D)
    grad_x_SD[n:].zero_()
    rw = None if row_weights_S is None else row_weights_S[:n]
    with torch.autocast(x_SD.device.type, enabled=False):
        grads = fused_backward(
            grad_y_SD[:n],
            x_SD[:n],
            _hidden(h_flat, H, n),
            w_in,
            w_out,
            b_out,
            rw,
            segments,
            activation,
            (needs[0], needs[1], needs[2], needs[3], needs[4], needs[5]),
            grad_x_ND=grad_x_SD[:n],
        )
    grad_rw = grads[5]
    if grad_rw is not None:
        grad_rw = torch.cat([grad_rw, grad_rw.new_zeros(S - n)])
    out = (grad_x_SD if needs[0] else None, *grads[1:5], grad_rw)
    return tuple(x_SD.new_empty(0) if g is None else g for g in out)  # type: ignore[return-value]


@_grouped_ffn_backward.register_fake
def _(
    grad_y_SD: Tensor,
    x_SD: Tensor,
    h_flat: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    row_weights_S: Tensor | None,
    activation: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    shapes = (x_SD.shape, w_in.shape, w_out.shape, w_in.shape[:2], w_out.shape[:2], x_SD.shape[:1])
    return tuple(x_SD.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True))  # type: ignore[return-value]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x_SD, counts_E, w_in, w_out, b_in, b_out, row_weights_S, activation = inputs
    ctx.save_for_backward(x_SD, output[1], counts_E, w_in, w_out, b_out, row_weights_S)
    ctx.activation = activation
    ctx.has_b_in = b_in is not None


def _backward(ctx: Any, grad_y_SD: Tensor, _grad_h: Tensor) -> tuple[Tensor | None, ...]:
    x_SD, h_flat, counts_E, w_in, w_out, b_out, row_weights_S = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[2], need[3], need[4] and ctx.has_b_in, need[5] and b_out is not None, need[6]]
    grads = _grouped_ffn_backward(
        grad_y_SD, x_SD, h_flat, counts_E, w_in, w_out, b_out, row_weights_S, ctx.activation, needs
    )
    gx, gw_in, gw_out, gb_in, gb_out, grw = (g if n else None for g, n in zip(grads, needs, strict=True))
    return gx, None, gw_in, gw_out, gb_in, gb_out, grw, None


torch.library.register_autograd("flexmoe::grouped_ffn", _backward, setup_context=_setup_context)


@torch.library.custom_op("flexmoe::grouped_ffn_inference", mutates_args=())
def _grouped_ffn_inference(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_S: Tensor | None,
    activation: str,
) -> Tensor:
    """The forward without autograd (token-major, as the eager inference path)."""
    counts: list[int] = counts_E.tolist()
    n = sum(counts)
    S, D = x_SD.shape
    rw = None if row_weights_S is None else row_weights_S[:n]
    y_SD = x_SD.new_empty(S, D)
    y_SD[n:].zero_()
    with torch.autocast(x_SD.device.type, enabled=False):
        y_nD = fused_inference(x_SD[:n].contiguous(), w_in, w_out, b_in, b_out, rw, counts, activation)
    y_SD[:n] = y_nD
    WORKSPACE.give(y_nD)
    return y_SD


@_grouped_ffn_inference.register_fake
def _(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_S: Tensor | None,
    activation: str,
) -> Tensor:
    return x_SD.new_empty(x_SD.shape)


def grouped_ffn_rows(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_S: Tensor | None = None,
) -> Tensor:
    """``w * FFN_e(x)`` on the first ``sum(counts_E)`` rows (expert-major); zero rows after them.

    The static-shape form of ``grouped_ffn`` that ``torch.compile`` traces as one
    operator (the fused backend); ``counts_E`` is a tensor, read inside the operator.
    """
    inputs = (x_SD, w_in, w_out, b_in, b_out, row_weights_S)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y_SD: Tensor = _grouped_ffn(x_SD, counts_E, w_in, w_out, b_in, b_out, row_weights_S, activation)[0]
        return y_SD
    y: Tensor = _grouped_ffn_inference(x_SD, counts_E, w_in, w_out, b_in, b_out, row_weights_S, activation)
    return y
