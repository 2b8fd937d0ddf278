"""Re-placing experts between steps: moving their parameters and optimizer state, tracking load.

``MoELayer.apply_placement(slot_of_expert, optimizer=...)`` (a documented collective,
never run inside a forward) moves every expert whose slot changes: its parameter rows
and, with ``optimizer``, every per-parameter state tensor shaped like the parameter
(AdamW's ``exp_avg`` / ``exp_avg_sq``, SGD's momentum, ...), and any ``.grad``. Rows are
written in place, so parameter objects and their storage stay the same: the optimizer,
DDP (which ignores expert parameters) and any hook keep working. Scalar state (AdamW's
``step``) is per parameter, not per expert, and identical on every rank in the training
recipe; it is checked to be so and left as it is.

What moves: tensor by tensor, each rank packs the rows that leave it, one variable-size
all-to-all delivers them, and the receiver writes them into the new slots; moves inside
one rank are copies. The transient memory is the packed rows of one tensor (sent and
received), never the whole model (``MoveReport.peak_buffer_bytes``).

``LoadTracker`` keeps the moving average of routed rows per expert that the planners in
``flexmoe.parallel.placement`` take; ``CoactivationRecorder`` counts consecutive-layer
expert pairs for ``affinity_placement``; ``Rebalancer`` ties them to a model.

Legend: W ranks, E experts, El experts per rank, T tokens, K top-k.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flexmoe.parallel.comm import Communicator, all_to_all
from flexmoe.parallel.placement import affinity_placement, coactivation_counts, moved_experts

if TYPE_CHECKING:
    from flexmoe.layer import MoELayer

__all__ = [
    "CoactivationRecorder",
    "LoadTracker",
    "MoveReport",
    "Rebalancer",
    "move_expert_rows",
    "move_experts",
]


@dataclass(frozen=True)
class MoveReport:
    """What one ``apply_placement`` moved (this rank's view; the expert counts are global).

    Attributes:
        experts_moved: logical experts that changed rank.
        local_moves: experts that changed slot within their rank.
        tensors: tensors moved per expert (parameters, optimizer state, gradients).
        bytes_sent, bytes_received: by this rank, over all tensors.
        total_bytes: sent by all ranks together.
        peak_buffer_bytes: the largest transient buffer this rank held (one tensor's
            packed rows, out and in).
        seconds: wall time of the move on this rank (collectives included).
    """

    experts_moved: int
    local_moves: int
    tensors: int
    bytes_sent: int
    bytes_received: int
    total_bytes: int
    peak_buffer_bytes: int
    seconds: float


def _routes(
    old: Sequence[int], new: Sequence[int], world_size: int, rank: int
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """One rank's part of a move between placements.

    Local rows to send to each rank, local rows to fill from each rank (both in
    logical-expert order, which both sides agree on), and the local source and
    destination rows of moves inside the rank.
    """
    El = len(old) // world_size
    send: list[list[int]] = [[] for _ in range(world_size)]
    fill: list[list[int]] = [[] for _ in range(world_size)]
    local_src: list[int] = []
    local_dst: list[int] = []
    for e in range(len(old)):
        src, dst = old[e], new[e]
        if src == dst:
            continue
        src_rank, dst_rank = src // El, dst // El
        if src_rank == rank and dst_rank == rank:
            local_src.append(src % El)
            local_dst.append(dst % El)
        elif src_rank == rank:
            send[dst_rank].append(src % El)
        elif dst_rank == rank:
            fill[src_rank].append(dst % El)
    return send, fill, local_src, local_dst


@torch.no_grad()
def move_expert_rows(
    tensors: Iterable[Tensor],
    old: Sequence[int],
    new: Sequence[int],
    comm: Communicator,
    what: str = "placement move",
) -> tuple[int, int, int]:
    """Move the expert rows (dim 0, one row per local slot) of ``tensors`` from placement ``old`` to ``new``.

    A collective over ``comm``'s group: every rank passes its tensors in the same order.
    In place. Returns ``(bytes sent, bytes received, peak transient buffer bytes)``.
    """
    W = dist.get_world_size(comm.group)
    me = dist.get_rank(comm.group)
    send, fill, local_src, local_dst = _routes(old, new, W, me)
    send_splits = [len(rows) for rows in send]
    recv_splits = [len(rows) for rows in fill]
    sent = received = peak = 0
    for t in tensors:
        device = t.device
        send_index = torch.tensor([i for rows in send for i in rows], dtype=torch.int64, device=device)
        fill_index = torch.tensor([i for rows in fill for i in rows], dtype=torch.int64, device=device)
        # Read everything that leaves a slot before any slot is written.
        outgoing = t.index_select(0, send_index)
        staying = t.index_select(0, torch.tensor(local_src, dtype=torch.int64, device=device))
        incoming = comm.run(all_to_all, f"{what} all-to-all", outgoing, send_splits, recv_splits, comm.group)
        t.index_copy_(0, fill_index, incoming)
        t.index_copy_(0, torch.tensor(local_dst, dtype=torch.int64, device=device), staying)
        row = t[0].numel() * t.element_size() if t.shape[0] else 0
        sent += row * (sum(send_splits) - send_splits[me])
        received += row * sum(recv_splits)
        peak = max(peak, row * (outgoing.shape[0] + incoming.shape[0] + staying.shape[0]))
    return sent, received, peak


@torch.no_grad()
def move_experts(
    params: Sequence[Tensor],
    old: Sequence[int],
    new: Sequence[int],
    comm: Communicator,
    optimizer: torch.optim.Optimizer | None = None,
) -> MoveReport:
    """Move expert parameters, their gradients and optimizer state from placement ``old`` to ``new``.

    ``params``: ``[El, ...]`` each (see the module docstring).

    A collective: every rank passes its parameters in the same order. Raises
    ``RuntimeError`` on every rank if the ranks' optimizer state differs in kind (keys,
    scalar values such as AdamW's ``step``), before anything moves.
    """
    start = time.perf_counter()
    W = dist.get_world_size(comm.group)
    tensors: list[Tensor] = []
    signature: list[str] = []
    for i, p in enumerate(params):
        tensors.append(p.data)
        if p.grad is not None:
            tensors.append(p.grad)
            signature.append(f"{i}:grad")
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in sorted(state):
            value = state[key]
            if isinstance(value, Tensor) and value.shape == p.shape and value.dim() > 0:
                tensors.append(value)
                signature.append(f"{i}:{key}")
            else:  # per-parameter scalars: must agree, since they do not move
                shown = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
                signature.append(f"{i}:{key}={shown!r}")
    what = "optimizer state and gradients of the expert parameters"
    _check_same_everywhere(comm, "|".join(signature), what)
    sent, received, peak = move_expert_rows(tensors, old, new, comm)
    El = len(old) // W
    moved = moved_experts(old, new, W)
    local = sum(1 for e in range(len(old)) if old[e] != new[e] and old[e] // El == new[e] // El)
    per_expert = sum(t[0].numel() * t.element_size() for t in tensors if t.shape[0])
    return MoveReport(
        experts_moved=len(moved),
        local_moves=local,
        tensors=len(tensors),
        bytes_sent=sent,
        bytes_received=received,
        total_bytes=per_expert * len(moved),
        peak_buffer_bytes=peak,
        seconds=time.perf_counter() - start,
    )


def _check_same_everywhere(comm: Communicator, text: str, what: str) -> None:
    """Raise on every rank unless every rank passes the same ``text``."""
    W = dist.get_world_size(comm.group)
    gathered: list[Any] = [None] * W
    comm.run(lambda: dist.all_gather_object(gathered, text, group=comm.group), f"{what} check")
    if len(set(gathered)) > 1:
        raise RuntimeError(
            f"MoELayer {comm.name!r}: ranks disagree on the {what}: {gathered} "
            "(move experts between optimizer steps, on every rank)"
        )


class LoadTracker:
    """Moving average of routed rows per logical expert (bias-corrected like Adam's moments).

    ``update(counts)`` after each step, e.g. with ``layer.stats.routed_per_expert``
    (global counts, the same on every rank, so every rank's average is the same and
    plans made from it agree). ``loads`` is the average: ``sum_i decay^(n-i) c_i`` over
    ``sum_i decay^(n-i)``.
    """

    def __init__(self, num_experts: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.decay = decay
        self._sum = torch.zeros(num_experts, dtype=torch.float64)
        self._weight = 0.0
        self.steps = 0

    def update(self, counts: Tensor | Sequence[int]) -> None:
        """Add one step's per-expert counts."""
        c = torch.as_tensor(counts, dtype=torch.float64).cpu()
        if c.shape != self._sum.shape:
            raise ValueError(f"counts must have shape {tuple(self._sum.shape)}, got {tuple(c.shape)}")
        self._sum = self.decay * self._sum + c
        self._weight = self.decay * self._weight + 1.0
        self.steps += 1

    @property
    def loads(self) -> list[float]:
        """The average rows per expert (zeros before the first update)."""
        if self._weight == 0:
            return [0.0] * self._sum.numel()
        average: list[float] = (self._sum / self._weight).tolist()
        return average


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
        if dist.is_available() and dist.is_initialized() and self._group is not False:
            for c in out:
                dist.all_reduce(c, group=self._group)
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
        from flexmoe.layer import MoELayer

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
