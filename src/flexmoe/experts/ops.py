"""The routed experts as PyTorch custom operators: what ``torch.compile`` sees of them.

The rows each expert gets decide the GEMM shapes, which the compiler cannot trace
(they depend on the routing). As custom operators, the experts run as one opaque node
of the compiled graph with a registered backward, and every tensor the graph sees has
a shape fixed by the batch: the operators take the tokens ``x_TD`` and the static
layout's index tensors (every one of the ``S = T*K`` routed slots has a row; the kept
slots first, expert-major, ``counts_E[e]`` rows for expert ``e``; the dropped ones
after them, computing nothing) and return the per-token sum ``y_TD``. Inside, they do
what the eager layer does: gather the kept rows, run the fused backend, sum each
token's rows, with the large ``[rows, D]`` scratch buffers from the workspace pool.
An unmerged LoRA adapter's factors (without dropout) are inputs of the training
operator, which adds their terms on the same segments and returns their gradients.

Legend: T tokens, D model dim, H first-projection width, E experts, K top-k,
S routed slots, n kept rows, r LoRA rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flexmoe.experts.backends import fused_backward, fused_forward, fused_inference
from flexmoe.experts.lora import LoRATerms, SegmentLoRA
from flexmoe.experts.segments import segments_of
from flexmoe.workspace import WORKSPACE

__all__ = ["routed_experts"]


def _segments(counts_E: Tensor) -> tuple[list[tuple[int, int, int]], int]:
    counts: list[int] = counts_E.tolist()  # NOTE: host sync, inside the operator
    return segments_of(counts), sum(counts)


def _gather(x_TD: Tensor, token_ids_n: Tensor) -> Tensor:
    """The kept rows ``x_TD[token_ids_n]`` into a pooled buffer."""
    out = WORKSPACE.take((len(token_ids_n), x_TD.shape[1]), x_TD.dtype, x_TD.device)
    return torch.index_select(x_TD, 0, token_ids_n, out=out)


def _rows(x_TD: Tensor, S: int) -> Tensor:
    """A pooled ``[S, D]`` buffer for one row per slot."""
    return WORKSPACE.take((S, x_TD.shape[1]), x_TD.dtype, x_TD.device)


def _sum_per_token(rows_SD: Tensor, n: int, inverse_S: Tensor, top_k: int) -> Tensor:
    """``out[t] = sum_k rows[inverse_S[t*K + k]]``; the rows past ``n`` (dropped slots) are zeroed first.

    Gives ``rows_SD`` back to the pool.
    """
    S, D = rows_SD.shape
    rows_SD[n:].zero_()
    if top_k == 1:
        out = rows_SD.index_select(0, inverse_S)
    else:
        slots_SD = torch.index_select(rows_SD, 0, inverse_S, out=_rows(rows_SD, S))
        out = slots_SD.view(S // top_k, top_k, D).sum(1)
        WORKSPACE.give(slots_SD)
    WORKSPACE.give(rows_SD)
    return out


@torch.library.custom_op("flexmoe::routed_experts", mutates_args=())
def _routed_experts(
    x_TD: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    A_in: Tensor | None,
    B_in: Tensor | None,
    A_out: Tensor | None,
    B_out: Tensor | None,
    slot_of_expert: list[int],
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y_TD, x, h, u, v)``: each token's weighted expert sum, and what backward needs.

    For backward: the kept rows, the pre-activation and the LoRA terms' ``u = A_in x^T``
    and ``v = a A_out^T``.

    ``x``, ``h``, ``u`` and ``v`` are flat buffers holding ``[n, D]``, ``[n, H]``,
    ``[n, r]`` and ``[n, r]`` at their front (``u``/``v`` empty without those factors);
    ``x`` and ``h`` return to the workspace pool once the graph frees them.
    """
    segments, n = _segments(counts_E)
    H, D = w_in.shape[1], x_TD.shape[1]
    S = len(token_ids_S)
    x_flat = WORKSPACE.take_until_released((S * D,), x_TD.dtype, x_TD.device)
    h_flat = WORKSPACE.take_until_released((H * S,), x_TD.dtype, x_TD.device)
    factors = (A_in, B_in, A_out, B_out)
    u_flat, v_flat = (x_TD.new_empty(_lora_numel(A, S)) for A in (A_in, A_out))
    x_nD = torch.index_select(x_TD, 0, token_ids_S[:n], out=_front(x_flat, n, D))
    y_SD = _rows(x_TD, S)
    with torch.autocast(x_TD.device.type, enabled=False):
        rw = row_weights_S[:n]
        lora = _segment_lora(factors, slot_of_expert, scaling, x_nD, w_out.shape[2], u_flat, v_flat)
        fused_forward(
            x_nD, w_in, w_out, b_in, b_out, rw, segments, activation, y_SD[:n], _front(h_flat, n, H), lora
        )
        y_TD = _sum_per_token(y_SD, n, inverse_S, _top_k(x_TD, S))
    return y_TD, x_flat, h_flat, u_flat, v_flat


def _lora_numel(A: Tensor | None, S: int) -> int:
    """``r * S`` for the ``u`` / ``v`` buffers of a present factor, else 0."""
    return 0 if A is None else A.shape[1] * S


def _segment_lora(
    factors: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
    slot_of_expert: list[int],
    scaling: float,
    x_nD: Tensor,
    F: int,
    u_flat: Tensor,
    v_flat: Tensor,
) -> SegmentLoRA | None:
    """The fused backend's LoRA state on the operator's buffers, or ``None`` without factors."""
    A_in, _, A_out, _ = factors
    if A_in is None and A_out is None:
        return None
    terms = LoRATerms(*factors, tuple(slot_of_expert), scaling, 0.0)
    n, r = x_nD.shape[0], terms.rank()
    u = None if A_in is None else _front(u_flat, n, r)
    v = None if A_out is None else _front(v_flat, n, r)
    return SegmentLoRA(terms, x_nD, F, u, v)


@_routed_experts.register_fake
def _(
    x_TD: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    A_in: Tensor | None,
    B_in: Tensor | None,
    A_out: Tensor | None,
    B_out: Tensor | None,
    slot_of_expert: list[int],
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    S = token_ids_S.shape[0]
    return (
        x_TD.new_empty(x_TD.shape),
        x_TD.new_empty(S * x_TD.shape[1]),
        x_TD.new_empty(w_in.shape[1] * S),
        x_TD.new_empty(_lora_numel(A_in, S)),
        x_TD.new_empty(_lora_numel(A_out, S)),
    )


def _front(flat: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous ``[rows, cols]`` view of the front of a flat buffer (the rest is unused)."""
    return flat[: rows * cols].view(rows, cols)


def _top_k(x_TD: Tensor, S: int) -> int:
    return S // x_TD.shape[0] if x_TD.shape[0] else 1


@torch.library.custom_op("flexmoe::routed_experts_backward", mutates_args=())
def _routed_experts_backward(
    grad_y_TD: Tensor,
    x_TD: Tensor,
    x_flat: Tensor,
    h_flat: Tensor,
    u_flat: Tensor,
    v_flat: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    A_in: Tensor | None,
    B_in: Tensor | None,
    A_out: Tensor | None,
    B_out: Tensor | None,
    slot_of_expert: list[int],
    scaling: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(x, row_weights, w_in, w_out, b_in, b_out, A_in, B_in, A_out, B_out)``.

    An empty tensor where not needed.
    """
    segments, n = _segments(counts_E)
    H, D = w_in.shape[1], x_TD.shape[1]
    S = len(token_ids_S)
    need_x, need_rw, need_w_in, need_w_out, need_b_in, need_b_out = needs[:6]
    grad_y_nD = _gather(grad_y_TD.contiguous(), token_ids_S[:n])
    grad_x_SD = _rows(x_TD, S) if need_x else None
    factors = (A_in, B_in, A_out, B_out)
    with torch.autocast(x_TD.device.type, enabled=False):
        x_nD = _front(x_flat, n, D)
        lora = _segment_lora(factors, slot_of_expert, scaling, x_nD, w_out.shape[2], u_flat, v_flat)
        grads = fused_backward(
            grad_y_nD,
            x_nD,
            _front(h_flat, n, H),
            w_in,
            w_out,
            b_out,
            row_weights_S[:n],
            segments,
            activation,
            (need_x, need_w_in, need_w_out, need_b_in, need_b_out, need_rw),
            grad_x_ND=None if grad_x_SD is None else grad_x_SD[:n],
            lora=lora,
        )
        grad_w_in, grad_w_out, grad_b_in, grad_b_out, grad_rw_n = grads[1:]
        del grads  # its first entry views grad_x_SD, which the sum below gives back to the pool
        WORKSPACE.give(grad_y_nD)  # before the sum below, which can reuse it
        del grad_y_nD
        grad_x_TD = None if grad_x_SD is None else _sum_per_token(grad_x_SD, n, inverse_S, _top_k(x_TD, S))
    grad_rw_S = None
    if grad_rw_n is not None:
        grad_rw_S = torch.cat([grad_rw_n, grad_rw_n.new_zeros(S - n)])
    lora_grads = [None] * 4 if lora is None else lora.grads
    lora_grads = [g if need else None for g, need in zip(lora_grads, needs[6:], strict=True)]
    out = (grad_x_TD, grad_rw_S, grad_w_in, grad_w_out, grad_b_in, grad_b_out, *lora_grads)
    return tuple(x_TD.new_empty(0) if g is None else g for g in out)  # type: ignore[return-value]


@_routed_experts_backward.register_fake
def _(
    grad_y_TD: Tensor,
    x_TD: Tensor,
    x_flat: Tensor,
    h_flat: Tensor,
    u_flat: Tensor,
    v_flat: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    A_in: Tensor | None,
    B_in: Tensor | None,
    A_out: Tensor | None,
    B_out: Tensor | None,
    slot_of_expert: list[int],
    scaling: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    shapes: list[tuple[int, ...]] = [
        tuple(t)
        for t in (x_TD.shape, row_weights_S.shape, w_in.shape, w_out.shape, w_in.shape[:2], w_out.shape[:2])
    ]
    shapes += [(0,) if t is None else tuple(t.shape) for t in (A_in, B_in, A_out, B_out)]
    return tuple(x_TD.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True))  # type: ignore[return-value]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x_TD, row_weights_S, token_ids_S, inverse_S, counts_E, w_in, w_out, b_in, b_out, activation = inputs[:10]
    A_in, B_in, A_out, B_out, slot_of_expert, scaling = inputs[10:]
    saved = (x_TD, *output[1:], row_weights_S, token_ids_S, inverse_S, counts_E, w_in, w_out, b_out)
    ctx.save_for_backward(*saved, A_in, B_in, A_out, B_out)
    ctx.activation = activation
    ctx.has_b_in = b_in is not None
    ctx.slot_of_expert, ctx.scaling = slot_of_expert, scaling


def _backward(ctx: Any, grad_y_TD: Tensor, *_grad_buffers: Tensor) -> tuple[Tensor | None, ...]:
    x_TD, *buffers, row_weights_S, token_ids_S, inverse_S, counts_E, w_in, w_out, b_out = ctx.saved_tensors[
        :-4
    ]
    factors = ctx.saved_tensors[-4:]
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[5], need[6], need[7] and ctx.has_b_in, need[8] and b_out is not None]
    needs += [need[10 + i] and f is not None for i, f in enumerate(factors)]
    indices = (token_ids_S, inverse_S, counts_E)
    lora = (*factors, ctx.slot_of_expert, ctx.scaling)
    grads = _routed_experts_backward(
        grad_y_TD, x_TD, *buffers, row_weights_S, *indices, w_in, w_out, b_out, ctx.activation, *lora, needs
    )
    gx, grw, gw_in, gw_out, gb_in, gb_out, *g_lora = (
        g if n else None for g, n in zip(grads, needs, strict=True)
    )
    return gx, grw, None, None, None, gw_in, gw_out, gb_in, gb_out, None, *g_lora, None, None


torch.library.register_autograd("flexmoe::routed_experts", _backward, setup_context=_setup_context)


@torch.library.custom_op("flexmoe::routed_experts_inference", mutates_args=())
def _routed_experts_inference(
    x_TD: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    """The forward without autograd (token-major, as the eager inference path)."""
    counts: list[int] = counts_E.tolist()
    n = sum(counts)
    S = len(token_ids_S)
    x_nD = _gather(x_TD, token_ids_S[:n])
    with torch.autocast(x_TD.device.type, enabled=False):
        y_nD = fused_inference(x_nD, w_in, w_out, b_in, b_out, row_weights_S[:n], counts, activation)
    y_SD = _rows(x_TD, S)
    y_SD[:n] = y_nD
    WORKSPACE.give(x_nD, y_nD)
    return _sum_per_token(y_SD, n, inverse_S, _top_k(x_TD, S))


@_routed_experts_inference.register_fake
def _(
    x_TD: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
) -> Tensor:
    return x_TD.new_empty(x_TD.shape)


def routed_experts(
    x_TD: Tensor,
    row_weights_S: Tensor,
    token_ids_S: Tensor,
    inverse_S: Tensor,
    counts_E: Tensor,
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    activation: str,
    lora: LoRATerms | None = None,
) -> Tensor:
    """``y_TD[t] = sum_k w_tk * FFN_{e_tk}(x_t)`` over the kept slots, as one operator.

    ``token_ids_S``: the token of each row, kept rows first (expert-major, ``counts_E[e]``
    for expert ``e``); ``inverse_S``: the row of each slot ``t*K + k``; ``row_weights_S``
    the routing weight of each row. ``lora``: an adapter's terms (without dropout), added
    on the same segments with their gradients. See the module docstring.
    """
    w_in, w_out, b_in, b_out = weights
    args = (x_TD, row_weights_S, token_ids_S, inverse_S, counts_E, w_in, w_out, b_in, b_out, activation)
    factors = (None, None, None, None) if lora is None else lora.tensors
    if lora is not None or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x_TD, row_weights_S, *weights))
    ):
        slots = [] if lora is None else list(lora.slot_of_expert)
        scaling = 0.0 if lora is None else lora.scaling
        y_TD: Tensor = _routed_experts(*args, *factors, slots, scaling)[0]
        return y_TD
    y: Tensor = _routed_experts_inference(*args)
    return y
