"""flexmoe: an adaptive Mixture-of-Experts runtime for PyTorch."""

import logging

from flexmoe.config import (
    BalanceConfig,
    CapacityConfig,
    ExpertConfig,
    MoEConfig,
    Plan,
    RerouteConfig,
    RouterConfig,
    TunerConfig,
)
from flexmoe.layer import (
    ExpertsPerTokenController,
    MoELayer,
    MoEStats,
    RoutingSchedule,
    attach_aux_free_update,
    name_moe_layers,
    update_expert_biases,
)
from flexmoe.logs import LIBRARY_LOGGER

__version__ = "0.1.0"

# Library convention: records go nowhere until the application configures logging
# (the `flexmoe` command does; see flexmoe.logs).
logging.getLogger(LIBRARY_LOGGER).addHandler(logging.NullHandler())

__all__ = [
    "BalanceConfig",
    "CapacityConfig",
    "ExpertConfig",
    "ExpertsPerTokenController",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "Plan",
    "RerouteConfig",
    "RouterConfig",
    "RoutingSchedule",
    "TunerConfig",
    "__version__",
    "attach_aux_free_update",
    "name_moe_layers",
    "update_expert_biases",
]
