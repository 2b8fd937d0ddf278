"""Moving expert rows between ranks in place: parameters, their gradients and optimizer state.

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

Legend: W ranks, E experts, El experts per rank.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flexmoe.parallel.comm import Communicator, all_to_all
from flexmoe.placement import moved_experts

__all__ = ["MoveReport", "move_expert_rows", "move_experts"]


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
