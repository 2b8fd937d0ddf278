"""Least-loaded rerouting for the simulator: the layer's algorithm, fast at 2,048 ranks.

The layer plans rerouting with ``flexmoe.parallel.rerouting.plan_rerouting`` (LLA
with hard bounds); that function re-sorts every rank for every spilled chunk, which
takes seconds at ``W = 2048``. This is the same algorithm, step for step and with the
same tie-breaking, with a heap of ranks keyed by ``(load, rank)`` instead of the sort;
it returns only what the cost model needs (rows per rank, which expert copies go
where). The tests check that both give the same rows and transfers.

1. ``cap = min(ceil(alpha * total / W), max_rows)``; ``pending[p]`` = rows of ``p``'s
   experts not yet placed; experts in decreasing load (then index).
2. The owner keeps what fits under ``cap``; the rest spills to the least-loaded other
   rank that may hold another copy and has room for a chunk of at least ``min_chunk``
   rows (or for the whole remainder), repeatedly.
3. A remainder nobody takes under ``cap`` goes to the least-loaded rank with room
   under ``max_rows`` (the owner first on ties; it needs no copy).

Legend: W ranks, E experts, El = E/W experts per rank (expert ``e`` on rank ``e // El``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Rerouting", "plan_rerouting"]


@dataclass(frozen=True)
class Rerouting:
    """The outcome of one rerouting plan.

    Attributes:
        rows_R: rows each rank computes.
        native_rows_R: rows each rank would compute without rerouting.
        copies_R: expert copies each rank receives.
        transfers: ``(expert, receiving rank)`` of every copy, in the order they were made.
        experts_per_rank: ``El``.
    """

    rows_R: NDArray[np.float64]
    native_rows_R: NDArray[np.float64]
    copies_R: NDArray[np.int64]
    transfers: tuple[tuple[int, int], ...]
    experts_per_rank: int

    @property
    def num_copies(self) -> int:
        """Expert copies sent in total."""
        return len(self.transfers)

    @property
    def units_R(self) -> NDArray[np.int64]:
        """Expert GEMM groups per rank: its own experts and its copies."""
        return self.copies_R + self.experts_per_rank


def plan_rerouting(
    loads_E: Sequence[float] | NDArray[np.float64],
    world_size: int,
    *,
    alpha: float = 1.0,
    min_chunk: float = 1.0,
    max_rows_per_rank: float | None = None,
    max_copies_per_rank: int | None = None,
) -> Rerouting:
    """Least-loaded assignment of expert rows to ranks (see the module docstring).

    Raises ``ValueError`` when the bounds cannot hold the step (as the layer does).
    """
    loads = [float(x) for x in loads_E]
    E, W = len(loads), world_size
    if E % W != 0:
        raise ValueError(f"rerouting needs whole experts per rank: {E} experts on {W} ranks")
    if alpha < 1.0:
        raise ValueError(f"alpha must be >= 1, got {alpha}")
    El = E // W
    total = sum(loads)
    native = [sum(loads[p * El : (p + 1) * El]) for p in range(W)]
    limit = math.inf if max_rows_per_rank is None else float(max_rows_per_rank)
    copy_limit = math.inf if max_copies_per_rank is None else max_copies_per_rank
    if total > W * limit:
        raise ValueError(
            f"max_rows_per_rank={max_rows_per_rank} cannot hold this step's {total} rows on {W} ranks"
        )
    cap = min(float(math.ceil(alpha * total / W)), limit)
    pending = list(native)
    assigned = [0.0] * W
    copies: list[set[int]] = [set() for _ in range(W)]
    transfers: list[tuple[int, int]] = []
    heap = [(native[p], p) for p in range(W)]  # (assigned + pending, rank), possibly stale
    heapq.heapify(heap)

    def load_of(p: int) -> float:
        return assigned[p] + pending[p]

    def give(e: int, rank: int, size: float) -> None:
        assigned[rank] += size
        if rank != e // El and e not in copies[rank]:
            copies[rank].add(e)
            transfers.append((e, rank))
        heapq.heappush(heap, (load_of(rank), rank))

    for e in sorted(range(E), key=lambda i: (-loads[i], i)):
        load, owner = loads[e], e // El
        pending[owner] -= load
        heapq.heappush(heap, (load_of(owner), owner))
        room = cap - assigned[owner] - pending[owner]
        keep = min(load, max(room, 0.0))
        if keep or load == 0:
            give(e, owner, keep)
        remainder = load - keep
        # 2. spill to the least-loaded ranks that may hold another copy.
        while remainder > 0:
            popped: list[tuple[float, int]] = []
            taken = False
            while heap:
                key, p = heapq.heappop(heap)
                if key != load_of(p):
                    continue  # stale entry; the current one is in the heap
                popped.append((key, p))
                if p == owner or len(copies[p]) >= copy_limit:
                    continue
                chunk = min(remainder, cap - key)
                if chunk > 0 and (chunk >= min_chunk or chunk == remainder):
                    give(e, p, chunk)
                    remainder -= chunk
                    taken = True
                    break
                if chunk <= 0:
                    break  # every rank after this one is at least as full
            for item in popped:
                heapq.heappush(heap, item)
            if not taken:
                break
        # 3. what nobody took under cap: least loaded with room under the hard bound.
        while remainder > 0:
            eligible = [
                p
                for p in range(W)
                if load_of(p) < limit and (p == owner or e in copies[p] or len(copies[p]) < copy_limit)
            ]
            if not eligible:
                raise ValueError(
                    f"rerouting cannot place expert {e}'s rows within max_rows_per_rank="
                    f"{max_rows_per_rank} and max_copies_per_rank={max_copies_per_rank}"
                )
            p = min(eligible, key=lambda q: (load_of(q), q != owner, q))
            chunk = min(remainder, limit - load_of(p))
            give(e, p, chunk)
            remainder -= chunk
    return Rerouting(
        rows_R=np.asarray(assigned),
        native_rows_R=np.asarray(native),
        copies_R=np.asarray([len(c) for c in copies], dtype=np.int64),
        transfers=tuple(transfers),
        experts_per_rank=El,
    )
