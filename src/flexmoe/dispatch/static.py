"""The dispatch layout in shapes that do not depend on the routing, for ``torch.compile``.

``make_layout`` reads the per-expert counts on the host (they size the kept rows and
the GEMM segments); a compiled graph cannot. Here every one of the ``S = T*K`` routed
slots gets a row: the kept slots first, in the same expert-major priority order as
``make_layout``, then the dropped ones. The expert operator computes only the kept
rows and leaves the dropped rows at zero, so that permute and combine are plain
gathers of fixed size (no host sync, no atomics) and give the same result as the
eager layout.

Legend: T tokens, D model dim, E experts, K top-k, S routed slots (slot s = t*K + k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flexmoe.dispatch.layout import capacity_limit, sort_slots

__all__ = ["StaticLayout", "combine_static", "make_static_layout", "permute_static"]


@dataclass
class StaticLayout:
    """Where every routed slot goes, kept slots first.

    Attributes:
        slot_ids_S: the slot of each row: kept slots expert-major (priority order inside
            an expert), then the dropped slots.
        token_ids_S: the token of each row (``slot_ids_S // K``).
        inverse_S: the row of each slot.
        tokens_per_expert_E: kept slots per expert; ``routed_per_expert_E`` before drops.
        capacity: the per-expert capacity (``None`` dropless; a 0-d tensor when it is
            the real maximum load, capped: ``capacity_factor < 0``).
        dropped: dropped slots (a 0-d tensor).
        num_tokens, top_k: ``T`` and ``K``.
    """

    slot_ids_S: Tensor
    token_ids_S: Tensor
    inverse_S: Tensor
    tokens_per_expert_E: Tensor
    routed_per_expert_E: Tensor
    capacity: int | Tensor | None
    dropped: Tensor
    num_tokens: int
    top_k: int


def make_static_layout(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity_factor: float,
    batch_prioritized: bool = False,
    valid_TK: Tensor | None = None,
) -> StaticLayout:
    """``make_layout``'s rule (priority, capacity, drops) without reading anything on the host.

    Slots outside ``valid_TK`` (top-p routing) sort after every routed one, like drops.
    """
    T, K = expert_ids_TK.shape
    S = T * K
    slot_ids_S, experts_sorted, routed_E = sort_slots(
        expert_ids_TK, weights_TK, num_experts, batch_prioritized, valid_TK
    )
    limit = _limit(capacity_factor, T, K, num_experts, routed_E, valid_TK is not None)
    capacity: int | Tensor | None = limit
    if limit is None:
        kept_E = routed_E
        dropped = routed_E.new_zeros(())
    else:
        offsets_E = torch.cumsum(routed_E, 0) - routed_E
        expert_S = experts_sorted.clamp(max=num_experts - 1)  # unused slots: dropped below anyway
        position_S = torch.arange(S, device=slot_ids_S.device) - offsets_E[expert_S]
        drop_S = (position_S >= limit) | (experts_sorted == num_experts)
        # A stable sort on the drop flag moves the dropped slots behind the kept ones
        # and keeps the expert-major priority order of both.
        slot_ids_S = slot_ids_S[torch.sort(drop_S.to(torch.int8), stable=True).indices]
        kept_E = torch.clamp(routed_E, max=limit)
        dropped = routed_E.sum() - kept_E.sum()
        if capacity_factor < 0:
            capacity = torch.clamp(routed_E.max(), max=limit) if S else routed_E.new_zeros(())
    inverse_S = torch.argsort(slot_ids_S)  # the inverse permutation
    return StaticLayout(
        slot_ids_S=slot_ids_S,
        token_ids_S=torch.div(slot_ids_S, K, rounding_mode="floor"),
        inverse_S=inverse_S,
        tokens_per_expert_E=kept_E,
        routed_per_expert_E=routed_E,
        capacity=capacity,
        dropped=dropped,
        num_tokens=T,
        top_k=K,
    )


def _limit(
    capacity_factor: float, T: int, K: int, E: int, routed_E: Tensor, variable_k: bool
) -> int | Tensor | None:
    """``capacity_limit``; with a per-token number of experts, of the routed count (a tensor)."""
    if not variable_k or capacity_factor == 0:
        return capacity_limit(capacity_factor, T, K, E)
    exact = abs(capacity_factor) * (routed_E.sum().double() / E)
    return torch.ceil(exact - 1e-9 * exact.clamp(min=1.0)).to(routed_E.dtype)


def permute_static(x_TD: Tensor, layout: StaticLayout) -> Tensor:
    """The row of every slot, in layout order: ``x_SD[s] = x_TD[token_ids_S[s]]``."""
    return _TokensToSlots.apply(x_TD, layout.token_ids_S, layout.inverse_S, layout.top_k)  # type: ignore[no-any-return]


def combine_static(y_SD: Tensor, layout: StaticLayout) -> Tensor:
    """Sum each token's (weighted) expert rows; the dropped rows are zero and add nothing."""
    return _SlotsToTokens.apply(y_SD, layout.token_ids_S, layout.inverse_S, layout.top_k)  # type: ignore[no-any-return]


def _slots_to_tokens(rows_SD: Tensor, inverse_S: Tensor, top_k: int) -> Tensor:
    """``out[t] = sum_k rows[inverse_S[t*K + k]]``: a gather and a sum, no scatter."""
    return rows_SD.index_select(0, inverse_S).view(-1, top_k, rows_SD.shape[-1]).sum(1)


# Permute and combine are each other's adjoint: each one's backward is the other's
# forward. Written out, the compiler sees gathers in both directions instead of the
# scatter-adds it would derive for index_select's backward (atomic adds on CPU).
class _TokensToSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, token_ids_S: Tensor, inverse_S: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, token_ids_S)

    @staticmethod
    def backward(ctx: Any, grad_SD: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse_S,) = ctx.saved_tensors
        return _slots_to_tokens(grad_SD, inverse_S, ctx.top_k), None, None, None


class _SlotsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_SD: Tensor, token_ids_S: Tensor, inverse_S: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(token_ids_S)
        return _slots_to_tokens(y_SD, inverse_S, top_k)

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor, None, None, None]:
        (token_ids_S,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_ids_S), None, None, None
