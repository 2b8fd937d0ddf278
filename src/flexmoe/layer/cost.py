"""The cost model and tuner of a distributed layer: which machine description they use.

``TunerConfig.cluster`` names it (a preset or a JSON file); without one, the file
``flexmoe calibrate`` writes; with neither, a rough model of the device (with a
warning, logged once per process and by the group's first rank only: its description
is the one every rank uses, so decisions agree).
"""

from __future__ import annotations

import logging
import time

import torch

from flexmoe.config import MoEConfig
from flexmoe.logs import log_once
from flexmoe.parallel import ExpertParallel
from flexmoe.planner.cluster import Cluster, DeviceSpec, LinkSpec, default_calibration_path, load_cluster
from flexmoe.planner.layer_cost import CostModel
from flexmoe.planner.tuner import Tuner, candidates_for

__all__ = ["agreed_cluster", "build_tuner", "cost_model", "resolve_cluster", "rough_cluster"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- cluster
def rough_cluster(device: torch.device) -> Cluster:
    """A rough description of ``device`` for when nothing was calibrated.

    CPU: one dense GEMM and one copy, timed here (a fraction of a second), and gloo on
    one machine for the links; CUDA: the H100 preset. Good enough to rank plans, not to
    predict times: the tuner measures its best candidates anyway.
    """
    if device.type == "cuda":
        return load_cluster("h100-80gb-ndr400")
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    big = torch.empty(1 << 22)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(4):
        a @ b
    flops = 4 * 2 * 256 * 512 * 512 / max(time.perf_counter() - start, 1e-9)
    start = time.perf_counter()
    for _ in range(4):
        big.clone()
    stream = 4 * 2 * big.numel() * 4 / max(time.perf_counter() - start, 1e-9)
    link = LinkSpec(bandwidth=1e9, latency=2e-4)
    return Cluster(
        name="rough model of this CPU (run `flexmoe calibrate` for a measured one)",
        device=DeviceSpec(
            name="CPU core",
            flops={"fp32": flops, "bf16": flops / 4},
            gemm_efficiency=0.8,
            memory_bandwidth=stream,
            memory_efficiency=1.0,
            memory_bytes=float(16 << 30),
            op_overhead=5e-6,
            elementwise_rate=1e9,
        ),
        devices_per_node=64,
        intra_node=link,
        inter_node=link,
        compute_slots_per_node=torch.get_num_threads(),
        overlap_efficiency=0.0,
        collective_overhead=2e-4,
        step_overhead=5e-3,
    )


def resolve_cluster(spec: str | None, device: torch.device, *, warn: bool = True) -> Cluster:
    """``TunerConfig.cluster`` as a ``Cluster`` (see there).

    Falling back to ``rough_cluster`` logs a warning once per process; ``warn=False``
    keeps it quiet (a rank whose description the group does not use).
    """
    if spec is not None:
        return load_cluster(spec)
    if default_calibration_path().exists():
        return load_cluster("this-machine")
    if warn:
        log_once(
            log,
            logging.WARNING,
            "no calibration of this machine (run `flexmoe calibrate`); the layer's cost model "
            "uses a rough description of the device",
        )
    return rough_cluster(device)


def agreed_cluster(ep: ExpertParallel, cluster: Cluster) -> Cluster:
    """The first rank's cluster, on every rank (decisions must not depend on local files)."""
    return Cluster.from_dict(ep.first_rank_object(cluster.to_dict(), "cost model"))


def build_tuner(ep: ExpertParallel, config: MoEConfig, device: torch.device) -> Tuner:
    """The layer's tuner (collective: every rank of the group calls it in the same call)."""
    cost = cost_model(ep, config, device)
    placement = ep.placement
    multi_node = placement.ranks_per_node < placement.world_size
    candidates, plain = candidates_for(
        placement.valid_r(), placement.shards, placement.sharded, multi_node, config.tuner, config.reroute
    )
    El = 0 if placement.sharded else placement.local_experts
    return Tuner(cost, config.tuner, candidates, plain, El, config.reroute.threshold)


def cost_model(ep: ExpertParallel, config: MoEConfig, device: torch.device) -> CostModel:
    """The layer's cost model (collective: the first rank's cluster is broadcast)."""
    first_rank = ep.placement.rank == 0  # the rank whose description the group uses
    cluster = agreed_cluster(ep, resolve_cluster(config.tuner.cluster, device, warn=first_rank))
    placement = ep.placement
    return CostModel(cluster, config, placement.world_size, placement.ranks_per_node)
