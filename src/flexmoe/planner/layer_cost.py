"""``CostModel``: the predicted time of one call of a layer under a plan, on this step's counts.

One cost model serves every decision a distributed layer makes about its plan (the
tuner, the rerouting decision, placement advice): the simulator (``simulate``) on a
``Cluster`` that describes the machine.
"""

from __future__ import annotations

import torch

from flexmoe.config import GATED_ACTIVATIONS, MoEConfig, Plan, RerouteConfig
from flexmoe.planner.cluster import Cluster
from flexmoe.planner.costmodel import Machine
from flexmoe.planner.rerouting import Rerouting
from flexmoe.planner.simulate import simulate
from flexmoe.planner.workload import Load, MoEWorkload

__all__ = ["CostModel"]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# -------------------------------------------------------------------------- cost model
class CostModel:
    """Predicted seconds of one call of a layer under a candidate plan, on this step's counts."""

    def __init__(
        self,
        cluster: Cluster,
        config: MoEConfig,
        world_size: int,
        ranks_per_node: int,
    ) -> None:

        self.cluster = cluster
        self.config = config
        self.world_size = world_size
        self.ranks_per_node = ranks_per_node
        self.machine = Machine.create(cluster, world_size, ranks_per_node)

    def workload(
        self,
        counts_E: list[int],
        tokens: int,
        top_k: int,
        capacity_factor: float,
        training: bool,
        dtype: torch.dtype,
    ) -> MoEWorkload:
        """The simulated workload of a call: its shapes, and its real routed assignments.

        ``counts_E`` counts the routed assignments: with top-p routing or zero-computation
        experts fewer than ``tokens * top_k``, and the workload's ``experts_per_token`` is
        then their mean per token, so that rows and capacity are the call's real ones.
        """
        cfg = self.config
        K = min(top_k, cfg.num_experts)  # zero-computation experts take no rows
        routed = sum(counts_E)
        per_token = None
        if tokens > 0 and routed > 0 and routed != tokens * top_k:
            per_token = min(float(K), routed / tokens)
        return MoEWorkload(
            dim=cfg.dim,
            hidden_dim=cfg.hidden_dim,
            num_experts=cfg.num_experts,
            top_k=K,
            gated=cfg.experts.activation in GATED_ACTIVATIONS,
            dtype=DTYPE_NAMES.get(dtype, "fp32"),
            tokens_per_device=max(1, round(tokens / self.world_size)),
            capacity_factor=capacity_factor,
            training=training,
            experts_per_token=per_token,
        )

    def predict(
        self,
        plan: Plan,
        counts_E: list[int],
        tokens: int,
        top_k: int,
        capacity_factor: float,
        training: bool,
        dtype: torch.dtype,
        reroute: RerouteConfig | None = None,
        rerouting_plan: Rerouting | None = None,
    ) -> float:
        """Seconds of the call (forward, plus backward when ``training``) under the resolved ``plan``.

        ``counts_E``: the step's routed assignments per expert over all ranks; ``tokens``:
        the global batch (see ``workload``). ``rerouting_plan``: the step's actual
        rerouting (the layer's plan, ``flexmoe.planner.rerouting.summarize``) instead of
        one planned from the counts.
        """
        workload = self.workload(counts_E, tokens, top_k, capacity_factor, training, dtype)
        cfg = self.config
        W = self.world_size
        load = Load.from_counts(counts_E) if sum(counts_E) > 0 else Load.uniform(cfg.num_experts)
        prediction = simulate(
            self.cluster,
            workload,
            load,
            W,
            plan,
            machine=self.machine,
            reroute_config=reroute or cfg.reroute,
            rerouting_plan=rerouting_plan,
        )
        return prediction.time
