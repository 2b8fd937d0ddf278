"""Moving expert weights between ranks, differentiably: gathers of shards and whole experts, copies.

The gradient of every moved weight goes back to where the weight is stored: a gathered
shard's gradient is reduce-scattered back onto its rank, a copy's gradient is summed onto
its owner.

Legend: W ranks, El experts per rank, D model dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flexmoe.parallel.comm import Communicator, all_gather_rows, all_to_all, reduce_scatter_rows

__all__ = ["ExpertCopies", "GatherExperts", "GatherShards", "SumOverShards", "Weights"]

Weights = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


def _splits(n: int, members: list[int], comm: Communicator) -> list[int]:
    return [n if p in members else 0 for p in range(dist.get_world_size(comm.group))]


def gather_within(flat: Tensor, members: list[int], comm: Communicator, what: str) -> Tensor:
    """Every member's ``flat`` (this rank among ``members``), ``[members, n]``; a collective."""
    n = flat.numel()
    splits = _splits(n, members, comm)
    send = flat.unsqueeze(0).expand(len(members), n).reshape(-1)
    out = comm.run(all_to_all, what, send, splits, splits, comm.group)
    return out.view(len(members), n)


class GatherShards(torch.autograd.Function):
    """All-gather of one flat tensor inside ``members`` (this rank among them).

    Backward sends each gathered piece's gradient back to its owner, who sums them.
    """

    @staticmethod
    def forward(ctx: Any, flat: Tensor, members: list[int], comm: Communicator) -> Tensor:
        """The moved tensors (see the class docstring)."""
        ctx.members, ctx.comm, ctx.splits = members, comm, _splits(flat.numel(), members, comm)
        return gather_within(flat, members, comm, "weight all-gather")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        """Their gradients, back where the tensors are stored."""
        comm: Communicator = ctx.comm
        back = comm.run(
            all_to_all, "weight reduce-scatter", grad.reshape(-1), ctx.splits, ctx.splits, comm.group
        )
        return back.view(len(ctx.members), -1).sum(0), None, None


class SumOverShards(torch.autograd.Function):
    """The identity on tensors every shard of an expert holds whole; backward sums their gradients.

    ``members`` are the ranks holding the expert's shards (this rank among them). Each
    computes with its own copy on its part of the expert, so its gradient is partial;
    the sum over ``members`` is the whole gradient, the same on every member (summed in
    member order everywhere), so the copies stay equal under any optimizer.
    """

    @staticmethod
    def forward(ctx: Any, members: list[int], comm: Communicator, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The tensors themselves (see the class docstring)."""
        ctx.members, ctx.comm = members, comm
        ctx.shapes = [t.shape for t in tensors]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients summed over ``members`` (one exchange for all of them)."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        summed = gather_within(flat, ctx.members, ctx.comm, "replicated factor gradient sum").sum(0)
        sizes = [s.numel() for s in ctx.shapes]
        parts = [p.view(s) for p, s in zip(summed.split(sizes), ctx.shapes, strict=True)]
        return (None, None, *parts)


class GatherExperts(torch.autograd.Function):
    """All-gather of whole experts (``r = 0``): ``[El, ...]`` on each rank -> ``[W * El, ...]``.

    Rank-major along the expert dimension, which is exactly the gathered layout, so
    nothing is packed or split; backward reduce-scatters the gradient (each rank gets
    the sum of every rank's gradient for its own experts).
    """

    @staticmethod
    def forward(ctx: Any, own: Tensor, comm: Communicator, what: str) -> Tensor:
        """The moved tensors (see the class docstring)."""
        ctx.comm, ctx.what = comm, what
        return comm.run(all_gather_rows, f"{what} all-gather", own, comm.group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        """Their gradients, back where the tensors are stored."""
        comm: Communicator = ctx.comm
        return comm.run(reduce_scatter_rows, f"{ctx.what} reduce-scatter", grad, comm.group), None, None


class ExpertCopies(torch.autograd.Function):
    """The rank's own expert tensors followed by the copies of other ranks' experts it computes.

    ``own`` are the present parameter tensors (``w_in``, ``w_out``, then both biases or
    none), each ``[El, ...]``. Forward sends the rows of ``send_local`` (this rank's
    experts, in destination-rank order) to the ranks that need copies and appends, to
    each tensor, the ``order`` copies: received rows (``"got", i``) or this rank's
    fresh persistent replicas (``"cached", packed row``: constants, no gradient).
    Backward returns each tensor's first ``El`` rows of gradient as they are and adds the
    received copies' gradients onto the sent experts' rows: only the sent experts are
    packed, nothing of full size is zeroed, packed or summed.
    """

    @staticmethod
    def forward(ctx: Any, spec: dict[str, Any], *own: Tensor) -> tuple[Tensor, ...]:
        """The moved tensors (see the class docstring)."""
        comm: Communicator = spec["comm"]
        send_local: Tensor = spec["send_local"]
        widths = [t[0].numel() for t in own]
        got = None
        if spec["exchange"]:  # a collective: every rank joins it when any copy travels
            send = torch.cat(
                [
                    t.index_select(0, send_local).reshape(len(send_local), w)
                    for t, w in zip(own, widths, strict=True)
                ],
                1,
            )
            got = comm.run(
                all_to_all,
                "expert copy all-to-all",
                send,
                spec["send_splits"],
                spec["recv_splits"],
                comm.group,
            )
            received = spec["received"]
            if received is not None:
                received.update({e: row for e, row in zip(spec["mine"], got.unbind(0), strict=True)})
        rows: list[Tensor] = []
        for kind, i, row in spec["order"]:
            if kind == "got":
                assert got is not None
                rows.append(got[i])
            else:
                rows.append(row.to(own[0].dtype))
        ctx.spec, ctx.widths = spec, widths
        ctx.got_slots = [j for j, (kind, _, _) in enumerate(spec["order"]) if kind == "got"]
        ctx.got_index = [i for kind, i, _ in spec["order"] if kind == "got"]
        if not rows:
            return tuple(own)
        copies = torch.stack(rows)
        parts = copies.split(widths, dim=1)
        return tuple(
            torch.cat([t, part.reshape(len(rows), *t.shape[1:])]) for t, part in zip(own, parts, strict=True)
        )

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        """Their gradients, back where the tensors are stored."""
        spec = ctx.spec
        El = spec["local_experts"]
        own = [None if g is None else g[:El] for g in grads]
        if not spec["exchange"]:
            return (None, *own)
        comm: Communicator = spec["comm"]
        n_got = len(spec["mine"])
        ref = next(g for g in grads if g is not None)
        width = sum(ctx.widths)
        # The gradients of the copies this rank received, in the order they arrived.
        send = ref.new_zeros((n_got, width))
        for slot, i in zip(ctx.got_slots, ctx.got_index, strict=True):
            send[i] = torch.cat(
                [
                    (g[El + slot].reshape(-1) if g is not None else ref.new_zeros(w))
                    for g, w in zip(grads, ctx.widths, strict=True)
                ]
            )
        back = comm.run(
            all_to_all,
            "expert copy gradient all-to-all",
            send,
            spec["recv_splits"],
            spec["send_splits"],
            comm.group,
        )
        if back.shape[0]:
            index = spec["send_local"]
            out: list[Tensor | None] = []
            for g, part in zip(own, back.split(ctx.widths, dim=1), strict=True):
                # The incoming gradient is _ExchangeExperts' fresh buffer (nothing else
                # holds it), so its own-expert rows are summed into in place.
                if g is not None:
                    g = g.index_add_(0, index, part.reshape(len(index), *g.shape[1:]).to(g.dtype))
                out.append(g)
            own = out
        return (None, *own)
