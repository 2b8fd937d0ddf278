"""What one forward call did: ``MoEStats``, built in one place from an expert strategy's ``ExpertStep``.

Legend: E experts, W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexmoe.config import Plan
from flexmoe.planner.tuner import TunerDecision

__all__ = ["ExpertStep", "MoEStats", "RowReport", "StatsSource", "build_stats"]


@dataclass
class MoEStats:
    """What one forward call did.

    Attributes:
        num_tokens, top_k: ``T`` and ``K`` of the call.
        capacity_factor: the capacity factor in force; ``capacity`` the per-expert
            capacity it gave (``None`` when dropless).
        routed_per_expert: routed assignments per expert before any drop (int64, CPU),
            indexed by the router's (logical) expert ids whatever the placement.
        tokens_per_expert: assignments each expert actually processed (int64, CPU).
        dropped: assignments dropped by the capacity limit.
        load_max_over_mean: max / mean of ``routed_per_expert`` (1.0 is perfect balance).
        plan: the parallel plan used; ``world_size`` the number of ranks it ran on.
        backend: the expert GEMM backend used.
        balance_loss, z_loss: the unweighted loss terms (detached), or ``None`` when off;
            distributed, this rank's share (the ranks' mean is the whole batch's term).
        rows_per_rank, native_rows_per_rank: expert rows each rank computed, and would
            have computed without rerouting (distributed layers with whole experts).
        rerouted_rows, expert_copies: rows computed away from their expert's rank, and
            expert weight copies sent, this call; ``copies_per_rank`` the copies each
            rank received.
        replica_hits: copies served by persistent replicas (``set_replicas``), not sent.
        shadowed_experts: experts shadowed this call (``plan.reroute == "shadow"``): every
            rank computed its own rows of them with a copy.
        tuner: with ``plan="auto"``, the online tuner's decision for this call (a
            ``flexmoe.planner.TunerDecision``: bucket, phase, predicted time, the previous
            call's measured time), else ``None``.
        experts_per_token: how many tokens of the whole batch (every rank's) used 0, 1,
            ..., ``top_k`` routed experts (int64 ``[top_k + 1]``; all ``top_k`` unless
            top-p routing or zero-computation experts); see ``mean_experts_per_token``.
        zero_expert_choices: the whole batch's choices of each zero-computation expert
            (int64 ``[Z]``), or ``None`` without them.
    """

    num_tokens: int
    top_k: int
    capacity_factor: float
    capacity: int | None
    routed_per_expert: Tensor
    tokens_per_expert: Tensor
    dropped: int
    load_max_over_mean: float
    plan: Plan
    world_size: int
    backend: str
    balance_loss: Tensor | None = None
    z_loss: Tensor | None = None
    rows_per_rank: list[int] | None = None
    native_rows_per_rank: list[int] | None = None
    rerouted_rows: int = 0
    shadowed_experts: list[int] = field(default_factory=list)
    expert_copies: int = 0
    copies_per_rank: list[int] | None = None
    replica_hits: int = 0
    tuner: TunerDecision | None = None
    experts_per_token: Tensor | None = None
    zero_expert_choices: Tensor | None = None

    @property
    def mean_experts_per_token(self) -> float:
        """Mean experts per token of this call (``top_k`` unless top-p routing)."""
        hist = self.experts_per_token
        if hist is None or int(hist.sum()) == 0:
            return float(self.top_k)
        return float((hist * torch.arange(len(hist))).sum()) / float(hist.sum())


@dataclass(frozen=True)
class RowReport:
    """Where rows were computed in a step of expert parallelism with whole experts (see ``MoEStats``)."""

    rows_per_rank: list[int]
    native_rows_per_rank: list[int]
    rerouted_rows: int = 0
    expert_copies: int = 0
    copies_per_rank: list[int] | None = None
    replica_hits: int = 0
    shadowed_experts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ExpertStep:
    """The facts of one call an expert strategy reports; the layer turns them into ``MoEStats``.

    Attributes:
        num_tokens: tokens of the whole batch (every rank's, concatenated).
        capacity: the per-expert capacity (``None``: dropless; a 0-d tensor where a
            compiled call computed it on the device).
        routed_per_expert_E, tokens_per_expert_E: routed and kept assignments per logical
            expert over the whole batch.
        dropped: assignments dropped by the capacity (a 0-d tensor from a compiled call).
        plan: the plan that ran; ``world_size`` its ranks.
        routed_fraction_E: each expert's share of the whole batch's assignments, for the
            balance loss of a distributed layer (``None``: this batch's own).
        rows: where rows were computed (expert parallelism with whole experts).
        tuner: the online tuner's decision (``plan="auto"``).
    """

    num_tokens: int
    capacity: int | Tensor | None
    routed_per_expert_E: Tensor
    tokens_per_expert_E: Tensor
    dropped: int | Tensor
    plan: Plan
    world_size: int
    routed_fraction_E: Tensor | None = None
    rows: RowReport | None = None
    tuner: TunerDecision | None = None


@dataclass(frozen=True)
class StatsSource:
    """What a forward call leaves to build its ``MoEStats`` from, when someone asks (no host sync before)."""

    step: ExpertStep
    top_k: int
    capacity_factor: float
    backend: str
    loss_terms: tuple[Tensor | None, Tensor | None] = (None, None)
    experts_per_token: Tensor | None = None
    zero_expert_choices: Tensor | None = None
    every_token_k: bool = False  # every token used top_k experts: experts_per_token is [0, ..., T]

    def build(self) -> MoEStats:
        """The call's ``MoEStats`` (a host sync)."""
        stats = build_stats(self.step, self.top_k, self.capacity_factor, self.backend, self.loss_terms)
        if self.every_token_k:
            stats.experts_per_token = torch.zeros(self.top_k + 1, dtype=torch.int64)
            stats.experts_per_token[self.top_k] = self.step.num_tokens
        elif self.experts_per_token is not None:
            stats.experts_per_token = self.experts_per_token.detach().cpu()
        if self.zero_expert_choices is not None:
            stats.zero_expert_choices = self.zero_expert_choices.detach().cpu()
        return stats


def build_stats(
    step: ExpertStep,
    top_k: int,
    capacity_factor: float,
    backend: str,
    loss_terms: tuple[Tensor | None, Tensor | None] = (None, None),
) -> MoEStats:
    """The ``MoEStats`` of a call from its ``ExpertStep`` (counts moved to the CPU: a host sync)."""
    routed = step.routed_per_expert_E.detach().cpu()
    T = step.num_tokens
    stats = MoEStats(
        num_tokens=T,
        top_k=top_k,
        capacity_factor=capacity_factor,
        capacity=None if step.capacity is None else int(step.capacity),
        routed_per_expert=routed,
        tokens_per_expert=step.tokens_per_expert_E.detach().cpu(),
        dropped=int(step.dropped),
        load_max_over_mean=_max_over_mean(routed),
        plan=step.plan,
        world_size=step.world_size,
        backend=backend,
        balance_loss=loss_terms[0],
        z_loss=loss_terms[1],
        tuner=step.tuner,
    )
    rows = step.rows
    if rows is not None:
        stats.rows_per_rank = rows.rows_per_rank
        stats.native_rows_per_rank = rows.native_rows_per_rank
        stats.rerouted_rows = rows.rerouted_rows
        stats.expert_copies = rows.expert_copies
        stats.copies_per_rank = rows.copies_per_rank
        stats.replica_hits = rows.replica_hits
        stats.shadowed_experts = rows.shadowed_experts
    return stats


def _max_over_mean(routed_E: Tensor) -> float:
    """Max over mean of the routed assignments per expert (0.0 when nothing was routed)."""
    total = int(routed_E.sum())
    return int(routed_E.max()) * len(routed_E) / total if total else 0.0
