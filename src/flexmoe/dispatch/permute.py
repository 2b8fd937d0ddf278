"""Permute token rows into expert-major order and sum expert outputs back per token.

Legend: T tokens, D model dim, K top-k, S routed slots (T*K, slot s = t*K + k),
N kept slots.

Both directions are gathers followed (for the token side) by a sum over ``K``: no
atomics and no zero-filled scatter targets when nothing is dropped, so results are
deterministic on every device, and 16-bit sums accumulate in fp32. On CPU the token
side is one gather-sum (``sums_in_place``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.dispatch.layout import DispatchLayout
from flexmoe.workspace import WORKSPACE

__all__ = ["combine", "permute", "release_rows", "slots_to_tokens", "sum_slots", "sums_in_place"]


def slots_to_tokens(rows_ND: Tensor, layout: DispatchLayout) -> Tensor:
    """``out[t] = sum_k rows[n(t, k)]`` over the kept slots of token ``t`` (no autograd)."""
    T, K = layout.num_tokens, layout.top_k
    if layout.inverse_S is not None:
        return sum_slots(rows_ND, layout.inverse_S.view(T, K))
    rows_SD = WORKSPACE.take((T * K, rows_ND.shape[-1]), rows_ND.dtype, rows_ND.device)
    rows_SD.zero_().index_copy_(0, layout.slot_ids_N, rows_ND)
    return _sum_slot_grid(rows_SD, T, K)


def sum_slots(rows_ND: Tensor, rows_TK: Tensor) -> Tensor:
    """``out[t] = sum_k rows[rows_TK[t, k]]``, in slot order (no autograd): how every token's rows are summed.

    ``slots_to_tokens`` sums a layout's rows with it, so rows laid out another way (one
    token's rows in slot order: ``rows_TK = [[0, ..., K-1]]``) sum to the same bits.
    """
    T, K = rows_TK.shape
    if K == 1:
        return rows_ND.index_select(0, rows_TK.view(T))
    if sums_in_place(rows_ND, K):
        # each token reads its K rows where they lie: no [T*K, D] gather, no strided sum
        return F.embedding_bag(rows_TK, rows_ND, mode="sum")
    rows_SD = WORKSPACE.take((T * K, rows_ND.shape[-1]), rows_ND.dtype, rows_ND.device)
    torch.index_select(rows_ND, 0, rows_TK.reshape(T * K), out=rows_SD)
    return _sum_slot_grid(rows_SD, T, K)


def _sum_slot_grid(rows_SD: Tensor, T: int, K: int) -> Tensor:
    """The sums over ``K`` of slot-ordered rows ``[T * K, D]`` (a workspace buffer, given back)."""
    if K == 1:
        return rows_SD
    rows_TKD = rows_SD.view(T, K, rows_SD.shape[-1])
    # Two rows: one add, the same result as sum(1) (one rounding either way), and in bf16
    # several times faster than the reduction over a strided axis.
    out_TD = rows_TKD[:, 0] + rows_TKD[:, 1] if K == 2 else rows_TKD.sum(1)
    del rows_TKD  # a view: while it lives the buffer is not the pool's to keep
    WORKSPACE.give(rows_SD)
    return out_TD


def sums_in_place(rows_ND: Tensor, top_k: int) -> bool:
    """Whether ``slots_to_tokens`` sums each token's rows with ``embedding_bag`` (a gather-sum).

    On CPU, in fp32 and fp64, and in 16 bits from three slots on: 3-15x faster than the
    gather and the strided sum (an 8-slot bf16 training step of ``benchmarks/layer.py``
    case B runs about 6 % faster). It adds the rows in slot order in fp32 (in fp64 for
    fp64) and rounds once: bitwise what ``sum(1)`` gives, except that bf16 totals round
    ties away from zero rather than to even (the same error bound). Two 16-bit rows keep
    the one add, which is as fast.
    """
    if rows_ND.device.type != "cpu":
        return False
    if rows_ND.dtype in (torch.float32, torch.float64):
        return True
    return rows_ND.dtype in (torch.bfloat16, torch.float16) and top_k >= 3


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, layout: DispatchLayout) -> Tensor:
        ctx.layout = layout
        x_ND = WORKSPACE.take((len(layout.token_ids_N), x_TD.shape[-1]), x_TD.dtype, x_TD.device)
        return torch.index_select(x_TD, 0, layout.token_ids_N, out=x_ND)

    @staticmethod
    def backward(ctx: Any, grad_ND: Tensor) -> tuple[Tensor, None]:
        grad_TD = slots_to_tokens(grad_ND, ctx.layout)
        WORKSPACE.give(grad_ND)
        return grad_TD, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_ND: Tensor, layout: DispatchLayout) -> Tensor:
        ctx.layout = layout
        return slots_to_tokens(y_ND, layout)

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor, None]:
        token_ids_N = ctx.layout.token_ids_N
        grad_ND = WORKSPACE.take((len(token_ids_N), grad_TD.shape[-1]), grad_TD.dtype, grad_TD.device)
        return torch.index_select(grad_TD, 0, token_ids_N, out=grad_ND), None


def permute(x_TD: Tensor, layout: DispatchLayout) -> Tensor:
    """Gather the rows of the kept slots, expert-major: ``x_ND[n] = x_TD[token_ids_N[n]]``."""
    if not _needs_grad(x_TD):  # inference: no autograd node to build (a decode step's layers add up)
        x_ND = WORKSPACE.take((len(layout.token_ids_N), x_TD.shape[-1]), x_TD.dtype, x_TD.device)
        return torch.index_select(x_TD, 0, layout.token_ids_N, out=x_ND)
    return _Permute.apply(x_TD, layout)  # type: ignore[no-any-return]


def _needs_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def release_rows(x_ND: Tensor) -> None:
    """Give ``permute``'s rows back to the workspace once the experts are done with them.

    Only without autograd: an autograd graph may have saved the rows themselves (not a
    view, so the workspace could not tell), and the backward reads them. Reusing the
    buffer spares the next call a fresh one, whose first touch faults its pages in
    (about 9x the gather's own time at 20 MB).
    """
    if not torch.is_grad_enabled():
        WORKSPACE.give(x_ND)


def combine(y_ND: Tensor, layout: DispatchLayout) -> Tensor:
    """Sum each token's (already weighted) expert outputs: ``out[t] = sum_k y[n(t, k)]``.

    Dropped slots contribute nothing.
    """
    if not _needs_grad(y_ND):
        return slots_to_tokens(y_ND, layout)
    return _Combine.apply(y_ND, layout)  # type: ignore[no-any-return]
