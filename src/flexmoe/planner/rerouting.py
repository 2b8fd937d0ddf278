"""Least-loaded rerouting for the simulator: the layer's planner, summarised for the cost model.

The simulator plans rerouting with the layer's own function
(``flexmoe.parallel.rerouting.plan_rerouting``, LLA with hard bounds, heap-based so it
stays fast at 2,048 ranks) on expected rows (floats), and keeps only what the cost
model needs: rows per rank and which expert copies go where.

Legend: W ranks, E experts, El = E/W experts per rank (expert ``e`` on rank ``e // El``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flexmoe.parallel import rerouting as _layer

__all__ = ["Rerouting", "plan_rerouting", "summarize"]


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


def plan_rerouting(
    loads_E: Sequence[float] | NDArray[np.float64],
    world_size: int,
    *,
    alpha: float = 1.0,
    min_chunk: float = 1.0,
    max_rows_per_rank: float | None = None,
    max_copies_per_rank: int | None = None,
    shadow: bool = False,
) -> Rerouting:
    """The layer's least-loaded plan for expected rows ``loads_E`` (see the module docstring).

    ``shadow``: the layer's shadowing plan, every source holding ``1/W`` of each
    expert's rows (the simulator's assumption about where rows come from).
    Raises ``ValueError`` when the bounds cannot hold the step (as the layer does).
    """
    loads = [float(x) for x in loads_E]
    W = world_size
    plan = _layer.plan_rerouting(
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
    plan: _layer.ReroutePlan,
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
