"""Where experts live on ``W`` ranks, and where each step's rows travel under a plan.

Legend: W ranks, E global experts, F expert hidden dim, S = W/E shards per expert
(``E < W``), El = E/W experts per rank (``E >= W``), r the plan's sharing degree,
g = S/r ranks per all-gather group, d the pipelining degree.

Storage never depends on the plan:
- ``E >= W``: rank ``p`` stores experts ``p*El .. (p+1)*El - 1`` whole.
- ``E < W``: rank ``p`` stores shard ``s = p % S`` of expert ``e = p // S``: hidden
  units ``s*F/S .. (s+1)*F/S - 1`` of the first projection (gate and up halves alike)
  and the matching columns of the second. The output bias lives on shard 0.

A plan only decides who computes what this step (see ``Placement.targets``): with
``r >= 1`` each group of ``g`` consecutive shard ranks of an expert gathers its ``g``
shards into one hidden slice of ``F/r`` units and splits the expert's rows ``g``
ways; the ``r`` groups each see every row and their partial outputs are summed.
``r = 0`` gathers every expert everywhere and exchanges no rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from flexmoe.config import Plan
from flexmoe.parallel.comm import gather_index

__all__ = [
    "Chunk",
    "Placement",
    "PlacementAdvice",
    "advise_placement",
    "affinity_placement",
    "balanced_placement",
    "build_chunks",
    "check_placement",
    "coactivation_counts",
    "experts_by_rank",
    "identity_placement",
    "moved_experts",
    "plan_pieces",
    "rank_loads",
    "replica_placement",
    "same_rank_fraction",
    "slot_loads",
    "split_sizes",
]


def split_sizes(count: int, parts: int) -> list[int]:
    """``count`` rows cut into ``parts`` contiguous pieces, sizes differing by at most one."""
    base, extra = divmod(count, parts)
    return [base + (i < extra) for i in range(parts)]


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


@dataclass(frozen=True)
class Placement:
    """The fixed assignment of expert storage to ranks (see the module docstring)."""

    world_size: int
    rank: int
    num_experts: int
    hidden_dim: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        W, E = self.world_size, self.num_experts
        if E >= W and E % W != 0:
            raise ValueError(
                f"num_experts={E} must be a multiple of the world size {W} (each rank owns E/W whole "
                f"experts), or a divisor of it (experts sharded W/E ways)"
            )
        if E < W and W % E != 0:
            raise ValueError(
                f"the world size {W} must be a multiple of num_experts={E} to shard each expert W/E ways"
            )
        if E < W and self.hidden_dim % (W // E) != 0:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be divisible by the shards per expert W/E={W // E}"
            )
        if self.ranks_per_node < 1 or W % self.ranks_per_node != 0:
            raise ValueError(
                f"ranks_per_node must be a positive divisor of the world size {W}, got {self.ranks_per_node}"
            )

    @property
    def sharded(self) -> bool:
        """Whether experts are split across ranks (``E < W``)."""
        return self.num_experts < self.world_size

    @property
    def shards(self) -> int:
        """``S``: ranks per expert (1 unless sharded)."""
        return self.world_size // self.num_experts if self.sharded else 1

    @property
    def local_experts(self) -> int:
        """Experts (or expert shards) stored on this rank."""
        return 1 if self.sharded else self.num_experts // self.world_size

    @property
    def local_hidden_dim(self) -> int:
        """Hidden units of each stored expert (shard)."""
        return self.hidden_dim // self.shards

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first stored expert."""
        return self.rank // self.shards if self.sharded else self.rank * self.local_experts

    @property
    def shard_index(self) -> int:
        """Which shard of its expert this rank stores (0 unless sharded)."""
        return self.rank % self.shards

    def valid_r(self) -> list[int]:
        """The sharing degrees a plan may use: ``0`` and the divisors of ``S``."""
        return [0, *_divisors(self.shards)]

    def resolve(self, plan: Plan) -> Plan:
        """``plan`` with ``r`` filled in (default ``S``: rows move, weights never do), validated."""
        r = self.shards if plan.r is None else plan.r
        if r not in self.valid_r():
            raise ValueError(
                f"plan.r must be one of {self.valid_r()} for {self.num_experts} experts on "
                f"{self.world_size} ranks (0 or a divisor of S={self.shards}), got {plan.r}"
            )
        reroutable = not self.sharded and r == 1
        if plan.reroute and not reroutable:
            raise ValueError(
                "plan.reroute=True needs expert parallelism with whole experts (num_experts >= world "
                f"size) and r=1; got {self.num_experts} experts on {self.world_size} ranks, r={r}"
            )
        if r == 0:  # no rows are exchanged: nothing to pipeline
            return Plan(r=0, d=1, exchange="flat", reroute=False)
        return Plan(r=r, d=plan.d, exchange=plan.exchange, reroute=plan.reroute if reroutable else False)

    def group_size(self, r: int) -> int:
        """``g``: ranks whose shards one all-gather group joins (``r = 0``: the whole world)."""
        return self.world_size if r == 0 else self.shards // r

    def gather_group(self, r: int) -> list[int]:
        """The ranks this rank gathers weight shards from under sharing degree ``r``."""
        if r == 0:
            return list(range(self.world_size))
        g = self.group_size(r)
        first = self.rank // g * g
        return list(range(first, first + g))

    def targets(self, expert: int, r: int) -> list[tuple[int, int, int]]:
        """``(rank, local unit, member)`` for every rank computing ``expert``'s rows, by rank.

        ``member`` picks which of the ``g`` parts of a source's rows that rank takes.
        """
        if not self.sharded:
            El = self.local_experts
            return [(expert // El, expert % El, 0)]
        S, g = self.shards, self.group_size(r)
        return [(expert * S + j * g + m, 0, m) for j in range(r) for m in range(g)]

    def local_slice(self, name: str, full: Tensor, gated: bool) -> Tensor | None:
        """The stored part of the single-device expert parameter ``name`` on this rank.

        ``name`` is ``w_in``, ``w_out``, ``b_in`` or ``b_out``; ``None`` where this rank
        stores none of it.
        """
        if not self.sharded:
            return full[self.first_expert : self.first_expert + self.local_experts]
        return self.shard_of(name, full[self.first_expert : self.first_expert + 1], gated)

    def shard_of(self, name: str, one: Tensor, gated: bool) -> Tensor | None:
        """The rank's hidden shard of one whole expert's ``name`` (``one``: ``[1, ...]``)."""
        s, F_loc = self.shard_index, self.local_hidden_dim
        if name in ("w_in", "b_in"):
            if gated:
                halves: Tensor = one.unflatten(1, (2, self.hidden_dim))
                return halves[:, :, s * F_loc : (s + 1) * F_loc].flatten(1, 2)
            return one[:, s * F_loc : (s + 1) * F_loc]
        if name == "w_out":
            return one[:, :, s * F_loc : (s + 1) * F_loc]
        return one if s == 0 else None


@dataclass
class Chunk:
    """One pipelined piece of a step's exchange, as seen by this rank.

    Attributes:
        send_index: rows of this rank's expert-major ``x_N`` to send, ordered by destination
            (a row appears once per rank that computes with it).
        send_splits, recv_splits: rows to / from each rank.
        matrix: ``matrix[q][p]``, rows rank ``q`` sends rank ``p`` (every rank's view agrees).
        recv_perm: received row feeding each unit-major row, or ``None`` if already in order.
        unit_counts: rows per local unit (expert or expert slice), unit-major.
    """

    send_index: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    matrix: list[list[int]]
    recv_perm: Tensor | None
    unit_counts: list[int]


Piece = tuple[int, int, int, int]  # (destination rank, its unit, start in the segment, rows)


def plan_pieces(placement: Placement, kept: list[list[int]], r: int) -> PiecesFn:
    """Where each source's rows of each expert go under sharing degree ``r`` (no rerouting).

    To the expert's owner, or split ``g`` ways among a gather group, once per group.
    """
    targets = [placement.targets(e, r) for e in range(placement.num_experts)]
    g = 1 if not placement.sharded else placement.group_size(r)

    def pieces(q: int, e: int) -> list[Piece]:
        parts = split_sizes(kept[q][e], g)
        starts = (0, *accumulate(parts))
        return [(dest, unit, starts[member], parts[member]) for dest, unit, member in targets[e]]

    return pieces


PiecesFn = Callable[[int, int], list[Piece]]


def build_chunks(
    world_size: int,
    rank: int,
    kept: list[list[int]],
    pieces: PiecesFn,
    units: int,
    d: int,
    device: torch.device,
) -> list[Chunk]:
    """Routes of one step, cut into ``d`` chunks.

    ``kept[q][e]`` is the number of rows source ``q`` keeps for expert ``e`` (its
    expert-major rows are the segments ``e = 0, 1, ...``); ``pieces(q, e)`` says which
    part of that segment goes to which rank's unit; this rank computes ``units`` units.
    Every rank computes the same global picture from the same ``kept`` (exchanged with
    the routing metadata), so no count exchange precedes the row exchange.
    """
    W, me = world_size, rank
    E = len(kept[0]) if kept else 0
    matrices = [[[0] * W for _ in range(W)] for _ in range(d)]
    send_segments: list[tuple[list[int], list[int]]] = [([], []) for _ in range(d)]
    recv_sizes = [[[0] * units for _ in range(W)] for _ in range(d)]  # [chunk][source][unit]
    for q in range(W):
        offsets = (0, *accumulate(kept[q]))
        # Sent ordered by destination, then its unit, then position.
        ordered = sorted(
            (dest, unit, offsets[e] + start, rows)
            for e in range(E)
            for dest, unit, start, rows in pieces(q, e)
            if rows
        )
        for dest, unit, start, rows in ordered:
            for i, size in enumerate(split_sizes(rows, d)):
                matrices[i][q][dest] += size
                if q == me and size:
                    send_segments[i][0].append(start)
                    send_segments[i][1].append(size)
                if dest == me:
                    recv_sizes[i][q][unit] += size
                start += size
    chunks = []
    for i in range(d):
        sizes = recv_sizes[i]
        perm = None
        if units > 1:
            flat = [sizes[q][u] for q in range(W) for u in range(units)]
            starts_flat = [0, *accumulate(flat)]
            order = [q * units + u for u in range(units) for q in range(W)]
            perm = gather_index([starts_flat[j] for j in order], [flat[j] for j in order], device)
        chunks.append(
            Chunk(
                send_index=gather_index(send_segments[i][0], send_segments[i][1], device),
                send_splits=list(matrices[i][me]),
                recv_splits=[matrices[i][q][me] for q in range(W)],
                matrix=matrices[i],
                recv_perm=perm,
                unit_counts=[sum(sizes[q][u] for q in range(W)) for u in range(units)],
            )
        )
    return chunks


# ---------------------------------------------------------------------------------------
# Re-placing experts between steps (E >= W, whole experts).
#
# A *placement* is a permutation ``slot_of_expert[e]``: logical expert ``e`` (the id the
# router picks, the index in single-device tensors and checkpoints) is stored in physical
# slot ``s``, on rank ``s // El`` at local index ``s % El``. The identity is the storage
# described in the module docstring. The functions below are pure: every rank computes
# the same placement from the same (global) inputs, without communicating.
# ---------------------------------------------------------------------------------------


def identity_placement(num_experts: int) -> list[int]:
    """The initial placement: expert ``e`` in slot ``e``."""
    return list(range(num_experts))


def check_placement(slot_of_expert: Sequence[int], num_experts: int, world_size: int) -> list[int]:
    """``slot_of_expert`` as a list of ints, or ``ValueError`` unless it is a permutation of ``range(E)``."""
    slots = [int(s) for s in slot_of_expert]
    if sorted(slots) != list(range(num_experts)):
        raise ValueError(
            f"a placement must be a permutation of range(num_experts={num_experts}) "
            f"(slot of each logical expert), got {slots}"
        )
    if num_experts % world_size != 0:
        raise ValueError(
            f"placements need whole experts on every rank: num_experts={num_experts} is not a multiple "
            f"of the world size {world_size}"
        )
    return slots


def experts_by_rank(slot_of_expert: Sequence[int], world_size: int) -> list[list[int]]:
    """``[rank][local index]``: the logical expert in each slot."""
    El = len(slot_of_expert) // world_size
    out = [[-1] * El for _ in range(world_size)]
    for e, s in enumerate(slot_of_expert):
        out[s // El][s % El] = e
    return out


def rank_loads(loads: Sequence[float], slot_of_expert: Sequence[int], world_size: int) -> list[float]:
    """Rows (or any per-expert load) each rank computes under a placement, without rerouting."""
    El = len(loads) // world_size
    out = [0.0] * world_size
    for e, s in enumerate(slot_of_expert):
        out[s // El] += float(loads[e])
    return out


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
    ExFlow's (algorithms.md §4): the hops of a token from its expert in layer ``l`` to
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


def slot_loads(loads: Sequence[float], slot_of_expert: Sequence[int]) -> list[float]:
    """Per-expert ``loads`` in physical slot order (what the layer's exchange sees)."""
    out = [0.0] * len(loads)
    for e, slot in enumerate(slot_of_expert):
        out[slot] = float(loads[e])
    return out


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
    (``flexmoe.parallel.rebalance.LoadTracker``) to ``MoELayer.set_replicas``.
    """
    from flexmoe.parallel.rerouting import plan_rerouting

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


def moved_experts(old: Sequence[int], new: Sequence[int], world_size: int) -> list[int]:
    """Logical experts whose rank differs between two placements."""
    El = len(old) // world_size
    return [e for e in range(len(old)) if old[e] // El != new[e] // El]


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
