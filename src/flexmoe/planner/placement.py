"""Placement decisions: which slots to store experts in, which replicas to keep, whether moving pays.

Pure functions of per-expert loads (and co-activation counts): every rank computes the
same answer from the same global inputs. The layer applies a placement with
``MoELayer.apply_placement`` and replicas with ``MoELayer.set_replicas``; a
``flexmoe.tools.Rebalancer`` ties them to a training loop. See ``flexmoe.placement.slots``
for what a placement is.

Legend: W ranks, E experts, El = E/W experts per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flexmoe.placement import check_placement, identity_placement, moved_experts, rank_loads, slot_loads
from flexmoe.planner.rerouting import plan_rerouting

__all__ = [
    "LoadTracker",
    "PlacementAdvice",
    "advise_placement",
    "affinity_placement",
    "balanced_placement",
    "coactivation_counts",
    "replica_placement",
    "same_rank_fraction",
]


def _canonical(bins: list[list[int]], current: Sequence[int] | None, world_size: int) -> list[int]:
    """Slots for ``bins`` (unlabelled groups of El experts), keeping experts where they are.

    Bins are matched to ranks greedily by how many of their experts a rank already holds
    (largest overlap first), so a re-plan moves no expert it does not have to. Inside a
    rank, experts that stay keep their slot; the others fill the free slots in
    increasing id order (so with ``current=None``, or one rank, slots ascend with ids).
    """
    W, El = world_size, len(bins[0]) if bins else 0
    E = W * El
    current = identity_placement(E) if current is None else list(current)
    overlap = [[sum(1 for e in b if current[e] // El == p) for p in range(W)] for b in bins]
    pairs = sorted((-overlap[i][p], i, p) for i in range(W) for p in range(W))
    rank_of_bin: dict[int, int] = {}
    taken: set[int] = set()
    for _, i, p in pairs:
        if i not in rank_of_bin and p not in taken:
            rank_of_bin[i], taken = p, taken | {p}
    slots = [-1] * E
    for i, members in enumerate(bins):
        p = rank_of_bin[i]
        staying = [e for e in members if current[e] // El == p]
        for e in staying:
            slots[e] = current[e]
        free = sorted(set(range(p * El, (p + 1) * El)) - {current[e] for e in staying})
        for e, s in zip(sorted(set(members) - set(staying)), free, strict=True):
            slots[e] = s
    return slots


def balanced_placement(
    loads: Sequence[float], world_size: int, current: Sequence[int] | None = None
) -> list[int]:
    """A placement that evens the per-rank load (``E/W`` experts per rank), from per-expert loads.

    1. Longest-processing-time packing (EPLB's ``balanced_packing``): experts in
       decreasing load, each to the lightest rank that still has a free slot.
    2. Pairwise swaps between the busiest rank and any other, while one lowers the
       busiest rank's load (LPT's result is within 4/3 of optimal; swaps close part of
       the rest on small ``E``).
    3. Bins are matched to ranks to keep experts where ``current`` has them (see
       ``_canonical``): the least data moves for the same balance.
    4. If ``current`` is already as balanced, it is returned unchanged (no move for no gain).

    ``loads``: e.g. a moving average of routed rows per expert (``LoadTracker``).
    Deterministic (ties break by expert id, then rank).
    """
    E, W = len(loads), world_size
    check_placement(identity_placement(E), E, W)
    El = E // W
    bins: list[list[int]] = [[] for _ in range(W)]
    totals = [0.0] * W
    # 1. LPT with exactly El experts per rank.
    for e in sorted(range(E), key=lambda i: (-float(loads[i]), i)):
        p = min((q for q in range(W) if len(bins[q]) < El), key=lambda q: (totals[q], q))
        bins[p].append(e)
        totals[p] += float(loads[e])
    # 2. Swaps: the best swap between the busiest rank and another, while it helps.
    for _ in range(4 * E):
        h = max(range(W), key=lambda q: (totals[q], -q))
        best: tuple[float, int, int, int] | None = None
        for q in range(W):
            if q == h:
                continue
            for a in bins[h]:
                for b in bins[q]:
                    delta = float(loads[a]) - float(loads[b])
                    peak = max(totals[h] - delta, totals[q] + delta)
                    if delta > 0 and peak < totals[h] - 1e-9 and (best is None or peak < best[0]):
                        best = (peak, q, a, b)
        if best is None:
            break
        _, q, a, b = best
        bins[h][bins[h].index(a)], bins[q][bins[q].index(b)] = b, a
        delta = float(loads[a]) - float(loads[b])
        totals[h] -= delta
        totals[q] += delta
    # 3. Label the bins by the ranks that already hold most of them.
    placement = _canonical(bins, current, W)
    # 4. No move for no gain.
    if current is not None and max(rank_loads(loads, current, W)) <= max(totals) + 1e-9 * (1 + max(totals)):
        return list(current)
    return placement


def coactivation_counts(
    expert_ids_TK: Tensor, next_expert_ids_TK: Tensor, num_experts: int, next_num_experts: int | None = None
) -> Tensor:
    """``C[a, b]``: tokens routed to expert ``a`` in one layer and ``b`` in the next (``[E, E']``, int64).

    Every pair of one token's choices counts once (``K * K'`` pairs per token).
    """
    E2 = num_experts if next_num_experts is None else next_num_experts
    if expert_ids_TK.shape[0] != next_expert_ids_TK.shape[0]:
        raise ValueError(
            f"co-activation needs the same tokens in both layers, got {expert_ids_TK.shape[0]} and "
            f"{next_expert_ids_TK.shape[0]} tokens"
        )
    pairs = expert_ids_TK.unsqueeze(2) * E2 + next_expert_ids_TK.unsqueeze(1)  # [T, K, K']
    flat = torch.bincount(pairs.reshape(-1).to(torch.int64).cpu(), minlength=num_experts * E2)
    return flat.view(num_experts, E2)


def same_rank_fraction(
    coactivation: Tensor, slot_of_expert: Sequence[int], next_slot_of_expert: Sequence[int], world_size: int
) -> float:
    """Fraction of consecutive-layer hops (``coactivation`` pairs) whose two experts share a rank."""
    E, E2 = coactivation.shape
    El, El2 = E // world_size, E2 // world_size
    rank_a = torch.tensor([s // El for s in slot_of_expert])
    rank_b = torch.tensor([s // El2 for s in next_slot_of_expert])
    same = rank_a.unsqueeze(1) == rank_b.unsqueeze(0)
    total = float(coactivation.sum())
    return float(coactivation.to(torch.float64)[same].sum()) / total if total else 1.0


def affinity_placement(
    loads: Sequence[Sequence[float]],
    coactivation: Sequence[Tensor],
    world_size: int,
    *,
    tolerance: float = 0.1,
    current: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Placements of consecutive layers that keep a token's experts on one rank, within a load bound.

    ``loads[l]``: per-expert load of layer ``l``; ``coactivation[l]``: ``[E, E']`` pair
    counts between layer ``l`` and ``l + 1`` (``coactivation_counts``). The objective is
    ExFlow's: the hops of a token from its expert in layer ``l`` to
    its expert in ``l + 1`` that stay on one rank. ExFlow solves an integer program; this
    is a greedy layer-by-layer heuristic with a hard balance bound:

    1. Layer 0: ``balanced_placement``.
    2. Layer ``l + 1``: ``affinity[b][p]`` = hops into ``b`` from layer-``l`` experts on
       rank ``p``. Experts in decreasing load each go to the rank of highest affinity
       among those with a free slot whose load stays within ``(1 + tolerance)`` times
       the balanced placement's busiest rank (else to the lightest rank with a free slot).

    Every layer's busiest rank stays within that bound of the load-only placement,
    except when the greedy order leaves no rank under it (then the lightest is used).
    """
    W, L = world_size, len(loads)
    if len(coactivation) != max(0, L - 1):
        raise ValueError(
            f"coactivation must hold one matrix per consecutive pair of layers ({L - 1}), "
            f"got {len(coactivation)}"
        )
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    first = balanced_placement(loads[0], W, None if current is None else current[0])
    out = [first]
    for layer in range(1, L):
        layer_loads = [float(v) for v in loads[layer]]
        E = len(layer_loads)
        El = E // W
        balanced = balanced_placement(layer_loads, W)
        bound = max(rank_loads(layer_loads, balanced, W)) * (1 + tolerance) + 1e-9
        previous, C = out[-1], coactivation[layer - 1].to(torch.float64)
        El_prev = len(previous) // W
        prev_rank = torch.tensor([s // El_prev for s in previous])
        # affinity[b, p] = sum over a on rank p of C[a, b]
        affinity = torch.zeros(E, W, dtype=torch.float64).index_add_(1, prev_rank, C.t())
        bins: list[list[int]] = [[] for _ in range(W)]
        totals = [0.0] * W
        for b in sorted(range(E), key=lambda i: (-layer_loads[i], i)):
            free = [p for p in range(W) if len(bins[p]) < El]
            within = [p for p in free if totals[p] + layer_loads[b] <= bound]
            if within:
                p = max(within, key=lambda q: (float(affinity[b, q]), -totals[q], -q))
            else:
                p = min(free, key=lambda q: (totals[q], q))
            bins[p].append(b)
            totals[p] += layer_loads[b]
        # Ranks are meaningful here (relative to the previous layer): bin p is rank p.
        slots = [-1] * E
        for p, members in enumerate(bins):
            for i, b in enumerate(sorted(members)):
                slots[b] = p * El + i
        out.append(slots)
    return out


@dataclass(frozen=True)
class PlacementAdvice:
    """Whether re-placing experts pays, by the estimate of ``advise_placement``.

    Attributes:
        placement: the proposed ``slot_of_expert``.
        rows_per_rank_before, rows_per_rank_after: predicted load per rank (current / proposed).
        experts_moved: logical experts whose rank changes.
        step_seconds_saved: predicted time saved per step (the cost model's, or the busiest
            rank's expert stage with ``seconds_per_row``).
        move_seconds: predicted time of the move (busiest rank's bytes over the link).
        pays: ``step_seconds_saved * horizon_steps > move_seconds`` and the busiest
            rank's load drops by at least ``min_gain``.
    """

    placement: list[int]
    rows_per_rank_before: list[float]
    rows_per_rank_after: list[float]
    experts_moved: int
    step_seconds_saved: float
    move_seconds: float
    pays: bool


def replica_placement(
    loads: Sequence[float],
    slot_of_expert: Sequence[int],
    world_size: int,
    per_rank: int,
    *,
    alpha: float = 1.0,
    min_chunk: float = 1,
) -> list[list[int]]:
    """Which experts each rank should keep replicas of, for per-expert ``loads`` (logical ids).

    The copies the layer's least-loaded rerouting would make for this load with at most
    ``per_rank`` copies per rank (EPLB's replication of the hottest experts, decided by
    the same algorithm that uses them): pass ``loads`` averaged over steps
    (``flexmoe.tools.rebalance.LoadTracker``) to ``MoELayer.set_replicas``.
    """
    if not isinstance(per_rank, int) or per_rank < 0:
        raise ValueError(f"per_rank must be an int >= 0, got {per_rank!r}")
    logical = {slot: e for e, slot in enumerate(slot_of_expert)}
    plan = plan_rerouting(
        slot_loads(loads, slot_of_expert),
        world_size,
        alpha=alpha,
        min_chunk=min_chunk,
        max_copies_per_rank=per_rank,
    )
    return [sorted(logical[slot] for slot in copies) for copies in plan.copies]


def advise_placement(
    loads: Sequence[float],
    current: Sequence[int],
    world_size: int,
    *,
    bytes_per_expert: float,
    seconds_per_row: float | None = None,
    step_seconds: Callable[[list[float]], float] | None = None,
    link_bytes_per_s: float,
    link_latency_s: float,
    horizon_steps: int,
    min_gain: float = 0.05,
) -> PlacementAdvice:
    """Propose ``balanced_placement(loads)`` and predict whether moving to it pays.

    A step's time under a placement: ``step_seconds(rows per slot)`` (the layer's cost
    model, ``MoELayer.placement_advice``), or, with ``seconds_per_row``, the busiest
    rank's rows times it (the expert stage waits for the busiest rank). The move sends
    every moved expert's bytes (parameters, optimizer state) once; a rank's time is its
    larger direction (sent or received) over the link, plus one latency per tensor
    exchanged (approximated by 8).
    It pays if the saving over ``horizon_steps`` (the steps until the next re-plan)
    exceeds the move. Loads per rank ignore rerouting: with rerouting on, placement
    lowers the copies a step needs rather than the step's critical path.
    """
    new = balanced_placement(loads, world_size, current)
    before = rank_loads(loads, current, world_size)
    after = rank_loads(loads, new, world_size)
    moved = moved_experts(current, new, world_size)
    El = len(loads) // world_size
    out, inc = [0] * world_size, [0] * world_size
    for e in moved:
        out[current[e] // El] += 1
        inc[new[e] // El] += 1
    busiest = max(max(o, i) for o, i in zip(out, inc, strict=True)) if moved else 0
    move_seconds = busiest * bytes_per_expert / link_bytes_per_s + (8 * link_latency_s if moved else 0.0)
    if step_seconds is not None:
        saved = step_seconds(slot_loads(loads, current)) - step_seconds(slot_loads(loads, new))
    elif seconds_per_row is not None:
        saved = (max(before) - max(after)) * seconds_per_row
    else:
        raise ValueError("advise_placement needs step_seconds (a cost model) or seconds_per_row")
    relative = (max(before) - max(after)) / max(before) if max(before) > 0 else 0.0
    pays = bool(moved) and relative >= min_gain and saved * horizon_steps > move_seconds
    return PlacementAdvice(new, before, after, len(moved), saved, move_seconds, pays)


class LoadTracker:
    """Moving average of routed rows per logical expert (bias-corrected like Adam's moments).

    ``update(counts)`` after each step, e.g. with ``layer.stats.routed_per_expert``
    (global counts, the same on every rank, so every rank's average is the same and
    plans made from it agree). ``loads`` is the average: ``sum_i decay^(n-i) c_i`` over
    ``sum_i decay^(n-i)``.
    """

    def __init__(self, num_experts: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.decay = decay
        self._sum = torch.zeros(num_experts, dtype=torch.float64)
        self._weight = 0.0
        self.steps = 0

    def update(self, counts: Tensor | Sequence[int]) -> None:
        """Add one step's per-expert counts."""
        c = torch.as_tensor(counts, dtype=torch.float64).cpu()
        if c.shape != self._sum.shape:
            raise ValueError(f"counts must have shape {tuple(self._sum.shape)}, got {tuple(c.shape)}")
        self._sum = self.decay * self._sum + c
        self._weight = self.decay * self._weight + 1.0
        self.steps += 1

    @property
    def loads(self) -> list[float]:
        """The average rows per expert (zeros before the first update)."""
        if self._weight == 0:
            return [0.0] * self._sum.numel()
        average: list[float] = (self._sum / self._weight).tolist()
        return average
