"""Capacity policy and the dispatch layout: which routed slots run, in expert-major order.

Legend: T tokens, E experts, K top-k, S routed slots (S = T*K, slot s = t*K + k),
N kept slots (N <= S).

No dense ``[tokens, experts, capacity]`` one-hot tensor is ever built: the layout is a
permutation of slot indices plus per-expert counts, computed with one stable sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HOST_LAYOUT_SLOTS",
    "DispatchLayout",
    "capacity_limit",
    "compute_capacity",
    "count_per_expert",
    "host_layout",
    "layout_from_sorted",
    "make_layout",
    "sort_slots",
    "takes_host_layout",
]

# Up to this many routed slots ``make_layout`` runs on the host with numpy
# (``takes_host_layout``). On 2 cores the numpy layout took 14 us against 33 us for one
# token's 8 slots of 128 experts, 675 against 896 us for 2048 x 8 slots of 64 experts,
# and 2.9 against 2.1 ms for 8192 x 8 slots (where the tensor ops' threads pay).
HOST_LAYOUT_SLOTS = 16384


def compute_capacity(
    capacity_factor: float, num_tokens: int, top_k: int, num_experts: int, max_load: int
) -> int | None:
    """Per-expert capacity for one step, or ``None`` when nothing may be dropped.

    ``cf > 0``: ``ceil(cf * T * K / E)``. ``cf < 0``: the real maximum load, capped at
    ``ceil(|cf| * T * K / E)``. ``cf == 0``: dropless (``None``).
    """
    cap = capacity_limit(capacity_factor, num_tokens, top_k, num_experts)
    if cap is None or capacity_factor > 0:
        return cap
    return min(max_load, cap)


def _call_capacity(
    capacity_factor: float, T: int, K: int, E: int, max_load: int, routed: int, some_unused: bool
) -> int | None:
    """One call's capacity: over its ``T * K`` slots, or over the ``routed`` assignments (top-p)."""
    if some_unused:
        return compute_capacity(capacity_factor, routed, 1, E, max_load)
    return compute_capacity(capacity_factor, T, K, E, max_load)


def capacity_limit(capacity_factor: float, num_tokens: float, top_k: int, num_experts: int) -> int | None:
    """``ceil(|cf| * T * K / E)``: the most rows an expert may keep (``None`` when dropless).

    ``num_tokens`` may be an expected (fractional) count: the planner prices the same rule.
    """
    if capacity_factor == 0:
        return None
    exact = abs(capacity_factor) * (num_tokens * top_k / num_experts)
    # A factor like 1.1 is stored as 1.1000000000000000888; do not let that last bit
    # round a capacity of exactly 5 up to 6.
    return math.ceil(exact - 1e-9 * max(1.0, exact))


@dataclass
class DispatchLayout:
    """Where every kept routed slot goes.

    Attributes:
        slot_ids_N: flat slot index ``t*K + k`` of each kept slot, expert-major; within
            an expert, in priority order.
        token_ids_N: the token of each kept slot (``slot_ids_N // K``).
        tokens_per_expert_E: kept slots per expert (int64, on the input's device).
        routed_per_expert_E: routed slots per expert before any drop.
        counts: ``tokens_per_expert_E`` as host ints (the GEMM loop needs them).
        capacity: the per-expert capacity used, ``None`` if dropless.
        num_tokens, top_k: ``T`` and ``K`` of this step.
        inverse_S: when nothing was dropped, the kept-row index of every slot
            (the inverse permutation of ``slot_ids_N``); ``None`` otherwise.
        num_unused: slots no expert was routed to (top-p routing: tokens that use
            fewer than ``K`` experts); neither routed nor dropped.
    """

    slot_ids_N: Tensor
    token_ids_N: Tensor
    tokens_per_expert_E: Tensor
    routed_per_expert_E: Tensor
    counts: list[int]
    capacity: int | None
    num_tokens: int
    top_k: int
    inverse_S: Tensor | None = None
    num_unused: int = 0

    @property
    def num_dropped(self) -> int:
        """Routed slots that were dropped by the capacity limit."""
        return self.num_tokens * self.top_k - self.num_unused - len(self.slot_ids_N)


def make_layout(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity_factor: float,
    batch_prioritized: bool = False,
    valid_TK: Tensor | None = None,
) -> DispatchLayout:
    """Sort the routed slots into expert-major order and apply the capacity policy.

    Priority within an expert (who is kept when it overflows): by default, all first
    choices before all second choices, and earlier tokens first within one choice
    (GShard/Tutel order); with ``batch_prioritized``, higher routing weight first
    (ties broken by that default order). ``valid_TK``: the slots in use (top-p routing);
    the others are not routed at all, and the capacity counts the ``A`` routed
    assignments instead of ``T*K``: ``ceil(cf * A / E)``.
    """
    T, K = expert_ids_TK.shape
    if takes_host_layout(expert_ids_TK, batch_prioritized):
        return host_layout(expert_ids_TK, num_experts, capacity_factor, valid_TK)
    slot_ids_S, experts_sorted, routed_per_expert_E = sort_slots(
        expert_ids_TK, weights_TK, num_experts, batch_prioritized, valid_TK
    )
    # NOTE: host sync — the counts decide the capacity and the GEMM segment sizes.
    routed_counts: list[int] = routed_per_expert_E.tolist()
    max_load = max(routed_counts) if routed_counts else 0
    routed = sum(routed_counts)
    capacity = _call_capacity(capacity_factor, T, K, num_experts, max_load, routed, valid_TK is not None)
    keep_S = None if valid_TK is None else experts_sorted < num_experts
    if capacity is not None and capacity < max_load:
        # Position of each slot inside its expert; keep the first `capacity`.
        offsets_E = torch.cumsum(routed_per_expert_E, 0) - routed_per_expert_E
        expert_S = experts_sorted.clamp(max=num_experts - 1)  # unused slots: masked out anyway
        position_S = torch.arange(T * K, device=expert_ids_TK.device) - offsets_E[expert_S]
        within_S = position_S < capacity
        keep_S = within_S if keep_S is None else keep_S & within_S
    layout = layout_from_sorted(slot_ids_S, experts_sorted, routed_per_expert_E, keep_S, capacity, T, K)
    layout.num_unused = T * K - routed
    return layout


def takes_host_layout(expert_ids_TK: Tensor, batch_prioritized: bool) -> bool:
    """Whether ``make_layout`` builds this layout with numpy (``host_layout``).

    Few slots on the CPU, outside ``torch.compile``, in the default priority order: a
    decode step's layout is a dozen tensor ops on a handful of slots, each costing more
    in dispatch than in work (and more again right after a kernel has streamed the
    caches full of weights), where numpy does the same on the host at a fraction.
    """
    return (
        expert_ids_TK.device.type == "cpu"
        and expert_ids_TK.numel() <= HOST_LAYOUT_SLOTS
        and not batch_prioritized
        and not torch.compiler.is_compiling()
    )


def host_layout(
    expert_ids_TK: Tensor, num_experts: int, capacity_factor: float, valid_TK: Tensor | None = None
) -> DispatchLayout:
    """``make_layout`` in the default priority order, computed with numpy (the same layout)."""
    T, K = expert_ids_TK.shape
    E = num_experts
    # slots in default priority order (k-major, then token), then one stable sort by expert
    slot_ids_P = np.arange(T * K, dtype=np.int64).reshape(T, K).T.reshape(-1)
    experts_P = expert_ids_TK.detach().numpy().astype(np.int64, copy=False).T.reshape(-1)
    if valid_TK is not None:
        experts_P = np.where(valid_TK.detach().numpy().T.reshape(-1), experts_P, E)
    order = np.argsort(experts_P, kind="stable")
    slot_ids_S, experts_sorted = slot_ids_P[order], experts_P[order]
    routed_E = np.bincount(experts_sorted, minlength=E + 1)[:E]
    max_load = int(routed_E.max()) if E else 0
    routed = int(routed_E.sum())
    capacity = _call_capacity(capacity_factor, T, K, E, max_load, routed, valid_TK is not None)
    keep_S = None if valid_TK is None else experts_sorted < E
    if capacity is not None and capacity < max_load:
        starts_E = np.cumsum(routed_E) - routed_E
        expert_S = np.minimum(experts_sorted, E - 1)  # unused slots: masked out anyway
        within_S = np.arange(T * K) - starts_E[expert_S] < capacity
        keep_S = within_S if keep_S is None else keep_S & within_S
    if keep_S is None:
        slot_ids_N, kept_E = slot_ids_S, routed_E
    else:
        slot_ids_N = slot_ids_S[keep_S]
        kept_E = np.bincount(experts_sorted[keep_S], minlength=E)
    inverse_S = None
    if len(slot_ids_N) == T * K:
        inverse = np.empty_like(slot_ids_N)
        inverse[slot_ids_N] = np.arange(T * K)
        inverse_S = torch.from_numpy(inverse)
    return DispatchLayout(
        slot_ids_N=torch.from_numpy(slot_ids_N),
        token_ids_N=torch.from_numpy(slot_ids_N // K),
        tokens_per_expert_E=torch.from_numpy(kept_E),
        routed_per_expert_E=torch.from_numpy(routed_E),
        counts=kept_E.tolist(),
        capacity=capacity,
        num_tokens=T,
        top_k=K,
        inverse_S=inverse_S,
        num_unused=T * K - routed,
    )


def sort_slots(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    batch_prioritized: bool,
    valid_TK: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Slots in expert-major priority order: ``(slot_ids_S, expert_of_each_S, routed_per_expert_E)``.

    Default priority within an expert: all first choices, then all second choices, ...,
    earlier tokens first within one choice; with ``batch_prioritized``, higher routing
    weight first (ties broken by the default order). Slots outside ``valid_TK`` come
    last, with expert ``E`` (past every real one), and are not counted.
    """
    T, K = expert_ids_TK.shape
    device = expert_ids_TK.device
    # 1. Slots in default priority order: k-major, then token (slot = t*K + k).
    slot_ids_P = torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
    if batch_prioritized:
        scores_P = weights_TK.detach().t().reshape(-1)
        slot_ids_P = slot_ids_P[torch.sort(scores_P, descending=True, stable=True).indices]
    experts_P = expert_ids_TK.reshape(-1)[slot_ids_P]
    if valid_TK is not None:
        experts_P = torch.where(valid_TK.reshape(-1)[slot_ids_P], experts_P, num_experts)
    # 2. One stable sort by expert keeps the priority order inside each expert.
    experts_sorted, order = torch.sort(experts_P, stable=True)
    routed_E = count_per_expert(experts_sorted, num_experts + 1)[:num_experts]
    return slot_ids_P[order], experts_sorted, routed_E


def count_per_expert(expert_ids: Tensor, num_experts: int) -> Tensor:
    """How many of ``expert_ids`` name each expert (int64 ``[E]``; a fixed shape, unlike ``bincount``)."""
    flat = expert_ids.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def layout_from_sorted(
    slot_ids_S: Tensor,
    experts_sorted: Tensor,
    routed_per_expert_E: Tensor,
    keep_S: Tensor | None,
    capacity: int | None,
    num_tokens: int,
    top_k: int,
) -> DispatchLayout:
    """The layout that keeps the sorted slots where ``keep_S`` is true (all if ``None``)."""
    T, K = num_tokens, top_k
    device = slot_ids_S.device
    if keep_S is None:
        slot_ids_N = slot_ids_S
        tokens_per_expert_E = routed_per_expert_E
        kept_counts: list[int] = routed_per_expert_E.tolist()
    else:
        slot_ids_N = slot_ids_S[keep_S]
        tokens_per_expert_E = torch.bincount(experts_sorted[keep_S], minlength=len(routed_per_expert_E))
        kept_counts = tokens_per_expert_E.tolist()
    inverse_S = None
    if len(slot_ids_N) == T * K:
        inverse_S = torch.empty_like(slot_ids_N)
        inverse_S[slot_ids_N] = torch.arange(T * K, device=device)
    return DispatchLayout(
        slot_ids_N=slot_ids_N,
        token_ids_N=torch.div(slot_ids_N, K, rounding_mode="floor"),
        tokens_per_expert_E=tokens_per_expert_E,
        routed_per_expert_E=routed_per_expert_E,
        counts=kept_counts,
        capacity=capacity,
        num_tokens=T,
        top_k=K,
        inverse_S=inverse_S,
    )
