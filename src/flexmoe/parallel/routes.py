"""Where each step's rows travel: the per-chunk send/receive routes of the row exchange.

Every rank computes the same global picture from the same per-source kept counts
(exchanged with the routing metadata), so no count exchange precedes the row exchange.

Legend: W ranks, E experts, r the plan's sharing degree, g = S/r ranks per gather
group, d the pipelining degree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from flexmoe.parallel.comm import gather_index
from flexmoe.placement import Placement, ReroutePlan, split_sizes

__all__ = ["Chunk", "build_chunks", "plan_pieces", "reroute_pieces"]


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


def reroute_pieces(
    kept: list[list[int]], plan: ReroutePlan, experts_per_rank: int
) -> Callable[[int, int], list[tuple[int, int, int, int]]]:
    """``pieces(q, e)`` for ``build_chunks``: source ``q``'s rows of expert ``e``, cut by the plan.

    The plan fixes how many of expert ``e``'s rows each rank computes, not which: each
    rank first takes its own rows of the expert (as many as its share holds), so they do
    not travel; the rest of every share is filled from the remaining rows, sources in
    rank order. Deterministic in ``kept``, so every rank cuts the same way.
    """
    W, E, El = len(kept), len(plan.intervals), experts_per_rank
    unit = [{e: El + i for i, e in enumerate(copies)} for copies in plan.copies]
    table: list[list[list[tuple[int, int, int, int]]]] = [[[] for _ in range(E)] for _ in range(W)]
    for e in range(E):
        share: dict[int, int] = {}  # rank -> rows of e it computes, in the plan's order
        for rank, a, b in plan.intervals[e]:
            share[rank] = share.get(rank, 0) + int(b) - int(a)
        left = [kept[q][e] for q in range(W)]
        if sum(share.values()) != sum(left):
            raise ValueError(
                f"the rerouting plan covers {sum(share.values())} rows of expert {e}, kept {sum(left)}"
            )
        flows = [[0] * W for _ in range(W)]  # flows[q][p]: rows of source q computed by rank p
        room = {}
        for rank, size in share.items():
            own = min(size, left[rank])
            flows[rank][rank], left[rank], room[rank] = own, left[rank] - own, size - own
        q = 0
        for rank in share:
            while room[rank] > 0:
                while left[q] == 0:
                    q += 1
                n = min(room[rank], left[q])
                flows[q][rank] += n
                left[q] -= n
                room[rank] -= n
        for q in range(W):
            offset = 0
            for rank in range(W):
                n = flows[q][rank]
                if n:
                    u = e - rank * El if e // El == rank else unit[rank][e]
                    table[q][e].append((rank, u, offset, n))
                    offset += n

    def pieces(q: int, e: int) -> list[tuple[int, int, int, int]]:
        return table[q][e]

    return pieces
