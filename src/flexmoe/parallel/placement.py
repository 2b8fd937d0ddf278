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

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from flexmoe.config import Plan
from flexmoe.parallel.comm import gather_index

__all__ = ["Chunk", "Placement", "build_chunks", "plan_pieces", "split_sizes"]


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
