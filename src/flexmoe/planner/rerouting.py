"""Least-loaded rerouting for the simulator: the layer's planner, summarised for the cost model.

The simulator plans rerouting with the layer's own function
(``flexmoe.parallel.rerouting.plan_rerouting``, LLA with hard bounds, heap-based so it
stays fast at 2,048 ranks) on expected rows (floats), and keeps only what the cost
model needs: rows per rank and which expert copies go where.

Legend: W ranks, E experts, El = E/W experts per rank (expert ``e`` on rank ``e // El``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flexmoe.parallel import rerouting as _layer

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
    """The layer's least-loaded plan for expected rows ``loads_E`` (see the module docstring).

    Raises ``ValueError`` when the bounds cannot hold the step (as the layer does).
    """
    loads = [float(x) for x in loads_E]
    plan = _layer.plan_rerouting(
        loads,
        world_size,
        alpha=alpha,
        min_chunk=min_chunk,
        max_rows_per_rank=max_rows_per_rank,
        max_copies_per_rank=max_copies_per_rank,
    )
    return Rerouting(
        rows_R=np.asarray(plan.rows_per_rank, dtype=np.float64),
        native_rows_R=np.asarray(plan.native_rows_per_rank, dtype=np.float64),
        copies_R=np.asarray([len(c) for c in plan.copies], dtype=np.int64),
        transfers=tuple(plan.transfers),
        experts_per_rank=len(loads) // world_size,
    )
