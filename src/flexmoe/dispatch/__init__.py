"""Dispatch: the capacity policy, the dispatch layout (expert-major order, drops), permute and combine."""

from flexmoe.dispatch.layout import (
    DispatchLayout,
    capacity_limit,
    compute_capacity,
    count_per_expert,
    make_layout,
)
from flexmoe.dispatch.permute import combine, permute, release_rows, sum_slots
from flexmoe.dispatch.static import StaticLayout, combine_static, make_static_layout, permute_static

__all__ = [
    "DispatchLayout",
    "StaticLayout",
    "capacity_limit",
    "combine",
    "combine_static",
    "compute_capacity",
    "count_per_expert",
    "make_layout",
    "make_static_layout",
    "permute",
    "permute_static",
    "release_rows",
    "sum_slots",
]
