"""Routing: routers, balancing losses, the aux-loss-free bias rule and the top-p controller rule."""

from flexmoe.routing.control import top_p_update
from flexmoe.routing.losses import aux_free_bias_update, load_balance_loss, router_z_loss
from flexmoe.routing.routers import (
    CosineRouter,
    Router,
    RouterChoice,
    RouterOutput,
    SigmoidRouter,
    SoftmaxRouter,
    build_router,
    select_top_k,
)

__all__ = [
    "CosineRouter",
    "Router",
    "RouterChoice",
    "RouterOutput",
    "SigmoidRouter",
    "SoftmaxRouter",
    "aux_free_bias_update",
    "build_router",
    "load_balance_loss",
    "router_z_loss",
    "select_top_k",
    "top_p_update",
]
