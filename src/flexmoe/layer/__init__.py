"""``MoELayer``: route -> plan -> expert strategy -> combine, composed from the stages."""

from flexmoe.layer.controller import ExpertsPerTokenController
from flexmoe.layer.moe_layer import (
    MoELayer,
    MoEStats,
    attach_aux_free_update,
    name_moe_layers,
    update_expert_biases,
)
from flexmoe.layer.schedule import RoutingSchedule, StepSchedule, parse_layer_schedule
from flexmoe.layer.state_names import flexmoe_state_names, flexmoe_state_names_requested

__all__ = [
    "ExpertsPerTokenController",
    "MoELayer",
    "MoEStats",
    "RoutingSchedule",
    "StepSchedule",
    "attach_aux_free_update",
    "flexmoe_state_names",
    "flexmoe_state_names_requested",
    "name_moe_layers",
    "parse_layer_schedule",
    "update_expert_biases",
]
