"""Permute token rows into expert-major order and sum expert outputs back per token.

Legend: T tokens, D model dim, K top-k, S routed slots (T*K, slot s = t*K + k),
N kept slots.

Both directions are gathers followed (for the token side) by a sum over ``K``: no
atomics and no zero-filled scatter targets when nothing is dropped, so results are
deterministic on every device, and bf16 sums accumulate in fp32 inside ``sum``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flexmoe.dispatch.layout import DispatchLayout

__all__ = ["combine", "permute", "slots_to_tokens"]


def slots_to_tokens(rows_ND: Tensor, layout: DispatchLayout) -> Tensor:
    """``out[t] = sum_k rows[n(t, k)]`` over the kept slots of token ``t`` (no autograd)."""
    T, K = layout.num_tokens, layout.top_k
    if layout.inverse_S is not None:
        rows_SD = rows_ND.index_select(0, layout.inverse_S)
    else:
        rows_SD = rows_ND.new_zeros(T * K, rows_ND.shape[-1]).index_copy_(0, layout.slot_ids_N, rows_ND)
    if K == 1:
        return rows_SD
    return rows_SD.view(T, K, rows_ND.shape[-1]).sum(1)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, layout: DispatchLayout) -> Tensor:
        ctx.layout = layout
        return x_TD.index_select(0, layout.token_ids_N)

    @staticmethod
    def backward(ctx: Any, grad_ND: Tensor) -> tuple[Tensor, None]:
        return slots_to_tokens(grad_ND, ctx.layout), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_ND: Tensor, layout: DispatchLayout) -> Tensor:
        ctx.layout = layout
        return slots_to_tokens(y_ND, layout)

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor, None]:
        return grad_TD.index_select(0, ctx.layout.token_ids_N), None


def permute(x_TD: Tensor, layout: DispatchLayout) -> Tensor:
    """Gather the rows of the kept slots, expert-major: ``x_ND[n] = x_TD[token_ids_N[n]]``."""
    return _Permute.apply(x_TD, layout)  # type: ignore[no-any-return]


def combine(y_ND: Tensor, layout: DispatchLayout) -> Tensor:
    """Sum each token's (already weighted) expert outputs: ``out[t] = sum_k y[n(t, k)]``.

    Dropped slots contribute nothing.
    """
    return _Combine.apply(y_ND, layout)  # type: ignore[no-any-return]
