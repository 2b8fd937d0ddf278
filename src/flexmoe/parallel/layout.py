"""The capacity policy over a process group: the same drops as one device on the global batch.

The global batch is the ranks' local batches concatenated in rank order. Capacity
(``ceil(cf * T_global * K / E)``, or the adaptive cap) and which assignments it drops
are decided exactly as ``flexmoe.dispatch.make_layout`` would decide them for that
global batch, so a distributed layer computes the same function as a single-device
one whatever the world size.

With a per-token number of experts (top-p routing, zero-computation experts) only the
slots in ``valid_TK`` are routed: the counts, the capacity ``ceil(cf * A / E)`` over the
``A`` routed assignments of the global batch, and the drops are those of
``make_layout(..., valid_TK)`` on the concatenated batch; unused slots are neither
routed, counted, sent nor dropped.

Cost: one all-gather of a small header and of the per-(expert, choice) counts
(``W * E * K`` integers). Batch-prioritised routing ranks assignments by score across
all ranks, so it also all-gathers every rank's routing (``T * K`` ids, weights and,
with variable k, the used-slot mask).

Legend: W ranks, T local tokens, K top-k, E experts, S local routed slots (T*K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from flexmoe.dispatch.layout import (
    DispatchLayout,
    compute_capacity,
    layout_from_sorted,
    make_layout,
    sort_slots,
)
from flexmoe.parallel.comm import Communicator

__all__ = ["GlobalLayout", "make_global_layout"]


@dataclass
class GlobalLayout:
    """A rank's dispatch layout plus the group-wide picture every rank agrees on.

    Attributes:
        local: this rank's kept slots (``local.capacity`` is the global capacity).
        kept: ``kept[q][e]``, rows rank ``q`` keeps for expert ``e``.
        tokens_per_rank: ``T`` of every rank.
        routed_per_expert_E, tokens_per_expert_E: global counts before / after drops (CPU).
    """

    local: DispatchLayout
    kept: list[list[int]]
    tokens_per_rank: list[int]
    routed_per_expert_E: Tensor
    tokens_per_expert_E: Tensor

    @property
    def num_tokens(self) -> int:
        """Tokens in the global batch."""
        return sum(self.tokens_per_rank)

    @property
    def dropped(self) -> int:
        """Assignments dropped over the whole group."""
        return int(self.routed_per_expert_E.sum() - self.tokens_per_expert_E.sum())


def _all_gather(comm: Communicator, x: Tensor, what: str) -> Tensor:
    def gather() -> Tensor:
        W = dist.get_world_size(comm.group)
        out = x.new_empty(W * x.numel())
        dist.all_gather_single(out, x.contiguous().view(-1), group=comm.group)
        return out.view(W, *x.shape)

    return comm.run(gather, what)


# Header fields that may differ between ranks: the rank's tokens, whether its input was
# accepted, its measured time of the previous call (the online tuner's feedback) and the
# stamp of its stored experts (persistent replicas stay fresh while it holds).
HEADER_FREE_FIELDS = ("num_tokens", "input_ok", "previous_us", "weights_version", "weights_storage")


def check_header(comm: Communicator, fields: dict[str, int], device: torch.device) -> Tensor:
    """All-gather ``fields`` (this call's token count and settings) and compare them.

    Raises on every rank if any setting differs between ranks; returns the gathered
    ``[W, len(fields)]`` table (CPU).
    """
    names = list(fields)
    table = _all_gather(
        comm, torch.tensor([fields[n] for n in names], dtype=torch.int64, device=device), "header all-gather"
    ).cpu()
    if "input_ok" in names:
        failed = (table[:, names.index("input_ok")] == 0).nonzero().flatten().tolist()
        if failed:
            raise RuntimeError(
                f"MoELayer {comm.name!r} step {comm.step}: rank(s) {failed} rejected their input "
                "(their own error says why); every rank stops this step"
            )
    for j, name in enumerate(names):
        if name in HEADER_FREE_FIELDS:
            continue
        column = table[:, j].tolist()
        if len(set(column)) > 1:
            raise RuntimeError(
                f"MoELayer {comm.name!r} step {comm.step}: ranks disagree on {name}: {column} "
                "(every rank must call the layer with the same settings and plan)"
            )
    return table


def make_global_layout(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity_factor: float,
    batch_prioritized: bool,
    tokens_per_rank: list[int],
    comm: Communicator,
    valid_TK: Tensor | None = None,
) -> GlobalLayout:
    """Sort this rank's slots expert-major and keep exactly those the global policy keeps.

    ``valid_TK``: the slots in use (``None``: all); every rank passes one or none alike.
    """
    T, K = expert_ids_TK.shape
    E = num_experts
    rank, W = dist.get_rank(comm.group), len(tokens_per_rank)
    slot_ids_S, experts_S, routed_E = sort_slots(expert_ids_TK, weights_TK, E, batch_prioritized, valid_TK)
    choice_S = slot_ids_S % K
    # Per (expert, choice) counts of every rank: [W, E, K]; unused slots (expert E) fall
    # in the extra block that is cut off.
    counts_EK = torch.bincount(experts_S * K + choice_S, minlength=(E + 1) * K)[: E * K]
    counts_WEK = _all_gather(comm, counts_EK, "routing-count all-gather").cpu().view(W, E, K)
    routed_WE = counts_WEK.sum(2)
    routed_global_E = routed_WE.sum(0)
    max_load = int(routed_global_E.max()) if E else 0
    if valid_TK is None:
        capacity = compute_capacity(capacity_factor, sum(tokens_per_rank), K, E, max_load)
        keep_S = None
    else:  # over the routed assignments, as make_layout does
        capacity = compute_capacity(capacity_factor, int(routed_global_E.sum()), 1, E, max_load)
        keep_S = experts_S < E
    kept_WE = routed_WE
    if capacity is not None and capacity < max_load:
        if batch_prioritized:
            within_S, kept_WE = _keep_batch_prioritized(
                expert_ids_TK, weights_TK, valid_TK, slot_ids_S, E, capacity_factor, tokens_per_rank, comm
            )
        else:
            within_S, kept_WE = _keep_default(counts_WEK, capacity, rank, experts_S, choice_S, T * K)
        keep_S = within_S if keep_S is None else keep_S & within_S
    local = layout_from_sorted(slot_ids_S, experts_S, routed_E, keep_S, capacity, T, K)
    local.num_unused = T * K - int(routed_WE[rank].sum())  # gathered counts: no device sync
    return GlobalLayout(
        local=local,
        kept=kept_WE.tolist(),
        tokens_per_rank=tokens_per_rank,
        routed_per_expert_E=routed_global_E,
        tokens_per_expert_E=kept_WE.sum(0),
    )


def _keep_default(
    counts_WEK: Tensor, capacity: int, rank: int, experts_S: Tensor, choice_S: Tensor, num_slots: int
) -> tuple[Tensor, Tensor]:
    """Keep mask under the default priority over the global batch.

    Choice ``k`` before ``k+1``, then global token order — so for expert ``e`` and
    choice ``k`` the slots of lower ranks come first. Unused slots (expert ``E``, sorted
    last) come out kept here; the caller masks them.
    """
    _, E, K = counts_WEK.shape
    per_choice_EK = counts_WEK.sum(0)
    before_choice_EK = torch.cumsum(per_choice_EK, 1) - per_choice_EK  # earlier choices, all ranks
    before_rank_WEK = torch.cumsum(counts_WEK, 0) - counts_WEK  # same choice, lower ranks
    room_WEK = capacity - before_choice_EK.unsqueeze(0) - before_rank_WEK
    kept_WEK = torch.minimum(room_WEK.clamp(min=0), counts_WEK)
    # Within (expert, choice) this rank's slots are in token order: keep the first kept_WEK.
    mine_EK = counts_WEK[rank].reshape(-1)
    block_S = (experts_S * K + choice_S).clamp(max=E * K - 1)
    device = experts_S.device
    block_start = (torch.cumsum(mine_EK, 0) - mine_EK).to(device)
    position_S = torch.arange(num_slots, device=device) - block_start[block_S]
    keep_S = position_S < kept_WEK[rank].reshape(-1).to(device)[block_S]
    return keep_S, kept_WEK.sum(2)


def _keep_batch_prioritized(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    valid_TK: Tensor | None,
    slot_ids_S: Tensor,
    num_experts: int,
    capacity_factor: float,
    tokens_per_rank: list[int],
    comm: Communicator,
) -> tuple[Tensor, Tensor]:
    """Rank every rank's assignments by score as one batch (gathers all routing)."""
    T, K = expert_ids_TK.shape
    W = len(tokens_per_rank)
    rank = dist.get_rank(comm.group)
    T_max = max(tokens_per_rank)
    device = expert_ids_TK.device
    packed = torch.zeros(T_max, 3 * K, dtype=torch.float64, device=device)
    packed[:T, :K] = expert_ids_TK.to(torch.float64)
    packed[:T, K : 2 * K] = weights_TK.detach().to(torch.float64)
    packed[:T, 2 * K :] = 1.0 if valid_TK is None else valid_TK.to(torch.float64)
    table = _all_gather(comm, packed, "routing all-gather").cpu()
    rows = torch.cat([table[q, : tokens_per_rank[q]] for q in range(W)])
    ids, weights = rows[:, :K].to(torch.int64), rows[:, K : 2 * K]
    valid = None if valid_TK is None else rows[:, 2 * K :] > 0.5
    global_layout = make_layout(ids, weights, num_experts, capacity_factor, True, valid)
    kept_slots = global_layout.slot_ids_N
    source_of_token = torch.repeat_interleave(torch.arange(W), torch.tensor(tokens_per_rank))
    kept_experts = ids.reshape(-1)[kept_slots]
    kept_sources = source_of_token[kept_slots // K]
    kept_WE = torch.bincount(kept_sources * num_experts + kept_experts, minlength=W * num_experts)
    start = sum(tokens_per_rank[:rank]) * K
    kept_here = torch.zeros(T * K, dtype=torch.bool)
    mine = kept_slots[(kept_slots >= start) & (kept_slots < start + T * K)] - start
    kept_here[mine] = True
    keep_S = kept_here.to(device)[slot_ids_S]
    return keep_S, kept_WE.view(W, num_experts)
