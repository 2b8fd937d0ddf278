"""Dispatch: capacity policy, dispatch layout, permute and combine, the dispatcher strategy."""

from flexmoe.dispatch.dispatcher import Dispatcher, LocalDispatcher
from flexmoe.dispatch.layout import DispatchLayout, compute_capacity, make_layout
from flexmoe.dispatch.permute import combine, permute

__all__ = [
    "DispatchLayout",
    "Dispatcher",
    "LocalDispatcher",
    "combine",
    "compute_capacity",
    "make_layout",
    "permute",
]
