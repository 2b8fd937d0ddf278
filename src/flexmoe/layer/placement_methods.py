"""The layer's methods about where its experts live: placement, replicas, single-device layout.

``ExpertPlacementMethods`` is a base class of ``MoELayer``; it holds these methods so the
layer's own file stays about the forward. They delegate to the layer's expert strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flexmoe.config import MoEConfig
from flexmoe.experts import GroupedExperts
from flexmoe.layer.expert_parallel import EXPERT_TENSORS, ExpertParallelExperts
from flexmoe.layer.local import LocalExperts
from flexmoe.parallel import MoveReport
from flexmoe.placement import Placement, check_placement
from flexmoe.planner import PlacementAdvice

__all__ = ["ExpertPlacementMethods"]


class ExpertPlacementMethods(nn.Module):
    """Where a layer's experts live, and its expert tensors in the single-device layout."""

    config: MoEConfig
    experts: nn.Module
    strategy: LocalExperts | ExpertParallelExperts

    @property
    def world_size(self) -> int:
        """Ranks the experts are spread over (1: single device)."""
        return self.strategy.world_size

    @property
    def placement(self) -> Placement | None:
        """Where this distributed layer's experts are stored (``None`` on one device)."""
        return self.strategy.placement if isinstance(self.strategy, ExpertParallelExperts) else None

    @property
    def name(self) -> str:
        """The name collective errors use (``name_moe_layers`` sets the module path)."""
        strategy = self.strategy
        return strategy.ep.comm.name if isinstance(strategy, ExpertParallelExperts) else "moe"

    @name.setter
    def name(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(f"name must be a non-empty str, got {value!r}")
        if isinstance(self.strategy, ExpertParallelExperts):
            self.strategy.ep.comm.name = value

    @property
    def expert_placement(self) -> list[int]:
        """``slot_of_expert``: the physical slot of each logical expert (rank ``slot // (E/W)``).

        The identity until ``apply_placement`` changes it; always the identity on one
        device or with sharded experts (``E < W``).
        """
        strategy = self.strategy
        if isinstance(strategy, ExpertParallelExperts):
            return strategy.slots.slot_of_expert
        return list(range(self.config.num_experts))

    @property
    def stored_experts(self) -> list[int]:
        """The logical experts this rank stores, in the order of its expert parameters' rows.

        Sharded experts (``E < W``): the one expert this rank holds a shard of.
        """
        strategy = self.strategy
        if isinstance(strategy, ExpertParallelExperts):
            return strategy.stored_experts
        return list(range(self.config.num_experts))

    def apply_placement(
        self, slot_of_expert: Sequence[int] | Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> MoveReport:
        """Store logical expert ``e`` in slot ``slot_of_expert[e]`` from now on; a collective.

        Call it between steps, on every rank with the same placement (checked), e.g. one
        from ``flexmoe.planner.balanced_placement`` or a ``flexmoe.tools.Rebalancer``. The
        rows of every expert that changes slot move to their new rank: its parameters,
        their ``.grad`` if any, and with ``optimizer`` every per-parameter state tensor
        shaped like them (AdamW's moments). Rows are written in place: the parameter
        objects and their storage stay the same, so the optimizer and DDP keep working.
        Without ``optimizer``, its state would stay with the slot, not the expert:
        pass the optimizer whenever it holds state for these parameters.

        The layer then computes exactly what it computed before (the router and its ids
        stay logical; ``stats`` per expert stay in logical order; only where rows are
        computed changes). Returns a ``MoveReport`` (experts and bytes moved, seconds).

        Raises ``ValueError`` for a non-permutation, on one device for anything but the
        identity, or with sharded experts (``E < W``: each expert already spans ``W/E``
        ranks, so a permutation would not change any rank's load).
        """
        slots = slot_of_expert.tolist() if isinstance(slot_of_expert, Tensor) else list(slot_of_expert)
        strategy = self.strategy
        if isinstance(strategy, ExpertParallelExperts):
            return strategy.apply_placement(slots, optimizer)
        E = self.config.num_experts
        if check_placement(slots, E, 1) != list(range(E)):
            raise ValueError("apply_placement: only the identity placement exists on one device")
        return MoveReport(0, 0, 0, 0, 0, 0, 0, 0.0)

    def set_replicas(self, replicas: Sequence[Sequence[int]] | None) -> None:
        """Keep persistent copies of hot experts on other ranks (EPLB-style replicas); a collective.

        ``replicas[p]``: the logical experts rank ``p`` keeps a copy of (``None``: none).
        Every rank passes the same table (checked). A replica is a copy the least-loaded
        rerouting may give rows to without sending the expert's weights: it is filled the
        first time it is used, then reused for as long as the owner's weights are
        unchanged — every forward without grad (inference, evaluation) until the next
        optimizer step or load. A training step sends the copy anyway (its gradient must
        go back to the owner, and the weights change after it). Replicas count towards
        ``RerouteConfig.max_copies_per_rank``. The layer's output is the same with or
        without replicas; ``stats.replica_hits`` counts the copies they served. Plan them
        from observed load with ``flexmoe.planner.replica_placement``.
        """
        strategy = self.strategy
        if isinstance(strategy, ExpertParallelExperts):
            strategy.set_replicas(replicas)
        elif replicas:
            raise ValueError("set_replicas needs a distributed layer with whole experts (E >= W)")

    @property
    def replicas(self) -> list[list[int]] | None:
        """The persistent replicas (``set_replicas``): logical experts per rank, or ``None``."""
        strategy = self.strategy
        table = strategy.replicas.table if isinstance(strategy, ExpertParallelExperts) else None
        return None if table is None else [list(r) for r in table]

    def placement_advice(
        self,
        loads: Sequence[float],
        optimizer: torch.optim.Optimizer | None = None,
        horizon_steps: int = 100,
        min_gain: float = 0.05,
    ) -> PlacementAdvice:
        """A balanced placement for per-expert ``loads``, and whether moving to it pays.

        See ``flexmoe.planner.advise_placement``: the move must pay back within
        ``horizon_steps`` steps. Predicted by the layer's cost model (the one the tuner
        and rerouting use: ``TunerConfig.cluster``): a training step of plain expert
        parallelism with ``loads`` in the current and in the proposed slots, and the
        move as the busiest rank's bytes (parameters plus, with ``optimizer``, its state
        tensors) over the cluster's link. Collective the first time (the cost model's
        cluster is the first rank's): every rank calls it.
        """
        strategy = self.strategy
        if not isinstance(strategy, ExpertParallelExperts):
            raise ValueError("placement_advice needs a distributed layer with whole experts (E >= W)")
        return strategy.placement_advice(loads, optimizer, horizon_steps, min_gain)

    @torch.no_grad()
    def load_single_device_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load the ``state_dict`` of a single-device layer of the same configuration.

        Each rank keeps the expert slices it stores (under the current placement), and
        everything else whole.
        """
        strategy = self.strategy
        if not isinstance(strategy, ExpertParallelExperts):
            self.load_state_dict(state_dict)
            return
        local: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            part = (
                strategy.local_part(key.removeprefix("experts."), value)
                if key.startswith("experts.")
                else value
            )
            if part is not None:
                local[key] = part
        self.load_state_dict(local)

    def single_device_state_dict(self) -> dict[str, Tensor]:
        """The ``state_dict`` of the equivalent single-device layer.

        Expert slices are gathered from every rank: a collective, call it on every rank.
        """
        state = {key: value.detach() for key, value in self.state_dict().items()}
        strategy = self.strategy
        if not isinstance(strategy, ExpertParallelExperts):
            return state
        for key in [k for k in state if k.startswith("experts.")]:
            del state[key]
        experts = strategy.experts
        gathered = strategy.gather_single_device([getattr(experts, name) for name in EXPERT_TENSORS])
        state.update({f"experts.{name}": value for name, value in gathered.items() if value is not None})
        return state

    def single_device_expert_grads(self) -> dict[str, Tensor]:
        """The gradients of the expert parameters in the single-device layout, by ``state_dict`` key.

        ``{"experts.w_in": ..., "experts.w_out": ...}`` (and the biases, when the layer has
        them) as the equivalent single-device layer would hold them, in logical expert
        order; a parameter without a gradient counts as zero. Distributed: gathered from
        every rank, a collective (call it on every rank).
        """
        if not isinstance(self.experts, GroupedExperts):
            raise ValueError("single_device_expert_grads needs the built-in grouped experts")
        params = [getattr(self.experts, name) for name in EXPERT_TENSORS]
        grads = [None if p is None else p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        strategy = self.strategy
        if isinstance(strategy, ExpertParallelExperts):
            gathered = strategy.gather_single_device(grads)
        else:
            gathered = {
                n: None if g is None else g.detach() for n, g in zip(EXPERT_TENSORS, grads, strict=True)
            }
        return {f"experts.{name}": value.detach() for name, value in gathered.items() if value is not None}

    def single_device_expert_rows(
        self, tensors: Sequence[Tensor], split_like: str | None = None
    ) -> list[Tensor]:
        """Tensors with one row per stored expert (``[El, ...]``), as ``[E, ...]`` in logical order.

        For per-expert tensors besides the expert weights (a LoRA adapter's factors).
        Distributed: gathered from every rank, a collective. With sharded experts
        (``E < W``) each rank holds its part of its expert's row: ``split_like="w_in"`` or
        ``"w_out"`` for tensors cut along the hidden dim like that weight (a LoRA adapter's
        ``B_in``, ``A_out``), ``None`` for tensors whole on every shard (``A_in``, ``B_out``).
        """
        strategy = self.strategy
        if not isinstance(strategy, ExpertParallelExperts):
            return [t.detach().clone() for t in tensors]
        return strategy.single_device_rows(tensors, split_like)

    def local_expert_rows(self, full: Tensor, split_like: str | None = None) -> Tensor:
        """The part of a per-expert ``[E, ...]`` tensor (logical order) that this rank stores.

        ``split_like``: with sharded experts, as in ``single_device_expert_rows``.
        """
        strategy = self.strategy
        if isinstance(strategy, ExpertParallelExperts):
            return strategy.local_rows(full, split_like)
        return full

    def whole_stored_experts(self, tensors: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """Tensors shaped like this rank's expert parameters, as the whole experts it stores.

        ``tensors`` maps ``w_in``, ``w_out``, ``b_in``, ``b_out`` (and an adapter's
        ``lora.A_in``, ..., split as ``flexmoe.experts.lora.FACTOR_SHARDS`` says) to tensors shaped like
        those parameters (the parameters, their gradients or optimizer state; ``None`` where
        there is none). Returns one row per expert of ``stored_experts``, each with its
        single-device shape. Only sharded experts (``E < W``) change: the hidden shards of
        the rank's expert are gathered from the ranks sharing it, a collective over them
        (call it on every rank).
        """
        strategy = self.strategy
        if not isinstance(strategy, ExpertParallelExperts):
            return dict(tensors)
        return strategy.whole_stored_experts(tensors)
