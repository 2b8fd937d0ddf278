"""Where experts live and where rows go: the descriptions the planner decides and ``parallel`` executes.

``Placement``: which rank stores which experts (or hidden shards of one) and who computes
what under a plan's sharing degree; slot maps (``slot_of_expert``): which physical slot
holds each logical expert; ``ReroutePlan``: which rank computes which rows this step.
Pure descriptions: no communication, no decisions.
"""

from flexmoe.placement.geometry import Placement, split_sizes
from flexmoe.placement.reroute import ReroutePlan, imbalance
from flexmoe.placement.slots import (
    SlotMap,
    check_placement,
    experts_by_rank,
    identity_placement,
    moved_experts,
    rank_loads,
    slot_loads,
)

__all__ = [
    "Placement",
    "ReroutePlan",
    "SlotMap",
    "check_placement",
    "experts_by_rank",
    "identity_placement",
    "imbalance",
    "moved_experts",
    "rank_loads",
    "slot_loads",
    "split_sizes",
]
