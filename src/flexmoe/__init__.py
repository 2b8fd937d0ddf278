"""flexmoe: an adaptive Mixture-of-Experts runtime for PyTorch."""

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
from flexmoe.layer import MoELayer, MoEStats, attach_aux_free_update, name_moe_layers, update_expert_biases

__version__ = "0.1.0"

__all__ = [
    "BalanceConfig",
    "CapacityConfig",
    "ExpertConfig",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "Plan",
    "RerouteConfig",
    "RouterConfig",
    "TunerConfig",
    "__version__",
    "attach_aux_free_update",
    "name_moe_layers",
    "update_expert_biases",
]
