"""Persistent replicas of hot experts on other ranks, and the book of which ones are fresh.

A replica is a copy the least-loaded rerouting may give rows to without sending the
expert's weights: it is filled the first time it is used, then reused for as long as
the owner's weights are unchanged (each rank's stored experts are stamped in every
call's header). Every rank keeps the same book of fills, so all agree on which
replicas are fresh without communicating.

Legend: W ranks, El experts per rank; a *slot* is a physical expert position (rank
``slot // El``), an *expert* a logical (router) id.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from flexmoe.placement import ReroutePlan

__all__ = ["ReplicaCache"]

Stamp = tuple[int, int]  # (sum of the stored experts' in-place versions, hash of their storage)


class ReplicaCache:
    """Which logical experts each rank keeps a copy of, the copies held here, and when they were filled."""

    def __init__(self) -> None:
        self.table: list[list[int]] | None = None  # logical experts each rank keeps copies of
        self._rows: dict[int, Tensor] = {}  # this rank's replicas: logical expert -> packed row
        self._filled: dict[tuple[int, int], Stamp] = {}  # (rank, expert) -> the owner's stamp then

    def set(self, table: list[list[int]] | None) -> None:
        """Keep ``table[p]`` on rank ``p`` from now on (``None``: none); every copy starts empty."""
        self.table = table if table and any(table) else None
        self._rows.clear()
        self._filled.clear()

    def held_slots(self, slot_of_expert: Sequence[int]) -> list[list[int]] | None:
        """Each rank's replicas as slots (what the rerouting planner sees), or ``None``."""
        if self.table is None:
            return None
        return [sorted(slot_of_expert[e] for e in row) for row in self.table]

    def sends(
        self,
        reroute: ReroutePlan,
        held: list[list[int]],
        stamps: list[Stamp],
        expert_of_slot: dict[int, int],
        experts_per_rank: int,
        rank: int,
        training: bool,
    ) -> tuple[list[tuple[int, int]], dict[int, Tensor]]:
        """The copies that travel this step, and this rank's fresh replicas (slot -> packed row).

        A replica ``(p, e)`` serves without a transfer when the step takes no gradient
        (a training step must send its gradient back to the owner) and its owner's
        weights are those it was filled from.
        """
        sends = list(reroute.transfers)
        cached: dict[int, Tensor] = {}
        for p, copies in enumerate(reroute.copies):
            for s in copies:
                if s not in held[p]:
                    continue
                e = expert_of_slot[s]
                fresh = not training and self._filled.get((p, e)) == stamps[s // experts_per_rank]
                if not fresh:
                    sends.append((s, p))
                elif p == rank:
                    cached[s] = self._rows[e]  # booked fresh => filled here
        return sends, cached

    def keep(
        self,
        sends: list[tuple[int, int]],
        held: list[list[int]],
        stamps: list[Stamp],
        received: dict[int, Tensor],
        expert_of_slot: dict[int, int],
        experts_per_rank: int,
        rank: int,
    ) -> None:
        """Book the replicas this step's transfers filled (every rank), keep this rank's rows."""
        for s, p in sends:
            if s in held[p]:
                e = expert_of_slot[s]
                self._filled[(p, e)] = stamps[s // experts_per_rank]
                if p == rank:
                    self._rows[e] = received[s]
