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
    limit = math.inf if max_rows_per_rank is None else max_rows_per_rank
    total = sum(loads)
    if total > W * limit:
        raise ValueError(
            f"max_rows_per_rank={max_rows_per_rank} cannot hold this step's {total} rows on {W} ranks"
        )
    if held is not None and len(held) != W:
        raise ValueError(f"held must list the replicas of each of the {W} ranks, got {len(held)} lists")
    if sources is not None:
        _check_sources(sources, loads, W)
    # 1. the per-rank target, and experts in decreasing load
    cap = min(math.ceil(alpha * total / W), limit)
    state = _Assignment(loads, W, max_rows_per_rank, max_copies_per_rank, held, min_chunk)
    order = sorted(range(E), key=lambda i: (-loads[i], i))
    remaining = list(loads)
    if sources is not None:  # shadowing: hot experts' other sources compute their own rows
        remaining = state.shadow(order, sources, cap)
    for e in order:
        state.place(e, remaining[e], cap)
    return state.plan()


def _check_sources(sources: Sequence[Sequence[float]], loads: Sequence[float], W: int) -> None:
    E = len(loads)
    if len(sources) != W or any(len(row) != E for row in sources):
        raise ValueError(f"sources must be {W} lists of {E} row counts (one per rank and expert)")
    for e, column in enumerate(zip(*sources, strict=True)):
        if abs(sum(column) - loads[e]) > 1e-9 * max(1, abs(loads[e])):
            raise ValueError(f"sources of expert {e} sum to {sum(column)}, not its load {loads[e]}")


class _Assignment:
    """The state of one ``plan_rerouting`` call: rows given so far, copies, the least-loaded heap."""

    def __init__(
        self,
        loads: Sequence[float],
        W: int,
        max_rows_per_rank: float | None,
        max_copies_per_rank: int | None,
        held: Sequence[Sequence[int]] | None,
        min_chunk: float,
    ) -> None:
        E = len(loads)
        self.loads, self.W, self.El, self.min_chunk = loads, W, E // W, min_chunk
        self.bounds = (max_rows_per_rank, max_copies_per_rank)
        self.limit = math.inf if max_rows_per_rank is None else max_rows_per_rank
        self.copy_limit = math.inf if max_copies_per_rank is None else max_copies_per_rank
        zero = 0 * sum(loads)  # keeps the loads' type (ints for the layer)
        self.native = [sum(loads[p * self.El : (p + 1) * self.El]) for p in range(W)]
        self.pending = list(self.native)  # rows of each rank's own experts not yet placed
        self.assigned = [zero] * W
        self.copies: list[set[int]] = [set() for _ in range(W)]
        self.kept = [set(h) for h in held] if held is not None else [set() for _ in range(W)]
        self.slots = [len(k) for k in self.kept]  # len(copies[p] | kept[p]): the copies rank p holds
        self.intervals: list[list[tuple[int, float, float]]] = [[] for _ in range(E)]
        self.transfers: list[tuple[int, int]] = []
        self.shadowed: dict[int, list[tuple[int, float]]] = {}
        self.heap = [(self.native[p], p) for p in range(W)]  # (load, rank), possibly stale
        heapq.heapify(self.heap)

    def load_of(self, p: int) -> float:
        """Rows rank ``p`` computes so far plus its own rows still to place."""
        return self.assigned[p] + self.pending[p]

    def full(self, p: int, e: int) -> bool:
        """Whether rank ``p`` may not take a piece of ``e`` (no room for another copy)."""
        return self.slots[p] >= self.copy_limit and e not in self.copies[p] and e not in self.kept[p]

    def give(self, e: int, rank: int, start: float, size: float, push: bool = True) -> None:
        """Rows ``[start, start + size)`` of expert ``e`` to ``rank`` (a copy if it is not the owner)."""
        self.intervals[e].append((rank, start, start + size))
        self.assigned[rank] += size
        if rank != e // self.El and e not in self.copies[rank]:
            self.copies[rank].add(e)
            if e not in self.kept[rank]:
                self.transfers.append((e, rank))
                self.slots[rank] += 1
        if push:
            heapq.heappush(self.heap, (self.load_of(rank), rank))

    def shadow(self, order: list[int], sources: Sequence[Sequence[float]], cap: float) -> list[float]:
        """Shadow hot experts (see the module docstring); returns each expert's rows left to place."""
        remaining = list(self.loads)
        for e in order:
            owner = e // self.El
            if self.load_of(owner) <= cap:
                continue  # its owner is not overloaded (any more)
            takes: list[tuple[int, float]] = []
            for q in range(self.W):
                own = sources[q][e]
                if q == owner or own <= 0 or self.full(q, e):
                    continue
                take = min(own, cap - self.load_of(q))
                if take > 0 and (take >= self.min_chunk or take == own):
                    takes.append((q, take))
            if not takes:
                continue
            self.shadowed[e] = takes
            taken = sum(t for _, t in takes)
            self.pending[owner] -= taken
            offset = remaining[e] = remaining[e] - taken  # the rest: [0, remaining), placed later
            for q, take in takes:
                self.give(e, q, offset, take, push=False)
                offset += take
        self.heap = [(self.load_of(p), p) for p in range(self.W)]
        heapq.heapify(self.heap)
        return remaining

    def place(self, e: int, load: float, cap: float) -> None:
        """Steps 2-3 for expert ``e``'s ``load`` rows left to place."""
        owner = e // self.El
        self.pending[owner] -= load
        heapq.heappush(self.heap, (self.load_of(owner), owner))
        room = cap - self.assigned[owner] - self.pending[owner]
        keep = min(load, room) if room > 0 else 0 * load
        if keep or (load == 0 and e not in self.shadowed):
            self.give(e, owner, 0 * load, keep)
        offset = self._spill(e, keep, load - keep, cap)
        self._overflow(e, offset, load - offset)
        self.intervals[e] = _merge(sorted(self.intervals[e], key=lambda piece: piece[1]))

    def _spill(self, e: int, offset: float, remainder: float, cap: float) -> float:
        """Step 2: spill to the least-loaded ranks that may hold a copy; returns the rows placed."""
        owner = e // self.El
        while remainder > 0:
            popped: list[tuple[float, int]] = []
            taken = False
            while self.heap:
                key, p = heapq.heappop(self.heap)
                if key != self.load_of(p):
                    continue  # stale: the rank's current entry is also in the heap
                popped.append((key, p))
                if p == owner or self.full(p, e):
                    continue
                chunk = min(remainder, cap - key)
                if chunk > 0 and (chunk >= self.min_chunk or chunk == remainder):
                    self.give(e, p, offset, chunk)
                    offset, remainder = offset + chunk, remainder - chunk
                    taken = True
                    break
                if chunk <= 0:
                    break  # every rank after this one is at least as full
            for item in popped:
                heapq.heappush(self.heap, item)
            if not taken:
                break
        return offset

    def _overflow(self, e: int, offset: float, remainder: float) -> None:
        """Step 3: what nobody could take under ``cap``, to the least-loaded ranks under the bound."""
        owner = e // self.El  # the owner is eligible too: it needs no copy
        while remainder > 0:
            eligible = [
                p
                for p in range(self.W)
                if self.load_of(p) < self.limit and (p == owner or not self.full(p, e))
            ]
            if not eligible:
                max_rows, max_copies = self.bounds
                raise ValueError(
                    f"rerouting cannot place expert {e}'s rows within max_rows_per_rank={max_rows} "
                    f"and max_copies_per_rank={max_copies}"
                )
            p = min(eligible, key=lambda q: (self.load_of(q), q != owner, q))
            chunk = min(remainder, self.limit - self.load_of(p))
            self.give(e, p, offset, chunk)
            offset, remainder = offset + chunk, remainder - chunk

    def plan(self) -> ReroutePlan:
        """The finished plan."""
        El = self.El
        return ReroutePlan(
            intervals=self.intervals,
            copies=[sorted(c) for c in self.copies],
            rows_per_rank=self.assigned,
            native_rows_per_rank=self.native,
            moved_rows=sum(
                b - a for e, pieces in enumerate(self.intervals) for p, a, b in pieces if p != e // El
            ),
            transfers=self.transfers,
            shadowed=dict(sorted(self.shadowed.items())),
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
    2. Forced: its plan (none when the step needs no rows moved).
    3. Unforced, when plain expert parallelism would put more than
       ``config.max_rows_per_rank`` rows on a rank: the fastest predicted plan, whether or
       not it pays (the bound is hard), or ``ValueError`` naming the bounds when no plan
       fits them.
    4. Otherwise nothing below ``config.threshold`` (the busiest rank's rows over the
       mean); else the fastest predicted kind, if it saves at least ``config.min_gain`` of
       plain expert parallelism's time.
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
    if forced is not None:
        return next(iter(plans.values()), None)
    El = len(loads) // world_size
    busiest = max(sum(loads[p * El : (p + 1) * El]) for p in range(world_size))
    limit = config.max_rows_per_rank
    over = limit is not None and busiest > limit  # plain expert parallelism breaks the hard bound
    if not plans:
        if over:
            raise ValueError(
                f"rerouting cannot hold this step within max_rows_per_rank={limit} (plain expert "
                f"parallelism puts {busiest} rows on one rank) and max_copies_per_rank="
                f"{config.max_copies_per_rank}"
            )
        return None
    if not over and next(iter(plans.values())).imbalance_before < config.threshold:
        return None
    times = {kind: predict(plan) for kind, plan in plans.items()}
    best = min(times, key=lambda kind: times[kind])
    if over:
        return plans[best]
    return plans[best] if times[best] <= predict(None) * (1.0 - config.min_gain) else None
