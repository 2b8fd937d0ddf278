"""``ReroutePlan``: which rank computes which rows of which expert this step.

Made by the least-loaded rerouting planner (``flexmoe.planner.rerouting``), executed by
expert parallelism (``flexmoe.parallel``). Legend: W ranks, E experts, El experts per
rank (expert ``e`` lives on rank ``e // El``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ReroutePlan", "imbalance"]


@dataclass
class ReroutePlan:
    """Which rank computes which rows of which expert.

    Attributes:
        intervals: ``intervals[e]``: ``(rank, start, stop)`` pieces of expert ``e``'s global
            rows in row order, contiguous and covering ``[0, load_e)``; what the owner keeps under
            the cap first (rows it takes back when nobody else can, later).
        copies: ``copies[p]``: experts (sorted) whose weights rank ``p`` receives.
        rows_per_rank: rows each rank computes.
        native_rows_per_rank: rows each rank would compute without rerouting.
        moved_rows: rows computed away from their expert's rank.
        transfers: ``(expert, receiving rank)`` of every copy sent, in the order they were made.
        shadowed: ``{expert: [(rank, rows), ...]}``: the rows of its own that each other
            rank computes of a shadowed expert (they do not travel; see the module docstring).
    """

    intervals: list[list[tuple[int, float, float]]]
    copies: list[list[int]]
    rows_per_rank: list[float]
    native_rows_per_rank: list[float]
    moved_rows: float = 0
    transfers: list[tuple[int, int]] = field(default_factory=list)
    shadowed: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def kind(self) -> Literal["lla", "shadow"]:
        """``"shadow"`` when some expert is shadowed, else ``"lla"``."""
        return "shadow" if self.shadowed else "lla"

    @property
    def num_copies(self) -> int:
        """Expert copies sent this step."""
        return len(self.transfers)

    @property
    def imbalance_before(self) -> float:
        """Max over mean rows per rank without rerouting."""
        return imbalance(self.native_rows_per_rank)

    @property
    def imbalance_after(self) -> float:
        """Max over mean rows per rank with this plan."""
        return imbalance(self.rows_per_rank)


def imbalance(rows: list[float]) -> float:
    """Max over mean of per-rank rows (1.0 when there are none)."""
    total = sum(rows)
    return max(rows) * len(rows) / total if total else 1.0
