"""Dispatch: the capacity policy, the dispatch layout (expert-major order, drops), permute and combine."""

from flexmoe.dispatch.layout import DispatchLayout, capacity_limit, compute_capacity, make_layout
from flexmoe.dispatch.permute import combine, permute

__all__ = [
    "DispatchLayout",
    "capacity_limit",
    "combine",
    "compute_capacity",
    "make_layout",
    "permute",
]
