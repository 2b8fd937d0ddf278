"""Least-loaded rerouting (LLEP's least-loaded assignment, with hard memory bounds), and its cost summary.

Under skewed routing the rank owning a hot expert computes far more rows than the
others and sets the pace of every step. Rerouting keeps the routing (the layer's
output is unchanged) but lets other ranks compute part of a hot expert's rows with a
copy of its weights; the copies' gradients are summed back onto the owner.

``plan_rerouting`` is a pure function of the global per-expert row counts, so every
rank computes the same plan without communicating. Each expert's rows are cut into
intervals (how many rows each rank computes, the owner's share first); which rows fill
a share is ``reroute_pieces``'s choice: a rank's own rows of the expert first, so they
do not travel. The algorithm (LLA, from LLEP):

1. ``cap = ceil(alpha * total / W)``; ``pending[p]`` = rows of the experts ``p`` owns
   that are not yet placed; experts are placed in decreasing load.
2. The owner keeps what fits under ``cap`` (counting what it already took and what it
   still owns); the rest spills to the other ranks in increasing order of load, each
   taking what fits under its own ``cap`` — a chunk is taken only if it is at least
   ``min_chunk`` rows or the whole remainder, and only by a rank that may hold another
   copy.
3. A remainder nobody can take under ``cap`` goes to the least-loaded ranks that still
   have room under ``max_rows_per_rank``.

**Shadowing** (``sources`` given: each rank's rows of each expert). Before step 2, hot
experts may be *shadowed*, FasterMoE's answer to the same skew: while an expert's owner
is above ``cap`` (experts in decreasing load), every other rank computes its own rows
of that expert with a copy of its weights (as many as fit under its ``cap`` and the
bounds), so none of them travel; the owner keeps the rest. Shadowing trades more
copies (up to ``W - 1`` per expert) for no row traffic; LLA then places what is left.
Which of the two pays is the cost model's call (``flexmoe.planner.simulate``).

Unlike the published algorithm, the memory bounds are hard: no rank computes more than
``max_rows_per_rank`` rows (when set) or holds more than ``max_copies_per_rank``
copies; a step that cannot satisfy them raises ``ValueError`` naming the bound.

The same function plans the layer's steps (integer rows) and the simulator's
(``expected_rerouting``: expected rows, floats, up to thousands of ranks); a heap keeps
the least-loaded rank at hand, so a plan costs ``O((E + chunks) log W)``. The tests
check it against a plain re-sorting reference (tests/reference.py).

``Rerouting`` is what the cost model needs of a plan: rows per rank and which expert
copies go where (``summarize``).

Legend: W ranks, E experts, El experts per rank (expert ``e`` lives on rank ``e // El``).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flexmoe.config import RerouteConfig
from flexmoe.placement import ReroutePlan

__all__ = ["Rerouting", "decide_rerouting", "expected_rerouting", "plan_rerouting", "summarize"]


def plan_rerouting(
    loads: Sequence[float],
    world_size: int,
    *,
    alpha: float = 1.0,
    min_chunk: float = 1,
    max_rows_per_rank: float | None = None,
    max_copies_per_rank: int | None = None,
    held: Sequence[Sequence[int]] | None = None,
    sources: Sequence[Sequence[float]] | None = None,
) -> ReroutePlan:
    """The least-loaded assignment of expert rows to ranks (see the module docstring).

    ``sources[q][e]``: rows of expert ``e`` that come from rank ``q`` (summing to
    ``loads[e]``): given, hot experts are shadowed first (see the module docstring).

    ``held[p]``: experts whose copies rank ``p`` already holds (persistent replicas): a
    piece given to such a rank needs no transfer, and they count towards its
    ``max_copies_per_rank`` whether used or not (they occupy its memory).

    ``loads`` are row counts (ints: the layer) or expected rows (floats: the planner);
    arithmetic stays in their type. The least-loaded rank comes from a heap keyed by
    ``(load, rank)`` (entries go stale when a rank's load changes and are skipped), so
    a plan costs ``O((E + chunks) log W)``, not a sort of the ranks per chunk.
    """
    E, W = len(loads), world_size
    if E % W != 0:
        raise ValueError(f"rerouting needs whole experts per rank: {E} experts on {W} ranks")
    if alpha < 1.0:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    El = E // W
    total = sum(loads)
    native = [sum(loads[p * El : (p + 1) * El]) for p in range(W)]
    limit = math.inf if max_rows_per_rank is None else max_rows_per_rank
    copy_limit = math.inf if max_copies_per_rank is None else max_copies_per_rank
    if total > W * limit:
        raise ValueError(
            f"max_rows_per_rank={max_rows_per_rank} cannot hold this step's {total} rows on {W} ranks"
        )
    cap = min(math.ceil(alpha * total / W), limit)
    pending = list(native)  # rows of each rank's own experts not yet placed
    assigned = [0 * total] * W
    copies: list[set[int]] = [set() for _ in range(W)]
    kept = [set(h) for h in held] if held is not None else [set() for _ in range(W)]
    if len(kept) != W:
        raise ValueError(f"held must list the replicas of each of the {W} ranks, got {len(kept)} lists")

    slots = [len(k) for k in kept]  # len(copies[p] | kept[p]): the copies rank p holds

    def full(p: int, e: int) -> bool:  # may rank p not take a piece of e (no room for its copy)?
        return slots[p] >= copy_limit and e not in copies[p] and e not in kept[p]

    intervals: list[list[tuple[int, float, float]]] = [[] for _ in range(E)]
    transfers: list[tuple[int, int]] = []
    heap = [(native[p], p) for p in range(W)]  # (assigned + pending, rank), possibly stale
    heapq.heapify(heap)

    def load_of(p: int) -> float:
        return assigned[p] + pending[p]

    def give(e: int, rank: int, start: float, size: float, push: bool = True) -> None:
        intervals[e].append((rank, start, start + size))
        assigned[rank] += size
        if rank != e // El and e not in copies[rank]:
            copies[rank].add(e)
            if e not in kept[rank]:
                transfers.append((e, rank))
                slots[rank] += 1
        if push:
            heapq.heappush(heap, (load_of(rank), rank))

    order = sorted(range(E), key=lambda i: (-loads[i], i))
    shadowed: dict[int, list[tuple[int, float]]] = {}
    remaining = list(loads)
    if sources is not None:
        if len(sources) != W or any(len(row) != E for row in sources):
            raise ValueError(f"sources must be {W} lists of {E} row counts (one per rank and expert)")
        for e, column in enumerate(zip(*sources, strict=True)):
            if abs(sum(column) - loads[e]) > 1e-9 * max(1, abs(loads[e])):
                raise ValueError(f"sources of expert {e} sum to {sum(column)}, not its load {loads[e]}")
        for e in order:
            load, owner = loads[e], e // El
            if load_of(owner) <= cap:
                continue  # its owner is not overloaded (any more)
            takes: list[tuple[int, float]] = []
            for q in range(W):
                own = sources[q][e]
                if q == owner or own <= 0 or full(q, e):
                    continue
                take = min(own, cap - load_of(q))
                if take > 0 and (take >= min_chunk or take == own):
                    takes.append((q, take))
            if not takes:
                continue
            shadowed[e] = takes
            taken = sum(t for _, t in takes)
            pending[owner] -= taken
            offset = remaining[e] = load - taken  # the rest: [0, remaining), placed below
            for q, take in takes:
                give(e, q, offset, take, push=False)
                offset += take
        heap = [(load_of(p), p) for p in range(W)]
        heapq.heapify(heap)

    for e in order:
        load, owner = remaining[e], e // El  # a shadowed expert: the rows left to place
        pending[owner] -= load
        heapq.heappush(heap, (load_of(owner), owner))
        room = cap - assigned[owner] - pending[owner]
        keep = min(load, room) if room > 0 else 0 * load
        if keep or (load == 0 and e not in shadowed):
            give(e, owner, 0 * load, keep)
        offset, remainder = keep, load - keep
        # Spill to the least-loaded ranks that may hold another copy.
        while remainder > 0:
            popped: list[tuple[float, int]] = []
            taken = False
            while heap:
                key, p = heapq.heappop(heap)
                if key != load_of(p):
                    continue  # stale: the rank's current entry is also in the heap
                popped.append((key, p))
                if p == owner or full(p, e):
                    continue
                chunk = min(remainder, cap - key)
                if chunk > 0 and (chunk >= min_chunk or chunk == remainder):
                    give(e, p, offset, chunk)
                    offset, remainder = offset + chunk, remainder - chunk
                    taken = True
                    break
                if chunk <= 0:
                    break  # every rank after this one is at least as full
            for item in popped:
                heapq.heappush(heap, item)
            if not taken:
                break
        # What nobody could take under cap: the least-loaded ranks with room under the hard
        # bound (the owner included; it needs no copy).
        while remainder > 0:
            eligible = [p for p in range(W) if load_of(p) < limit and (p == owner or not full(p, e))]
            if not eligible:
                raise ValueError(
                    f"rerouting cannot place expert {e}'s rows within max_rows_per_rank="
                    f"{max_rows_per_rank} and max_copies_per_rank={max_copies_per_rank}"
                )
            p = min(eligible, key=lambda q: (load_of(q), q != owner, q))
            chunk = min(remainder, limit - load_of(p))
            give(e, p, offset, chunk)
            offset, remainder = offset + chunk, remainder - chunk
        intervals[e] = _merge(sorted(intervals[e], key=lambda piece: piece[1]))
    return ReroutePlan(
        intervals=intervals,
        copies=[sorted(c) for c in copies],
        rows_per_rank=assigned,
        native_rows_per_rank=native,
        moved_rows=sum(b - a for e in range(E) for p, a, b in intervals[e] if p != e // El),
        transfers=transfers,
        shadowed=dict(sorted(shadowed.items())),
    )


def _merge(pieces: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """Join adjacent pieces of one rank (a remainder forced onto the rank that took the last chunk)."""
    merged: list[tuple[int, float, float]] = []
    for rank, start, stop in pieces:
        if merged and merged[-1][0] == rank and merged[-1][2] == start:
            merged[-1] = (rank, merged[-1][1], stop)
        elif stop > start or not merged:
            merged.append((rank, start, stop))
    return merged


@dataclass(frozen=True)
class Rerouting:
    """The outcome of one rerouting plan.

    Attributes:
        rows_R: rows each rank computes.
        native_rows_R: rows each rank would compute without rerouting.
        copies_R: expert copies each rank receives.
        transfers: ``(expert, receiving rank)`` of every copy, in the order they were made.
        experts_per_rank: ``El``.
        shadow_rows_R: rows of shadowed experts each rank computes (zero without shadowing).
        shadow_local_R: of those, the rows that come from the rank's own tokens.
    """

    rows_R: NDArray[np.float64]
    native_rows_R: NDArray[np.float64]
    copies_R: NDArray[np.int64]
    transfers: tuple[tuple[int, int], ...]
    experts_per_rank: int
    shadow_rows_R: NDArray[np.float64] | None = None
    shadow_local_R: NDArray[np.float64] | None = None

    def received_rows(self) -> NDArray[np.float64]:
        """Rows each rank receives from other ranks, sources spread evenly.

        Of an expert that is not shadowed a rank computes ``1/W`` of the rows from its
        own tokens (the rest arrive); of a shadowed one, its own rows are known.
        """
        W = self.rows_R.size
        if self.shadow_rows_R is None or self.shadow_local_R is None:
            return self.rows_R * (W - 1) / W
        plain = self.rows_R - self.shadow_rows_R
        return plain * (W - 1) / W + self.shadow_rows_R - self.shadow_local_R

    @property
    def num_copies(self) -> int:
        """Expert copies sent in total."""
        return len(self.transfers)

    @functools.cached_property
    def transfers_T2(self) -> NDArray[np.int64]:
        """``transfers`` as an int array ``[copies, 2]`` (expert, receiving rank)."""
        return np.asarray(self.transfers, dtype=np.int64).reshape(-1, 2)

    @property
    def units_R(self) -> NDArray[np.int64]:
        """Expert GEMM groups per rank: its own experts and its copies."""
        return self.copies_R + self.experts_per_rank


def expected_rerouting(
    loads_E: Sequence[float] | NDArray[np.float64],
    world_size: int,
    *,
    alpha: float = 1.0,
    min_chunk: float = 1.0,
    max_rows_per_rank: float | None = None,
    max_copies_per_rank: int | None = None,
    shadow: bool = False,
) -> Rerouting:
    """``plan_rerouting`` on expected rows ``loads_E``, summarised for the cost model.

    ``shadow``: the layer's shadowing plan, every source holding ``1/W`` of each
    expert's rows (the simulator's assumption about where rows come from).
    Raises ``ValueError`` when the bounds cannot hold the step (as the layer does).
    """
    loads = [float(x) for x in loads_E]
    W = world_size
    plan = plan_rerouting(
        loads,
        W,
        alpha=alpha,
        min_chunk=min_chunk,
        max_rows_per_rank=max_rows_per_rank,
        max_copies_per_rank=max_copies_per_rank,
        sources=[[x / W for x in loads]] * W if shadow else None,
    )
    return summarize(plan, loads, W)


def summarize(
    plan: ReroutePlan,
    loads_E: Sequence[float],
    world_size: int,
    *,
    own_rows: Callable[[int, int], float] | None = None,
    transfers: Sequence[tuple[int, int]] | None = None,
) -> Rerouting:
    """The cost model's summary of one of the layer's plans.

    ``own_rows(rank, expert)``: rows of ``expert`` that come from ``rank``'s own tokens
    (default: ``1/W`` of its load, the simulator's assumption). ``transfers``: the copies
    that travel (default ``plan.transfers``: held replicas do not; a training step sends
    them anyway, so the layer passes every copy then).
    """
    loads = [float(x) for x in loads_E]
    W = world_size
    El = len(loads) // W
    if own_rows is None:

        def own_rows(rank: int, e: int) -> float:
            return loads[e] / W

    shadow_rows, shadow_local = np.zeros(W), np.zeros(W)
    for e, takes in plan.shadowed.items():
        for rank, start, stop in plan.intervals[e]:
            shadow_rows[rank] += stop - start
        for rank, rows in takes:  # a shadowing rank's rows are its own ...
            shadow_local[rank] += rows
        owner = e // El  # ... and the owner computes its own first
        computed = sum(b - a for p, a, b in plan.intervals[e] if p == owner)
        shadow_local[owner] += min(own_rows(owner, e), computed)
    return Rerouting(
        rows_R=np.asarray(plan.rows_per_rank, dtype=np.float64),
        native_rows_R=np.asarray(plan.native_rows_per_rank, dtype=np.float64),
        copies_R=np.asarray([len(c) for c in plan.copies], dtype=np.int64),
        transfers=tuple(plan.transfers if transfers is None else transfers),
        experts_per_rank=El,
        shadow_rows_R=shadow_rows,
        shadow_local_R=shadow_local,
    )


def decide_rerouting(
    loads: Sequence[int],
    world_size: int,
    config: RerouteConfig,
    forced: bool | str | None,
    *,
    sources: Sequence[Sequence[int]],
    held: Sequence[Sequence[int]] | None,
    predict: Callable[[ReroutePlan | None], float],
) -> ReroutePlan | None:
    """The step's rerouting: the forced kind, or the kind the cost model predicts pays, or none.

    ``loads``: kept rows per expert (storage order) over every rank; ``sources[q][e]``:
    rank ``q``'s share of them; ``held``: each rank's persistent replicas; ``forced``:
    ``Plan.reroute`` (``True`` is ``"lla"``; ``None`` lets ``config`` decide);
    ``predict(plan)``: the step's predicted seconds under a rerouting plan (``None``:
    plain expert parallelism).

    1. Plan each kind allowed (the forced one, else ``config.kinds``); a forced kind whose
       bounds cannot hold the step raises ``ValueError``, an unforced one is skipped.
    2. Forced: its plan. Unforced: nothing below ``config.threshold`` (the busiest rank's
       rows over the mean); else the fastest predicted kind, if it saves at least
       ``config.min_gain`` of plain expert parallelism's time.
    """
    if forced is False or (forced is None and not config.enabled):
        return None
    kinds = config.kinds if forced is None else ("lla",) if forced is True else (str(forced),)
    plans: dict[str, ReroutePlan] = {}
    for kind in kinds:
        try:
            candidate = plan_rerouting(
                loads,
                world_size,
                alpha=config.alpha,
                min_chunk=config.min_chunk,
                max_rows_per_rank=config.max_rows_per_rank,
                max_copies_per_rank=config.max_copies_per_rank,
                held=held,
                sources=sources if kind == "shadow" else None,
            )
        except ValueError:
            if forced is not None:
                raise
            continue  # the bounds cannot hold this step this way
        if candidate.moved_rows and (kind == "lla" or candidate.shadowed or forced is not None):
            plans[kind] = candidate
    if forced is not None or not plans:
        return next(iter(plans.values()), None)
    if next(iter(plans.values())).imbalance_before < config.threshold:
        return None
    times = {kind: predict(plan) for kind, plan in plans.items()}
    best = min(times, key=lambda kind: times[kind])
    return plans[best] if times[best] <= predict(None) * (1.0 - config.min_gain) else None
