"""What the simulator predicts, and for what: ``Prediction`` of a ``Plan`` or a ``StaticBaseline``."""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.config import Plan
from flexmoe.planner.costmodel import ExchangeCost

__all__ = ["Breakdown", "Prediction", "Scored", "StaticBaseline"]


@dataclass(frozen=True)
class StaticBaseline:
    """A static system the planner compares with: a fixed capacity factor, padded buffers.

    It runs plain expert parallelism (``r = S``, ``d = 1``, flat exchange) and pads every
    expert to ``capacity_factor`` times its mean rows (tokens over it are dropped).
    """

    capacity_factor: float

    @property
    def label(self) -> str:
        """Short human-readable name."""
        return f"static cf={self.capacity_factor:g}"

    @property
    def reroute_kind(self) -> None:
        """A static system never reroutes."""
        return None


Scored = Plan | StaticBaseline  # what the simulator predicts: one of flexmoe's plans, or a baseline


@dataclass(frozen=True)
class Breakdown:
    """Seconds per step, by stage (``exchange`` and ``experts`` before overlap; ``total`` after)."""

    host: float
    metadata: float
    routing: float
    permute: float
    weight_gather: float
    rerouting: float
    exchange: float
    experts: float
    overlap_saved: float
    combine: float

    @property
    def total(self) -> float:
        """The step time."""
        return (
            self.host
            + self.metadata
            + self.routing
            + self.permute
            + self.weight_gather
            + self.rerouting
            + self.exchange
            + self.experts
            - self.overlap_saved
            + self.combine
        )


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted step.

    Attributes:
        plan: what was simulated (a resolved ``Plan``, or a ``StaticBaseline``).
        breakdown: seconds by stage; ``time`` is its total.
        exchange: one all-to-all (one direction, one chunk): time, messages, sizes.
        exchanges_per_step: row all-to-all calls per step (both directions, all chunks, passes).
        row_bytes: bytes of rows the busiest rank sends per step.
        weight_bytes: bytes of weights (gathers, copies and their gradients) per rank per step.
        peak_memory: bytes on the fullest rank.
        fits: ``peak_memory`` within the budget.
        dropped_fraction: routed assignments dropped by capacity.
        straggler_rows: rows the busiest rank computes.
        overlap: fraction of the shorter of exchange and experts that pipelining hid.
        rerouted_copies: expert copies sent (rerouting).
    """

    plan: Scored
    breakdown: Breakdown
    exchange: ExchangeCost
    exchanges_per_step: int
    row_bytes: float
    weight_bytes: float
    peak_memory: float
    fits: bool
    dropped_fraction: float
    straggler_rows: float
    overlap: float
    rerouted_copies: int

    @property
    def time(self) -> float:
        """Predicted seconds per step."""
        return self.breakdown.total
