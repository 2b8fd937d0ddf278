"""Tools that drive real layers: routing traces, replay, calibration, plan measurement, rebalancing.

They sit above ``flexmoe.layer`` (they build, hook or run layers) and below the CLI.
"""

from flexmoe.tools.calibrate import calibrate
from flexmoe.tools.local import WorkerError, run_local
from flexmoe.tools.rebalance import CoactivationRecorder, Rebalancer
from flexmoe.tools.recorder import RoutingRecorder
from flexmoe.tools.replay import expert_ids_from_counts, force_routing, routing_from_counts

__all__ = [
    "CoactivationRecorder",
    "Rebalancer",
    "RoutingRecorder",
    "WorkerError",
    "calibrate",
    "expert_ids_from_counts",
    "force_routing",
    "routing_from_counts",
    "run_local",
]
