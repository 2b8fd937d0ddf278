"""Where experts live on ``W`` ranks, and who computes what under a plan's sharing degree ``r``.

Legend: W ranks, E global experts, F expert hidden dim, S = W/E shards per expert
(``E < W``), El = E/W experts per rank (``E >= W``), r the plan's sharing degree,
g = S/r ranks per all-gather group.

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

from dataclasses import dataclass

from torch import Tensor

from flexmoe.config import Plan

__all__ = ["Placement", "split_sizes"]


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
