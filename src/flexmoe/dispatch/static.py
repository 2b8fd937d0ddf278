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
) -> StaticLayout:
    """``make_layout``'s rule (priority, capacity, drops) without reading anything on the host."""
    T, K = expert_ids_TK.shape
    S = T * K
    slot_ids_S, experts_sorted, routed_E = sort_slots(
        expert_ids_TK, weights_TK, num_experts, batch_prioritized
    )
    limit = capacity_limit(capacity_factor, T, K, num_experts)
    capacity: int | Tensor | None = limit
    if limit is None:
        kept_E = routed_E
        dropped = routed_E.new_zeros(())
    else:
        offsets_E = torch.cumsum(routed_E, 0) - routed_E
        position_S = torch.arange(S, device=slot_ids_S.device) - offsets_E[experts_sorted]
        drop_S = position_S >= limit
        # A stable sort on the drop flag moves the dropped slots behind the kept ones
        # and keeps the expert-major priority order of both.
        slot_ids_S = slot_ids_S[torch.sort(drop_S.to(torch.int8), stable=True).indices]
        kept_E = torch.clamp(routed_E, max=limit)
        dropped = S - kept_E.sum()
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


def permute_static(x_TD: Tensor, layout: StaticLayout) -> Tensor:
    """The row of every slot, in layout order: ``x_SD[s] = x_TD[token_ids_S[s]]``."""
    return x_TD.index_select(0, layout.token_ids_S)


def combine_static(y_SD: Tensor, layout: StaticLayout) -> Tensor:
    """Sum each token's (weighted) expert rows; the dropped rows are zero and add nothing."""
    T, K = layout.num_tokens, layout.top_k
    return y_SD.index_select(0, layout.inverse_S).view(T, K, -1).sum(1)
