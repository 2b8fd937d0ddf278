"""Re-placing a model's experts between training steps from the load they see.

``LoadTracker`` (``flexmoe.planner.placement``) keeps the moving average of routed rows
per expert that the placement planners take; ``CoactivationRecorder`` counts
consecutive-layer expert pairs for ``affinity_placement``; ``Rebalancer`` ties them to
a model and applies what pays (``MoELayer.apply_placement``).

Legend: W ranks, E experts, El experts per rank, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.layer import MoELayer
from flexmoe.parallel import all_reduce_sum_
from flexmoe.parallel.moves import MoveReport
from flexmoe.planner.placement import LoadTracker, affinity_placement, coactivation_counts

__all__ = ["CoactivationRecorder", "Rebalancer"]


class CoactivationRecorder:
    """Counts, per pair of consecutive MoE layers, tokens routed to ``a`` in one and ``b`` in the next.

    Records from forward hooks on each layer's router (whose output carries the step's
    ``expert_ids_TK``), so the layers run unchanged; a recorder costs one small
    ``bincount`` per layer call. Pairs count only when consecutive calls route the same
    number of tokens (the same tokens through a stack of blocks). ``counts()`` sums the
    ranks' counts (a collective when ``group`` spans several ranks).

    Args:
        layers: the MoE layers in the order tokens pass through them.
    """

    def __init__(self, layers: Sequence[MoELayer], group: Any = None) -> None:
        if len(layers) < 2:
            raise ValueError(f"a co-activation recorder needs at least 2 layers, got {len(layers)}")
        self.layers = list(layers)
        self._group = group
        sizes = [layer.config.num_experts for layer in self.layers]
        self._counts = [torch.zeros(a, b, dtype=torch.int64) for a, b in pairwise(sizes)]
        self._sizes = sizes
        self._previous: tuple[int, Tensor] | None = None
        self._handles = [
            layer.router.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)
        ]

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            ids = output.expert_ids_TK.detach()
            previous = self._previous
            if previous is not None and previous[0] == index - 1 and previous[1].shape[0] == ids.shape[0]:
                self._counts[index - 1] += coactivation_counts(
                    previous[1], ids, self._sizes[index - 1], self._sizes[index]
                )
            self._previous = (index, ids)

        return hook

    def counts(self) -> list[Tensor]:
        """``[E_l, E_{l+1}]`` pair counts for each consecutive pair, summed over the group's ranks."""
        out = [c.clone() for c in self._counts]
        if self._group is not False:
            all_reduce_sum_(out, group=self._group)
        return out

    def reset(self) -> None:
        """Forget what was counted."""
        for c in self._counts:
            c.zero_()
        self._previous = None

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


class Rebalancer:
    """Re-places a model's distributed MoE layers between steps when it pays.

    Call ``step()`` after each ``optimizer.step()``: it feeds every layer's routed counts
    (``layer.stats``) to a ``LoadTracker``, and every ``every`` steps asks
    ``advise_placement`` whether a balanced placement saves more over the next ``every``
    steps than its move costs; layers where it does are moved with
    ``apply_placement(..., optimizer=optimizer)``. With a ``CoactivationRecorder``,
    layers are placed together by ``affinity_placement`` instead (on the same advice of
    the first layer, since affinity placement trades a little balance for locality).
    Every rank must call ``step()`` at the same steps.

    Args:
        model: a model holding distributed ``MoELayer``s.
        optimizer: the optimizer whose state moves with the experts (or ``None``).
        every: steps between re-plans.
        horizon_steps: steps a move must pay back over (default: ``every``).
        decay: the load average's decay per step.
        min_gain: the busiest rank's load must drop by at least this fraction.
        recorder: co-activation counts for affinity placement (optional).

    The advice is each layer's cost model (``MoELayer.placement_advice``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 100,
        decay: float = 0.9,
        min_gain: float = 0.05,
        recorder: CoactivationRecorder | None = None,
        horizon_steps: int | None = None,
    ) -> None:

        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.layers: list[MoELayer] = [
            m for m in model.modules() if isinstance(m, MoELayer) and m.world_size > 1
        ]
        self.optimizer = optimizer
        self.every = every
        self.min_gain = min_gain
        self.recorder = recorder
        self.horizon_steps = every if horizon_steps is None else horizon_steps
        if self.horizon_steps < 1:
            raise ValueError(f"horizon_steps must be >= 1, got {horizon_steps}")
        self.trackers = [LoadTracker(layer.config.num_experts, decay) for layer in self.layers]
        self.steps = 0
        self.reports: list[tuple[int, str, MoveReport]] = []  # (step, layer name, report)

    def step(self) -> list[MoveReport]:
        """Record this step's loads; every ``every`` steps re-place where it pays. Returns the moves made."""
        for layer, tracker in zip(self.layers, self.trackers, strict=True):
            if layer.stats is not None:
                tracker.update(layer.stats.routed_per_expert)
        self.steps += 1
        if self.steps % self.every != 0:
            return []
        made: list[MoveReport] = []
        if self.recorder is not None and len(self.layers) > 1:
            first = self.layers[0]
            advice = first.placement_advice(
                self.trackers[0].loads, self.optimizer, self.horizon_steps, self.min_gain
            )
            if advice.pays:
                counts = self.recorder.counts()
                placements = affinity_placement(
                    [t.loads for t in self.trackers],
                    counts,
                    self.layers[0].world_size,
                    current=[layer.expert_placement for layer in self.layers],
                )
                for layer, placement in zip(self.layers, placements, strict=True):
                    made.append(layer.apply_placement(placement, optimizer=self.optimizer))
                    self.reports.append((self.steps, layer.name, made[-1]))
            self.recorder.reset()
            return made
        for layer, tracker in zip(self.layers, self.trackers, strict=True):
            advice = layer.placement_advice(tracker.loads, self.optimizer, self.horizon_steps, self.min_gain)
            if advice.pays:
                made.append(layer.apply_placement(advice.placement, optimizer=self.optimizer))
                self.reports.append((self.steps, layer.name, made[-1]))
        return made
