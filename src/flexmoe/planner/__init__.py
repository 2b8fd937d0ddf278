"""The planner: pure decisions about plans and placements.

The cost model, the cluster-scale simulator, plan search, the online tuner's decisions,
least-loaded rerouting and expert placement. It imports neither the layer nor
``flexmoe.parallel``: counts and a machine description in, a plan or a placement out.
One model serves the simulator (``flexmoe plan``) and the layer (tuner, rerouting,
placement advice): both score a ``flexmoe.Plan`` with ``simulate`` on a ``Cluster`` (a
preset, or this machine as measured by ``flexmoe calibrate``) for an ``MoEWorkload``
under a routing ``Load``.

    from flexmoe.planner import Load, MoEWorkload, load_cluster, plan
    cluster = load_cluster("a100-80gb-hdr200")
    layer = MoEWorkload(dim=2048, hidden_dim=2048, num_experts=64, top_k=2, gated=False,
                        tokens_per_device=16384)
    report = plan(cluster, layer, Load.zipf(64, 1.2), world_size=64)
    print(report.best.plan.label, report.best.time, report.speedups())
"""

from flexmoe.planner.cluster import (
    DTYPE_BYTES,
    Cluster,
    DeviceSpec,
    LinkSpec,
    default_calibration_path,
    load_cluster,
    preset_names,
)
from flexmoe.planner.costmodel import ExchangeCost, Machine, exchange_cost, pipeline_time
from flexmoe.planner.layer_cost import CostModel
from flexmoe.planner.placement import (
    LoadTracker,
    PlacementAdvice,
    advise_placement,
    affinity_placement,
    balanced_placement,
    coactivation_counts,
    replica_placement,
    same_rank_fraction,
)
from flexmoe.planner.prediction import Breakdown, Prediction, Scored, StaticBaseline
from flexmoe.planner.replay import TraceSimulation, format_trace_simulation, simulate_trace
from flexmoe.planner.rerouting import Rerouting, expected_rerouting, plan_rerouting, summarize
from flexmoe.planner.search import DEGREES, STATIC_CAPACITIES, PlanReport, baselines, candidates, plan, sweep
from flexmoe.planner.simulate import simulate
from flexmoe.planner.trace import RoutingTrace, RoutingTraceWriter, TraceRecord, read_routing_trace
from flexmoe.planner.tuner import Tuner, TunerDecision
from flexmoe.planner.workload import Load, MoEWorkload

__all__ = [
    "DEGREES",
    "DTYPE_BYTES",
    "STATIC_CAPACITIES",
    "Breakdown",
    "Cluster",
    "CostModel",
    "DeviceSpec",
    "ExchangeCost",
    "LinkSpec",
    "Load",
    "LoadTracker",
    "Machine",
    "MoEWorkload",
    "PlacementAdvice",
    "PlanReport",
    "Prediction",
    "Rerouting",
    "RoutingTrace",
    "RoutingTraceWriter",
    "Scored",
    "StaticBaseline",
    "TraceRecord",
    "TraceSimulation",
    "Tuner",
    "TunerDecision",
    "advise_placement",
    "affinity_placement",
    "balanced_placement",
    "baselines",
    "candidates",
    "coactivation_counts",
    "default_calibration_path",
    "exchange_cost",
    "expected_rerouting",
    "format_trace_simulation",
    "load_cluster",
    "pipeline_time",
    "plan",
    "plan_rerouting",
    "preset_names",
    "read_routing_trace",
    "replica_placement",
    "same_rank_fraction",
    "simulate",
    "simulate_trace",
    "summarize",
    "sweep",
]
