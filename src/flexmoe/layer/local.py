"""Expert strategies: where the expert weights live and how rows reach them. This one: all here.

A strategy runs the middle of the layer's forward (route -> plan -> **experts** ->
combine): given the routed batch, it builds the dispatch layout (capacity and drops),
moves the rows to wherever their experts compute, computes them and brings them back
in this rank's expert-major order, and reports what it did (an ``ExpertStep``). The
layer combines the rows and builds the stats. ``LocalExperts`` keeps every expert in
this process; ``flexmoe.layer.expert_parallel`` spreads them over a process group.

Legend: T tokens, D model dim, E experts, K top-k, N kept routed slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from flexmoe.config import Plan
from flexmoe.dispatch import (
    DispatchLayout,
    StaticLayout,
    combine,
    combine_static,
    make_layout,
    make_static_layout,
    permute,
    permute_static,
    release_rows,
)
from flexmoe.experts import GroupedExperts
from flexmoe.layer.stats import ExpertStep
from flexmoe.routing import RouterOutput
from flexmoe.workspace import WORKSPACE

__all__ = ["Call", "ExpertsOutput", "LocalExperts", "local_step", "run_experts"]


@dataclass(frozen=True)
class Call:
    """One forward call's validated settings."""

    top_k: int
    capacity_factor: float
    plan: Plan | Literal["auto"]
    top_p: float | None = None


@dataclass
class ExpertsOutput:
    """What a strategy returns: weighted expert rows in this rank's expert-major order, and the facts."""

    y_ND: Tensor
    layout: DispatchLayout | StaticLayout | None  # None: only where combined
    step: ExpertStep
    combined: bool = False  # y_ND is already the per-token sum (the compiled expert operator)

    def combine(self) -> Tensor:
        """The per-token sum of the weighted expert rows (``y_TD``)."""
        if self.combined:
            return self.y_ND
        assert self.layout is not None
        if isinstance(self.layout, StaticLayout):
            return combine_static(self.y_ND, self.layout)
        y_TD = combine(self.y_ND, self.layout)
        WORKSPACE.give(self.y_ND)  # kept only if nothing else (a hook, a saved tensor) holds it
        return y_TD


def run_experts(experts: nn.Module, x_ND: Tensor, counts: list[int], row_weights_N: Tensor) -> Tensor:
    """``experts`` on expert-major rows, each output row scaled by its routing weight.

    The built-in experts take the weights into their GEMMs; a custom module returns its
    rows unweighted (checked: its output must have the shape of its input).
    """
    if getattr(experts, "accepts_row_weights", False):
        y: Tensor = experts(x_ND, counts, row_weights_N)
        return y
    y_ND = experts(x_ND, counts)
    if not isinstance(y_ND, Tensor) or y_ND.shape != x_ND.shape:
        got = tuple(y_ND.shape) if isinstance(y_ND, Tensor) else type(y_ND).__name__
        raise ValueError(f"experts must return the shape of its input {tuple(x_ND.shape)}, got {got}")
    return y_ND * row_weights_N.to(y_ND.dtype)[:, None]


def local_step(num_tokens: int, layout: DispatchLayout | StaticLayout, call: Call) -> ExpertStep:
    """The facts of a call whose experts all ran in this process."""
    dropped = layout.dropped if isinstance(layout, StaticLayout) else layout.num_dropped
    return ExpertStep(
        num_tokens=num_tokens,
        capacity=layout.capacity,
        routed_per_expert_E=layout.routed_per_expert_E,
        tokens_per_expert_E=layout.tokens_per_expert_E,
        dropped=dropped,
        plan=Plan() if call.plan == "auto" else call.plan,
        world_size=1,
    )


class LocalExperts:
    """Every expert in this process: permute, grouped experts, and the rows come back as they are.

    Args:
        experts: the layer's expert module (the layer owns and registers it).
        num_experts: ``E``.
        batch_prioritized: drop the lowest-scored assignments first under a capacity.
    """

    world_size = 1

    def __init__(self, experts: nn.Module, num_experts: int, batch_prioritized: bool) -> None:
        self.experts = experts
        self.num_experts = num_experts
        self.batch_prioritized = batch_prioritized

    def resolve(self, plan: Plan) -> Plan:
        """``plan`` with its defaults filled in (one device: ``r`` is 0 or 1, no rerouting)."""
        if plan.r not in (None, 0, 1):
            raise ValueError(f"plan.r must be None, 0 or 1 on a single device, got {plan.r}")
        return Plan(r=1 if plan.r is None else plan.r, d=plan.d, exchange=plan.exchange, reroute=False)

    def begin(self, x_TD: Tensor, call: Call) -> tuple[Tensor, object]:
        """Start a call (nothing to agree on with other ranks)."""
        return x_TD, None

    def fail(self) -> None:
        """Note that the call was refused before it started (nobody else waits for it)."""

    def run(self, x_TD: Tensor, route: RouterOutput, call: Call, header: object) -> ExpertsOutput:
        """Dispatch (capacity, drops), permute, experts; see the module docstring.

        Under ``torch.compile`` the built-in experts run on the static-shape layout
        (``flexmoe.dispatch.static``): the same rows and results, no host sync.
        """
        if torch.compiler.is_compiling() and isinstance(self.experts, GroupedExperts):
            return self._run_static(x_TD, route, call)
        layout, x_ND, row_weights_N = self.dispatch(x_TD, route, call)
        y_ND = run_experts(self.experts, x_ND, layout.counts, row_weights_N)
        release_rows(x_ND)
        return ExpertsOutput(y_ND, layout, local_step(x_TD.shape[0], layout, call))

    def dispatch(
        self, x_TD: Tensor, route: RouterOutput, call: Call
    ) -> tuple[DispatchLayout, Tensor, Tensor]:
        """The call's layout (capacity, drops), its expert-major rows and their routing weights."""
        layout = make_layout(
            route.expert_ids_TK,
            route.weights_TK,
            self.num_experts,
            call.capacity_factor,
            self.batch_prioritized,
            route.valid_TK,
        )
        row_weights_N = route.weights_TK.reshape(-1).index_select(0, layout.slot_ids_N)
        return layout, permute(x_TD, layout), row_weights_N

    def _run_static(self, x_TD: Tensor, route: RouterOutput, call: Call) -> ExpertsOutput:
        assert isinstance(self.experts, GroupedExperts)
        layout = make_static_layout(
            route.expert_ids_TK,
            route.weights_TK,
            self.num_experts,
            call.capacity_factor,
            self.batch_prioritized,
            route.valid_TK,
        )
        row_weights_S = route.weights_TK.reshape(-1).index_select(0, layout.slot_ids_S)
        counts_E = layout.tokens_per_expert_E
        experts = self.experts
        if experts.compiled_backend(x_TD.device, experts.compute_dtype(x_TD)) == "grouped_mm":
            y = experts.forward_rows(permute_static(x_TD, layout), counts_E, row_weights_S)
            combined = False  # rows per slot: the layer combines them
        else:
            y = experts.forward_tokens(x_TD, row_weights_S, layout.token_ids_S, layout.inverse_S, counts_E)
            combined = True
        return ExpertsOutput(y, layout, local_step(x_TD.shape[0], layout, call), combined)

    def end(self, y_TD: Tensor) -> Tensor:
        """Finish a call."""
        return y_TD

    def empty_step(self, call: Call) -> ExpertStep:
        """The facts of a call on an empty batch."""
        zeros = torch.zeros(self.num_experts, dtype=torch.int64)
        return ExpertStep(
            num_tokens=0,
            capacity=None if call.capacity_factor == 0 else 0,
            routed_per_expert_E=zeros,
            tokens_per_expert_E=zeros.clone(),
            dropped=0,
            plan=Plan() if call.plan == "auto" else call.plan,
            world_size=1,
        )
