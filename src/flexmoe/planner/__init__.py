"""The planner: a cost model of flexmoe's plans, a cluster-scale simulator, and calibration.

One model serves the simulator (``flexmoe plan``) and the online tuner: both score a
``Candidate`` with ``simulate`` on a ``Cluster`` (a preset, or this machine as
measured by ``flexmoe calibrate``) for an ``MoEWorkload`` under a routing ``Load``.

    from flexmoe.planner import Load, MoEWorkload, load_cluster, plan
    cluster = load_cluster("a100-80gb-hdr200")
    layer = MoEWorkload(dim=2048, hidden_dim=2048, num_experts=64, top_k=2, gated=False,
                        tokens_per_device=16384)
    report = plan(cluster, layer, Load.zipf(64, 1.2), world_size=64)
    print(report.best.candidate.label, report.best.time, report.speedups())
"""

from flexmoe.planner.cluster import DTYPE_BYTES, Cluster, DeviceSpec, LinkSpec, load_cluster, preset_names
from flexmoe.planner.costmodel import ExchangeCost, Machine, exchange_cost, pipeline_time
from flexmoe.planner.rerouting import Rerouting, plan_rerouting
from flexmoe.planner.search import DEGREES, STATIC_CAPACITIES, PlanReport, baselines, candidates, plan, sweep
from flexmoe.planner.simulate import Breakdown, Candidate, Prediction, simulate
from flexmoe.planner.trace import RoutingTrace, RoutingTraceWriter, TraceRecord, read_routing_trace
from flexmoe.planner.workload import Load, MoEWorkload

__all__ = [
    "DEGREES",
    "DTYPE_BYTES",
    "STATIC_CAPACITIES",
    "Breakdown",
    "Candidate",
    "Cluster",
    "DeviceSpec",
    "ExchangeCost",
    "LinkSpec",
    "Load",
    "Machine",
    "MoEWorkload",
    "PlanReport",
    "Prediction",
    "Rerouting",
    "RoutingTrace",
    "RoutingTraceWriter",
    "TraceRecord",
    "baselines",
    "candidates",
    "exchange_cost",
    "load_cluster",
    "pipeline_time",
    "plan",
    "plan_rerouting",
    "preset_names",
    "read_routing_trace",
    "simulate",
    "sweep",
]
