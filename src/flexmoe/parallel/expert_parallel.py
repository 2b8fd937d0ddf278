"""The distributed expert stage: gather weights for the plan, exchange rows, run experts, return.

``ExpertParallel.run`` maps this rank's kept expert-major rows ``x_N`` to the sum of
the expert outputs for each row (unweighted; the layer applies routing weights and
combines per token). Under plan ``(r, d, exchange)``:

1. weights: ``r >= 1`` with ``g = S/r > 1``, or ``r = 0``: the shards of the gather
   group are all-gathered (differentiably: their gradients are summed back onto the
   stored shard); otherwise the stored weights are used as they are.
2. rows: cut into ``d`` chunks; chunk ``i``'s all-to-all runs on the communicator
   thread while the experts compute chunk ``i - 1``, and its return all-to-all while
   they compute chunk ``i + 1``. Backward runs the same pipeline in reverse.
3. partial outputs of a row (``r > 1`` slices of one expert) are summed on return.

Legend: N kept rows on this rank, D model dim, W ranks.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flexmoe.config import GATED_ACTIVATIONS, Plan
from flexmoe.experts import GroupedExperts
from flexmoe.experts.lora import FACTOR_SHARDS
from flexmoe.parallel.comm import (
    Communicator,
    exchange,
)
from flexmoe.parallel.layout import GlobalLayout, check_header, make_global_layout
from flexmoe.parallel.routes import Chunk, build_chunks, plan_pieces, reroute_pieces
from flexmoe.parallel.runtime import DistributedContext, local_world_size, resolve_group
from flexmoe.parallel.weights import ExpertCopies, GatherExperts, GatherShards, SumOverShards, Weights
from flexmoe.placement import Placement, ReroutePlan
from flexmoe.workspace import WORKSPACE

__all__ = ["ExpertParallel"]


def _join_hidden(t: Tensor, n_sh: int, F_loc: int, hidden_axis: int, gated: bool) -> Tensor:
    """``[members, 1, ...]`` hidden shards (``n_sh`` per expert, in order) -> ``[n_e, ...]`` joined.

    ``hidden_axis`` 1 (``w_in``'s rows; gated: ``[gate_s; up_s]`` per shard -> ``[gate; up]``)
    or 2 (``w_out``'s columns).
    """
    n_e = t.shape[0] // n_sh
    t = t.view(n_e, n_sh, *t.shape[2:])
    if gated and hidden_axis == 1:
        t = t.view(n_e, n_sh, 2, F_loc, *t.shape[3:]).transpose(1, 2)
        return t.reshape(n_e, 2 * n_sh * F_loc, *t.shape[4:])
    return torch.cat(t.unbind(1), dim=hidden_axis)


class _ExchangeExperts(torch.autograd.Function):
    """Pipelined exchange -> experts -> exchange back, with a pipelined backward."""

    @staticmethod
    def forward(ctx: Any, x_N: Tensor, engine: _Engine, *weights: Tensor | None) -> Tensor:
        needs_grad = any(ctx.needs_input_grad)
        leaves: list[Tensor | None] = [
            None if w is None else w.detach().requires_grad_(w.requires_grad) for w in weights
        ]
        saved: list[tuple[Tensor, Tensor] | None] = []

        def compute(i: int, x_rows: Tensor) -> Tensor:
            if x_rows.shape[0] == 0:
                saved.append(None)
                return x_rows.new_empty(x_rows.shape)
            if not needs_grad:
                return engine.compute(x_rows, i, leaves)
            x_leaf = x_rows.detach().requires_grad_(ctx.needs_input_grad[0])
            with torch.enable_grad():
                y_rows = engine.compute(x_leaf, i, leaves)
            saved.append((x_leaf, y_rows))
            return y_rows.detach()

        y_N = engine.pipeline(x_N, compute, "dispatch", "return")
        ctx.engine, ctx.leaves, ctx.saved = engine, leaves, saved
        return y_N

    @staticmethod
    def backward(ctx: Any, grad_y_N: Tensor) -> tuple[Tensor | None, ...]:
        engine: _Engine = ctx.engine
        leaves: list[Tensor | None] = ctx.leaves
        wanted = [w for w in leaves if w is not None and w.requires_grad]
        totals: list[Tensor | None] = [None] * len(wanted)

        def compute(i: int, grad_rows: Tensor) -> Tensor:
            item = ctx.saved[i]
            if item is None:
                return grad_rows.new_zeros(grad_rows.shape)
            x_leaf, y_rows = item
            inputs = ([x_leaf] if x_leaf.requires_grad else []) + wanted
            grads = torch.autograd.grad(y_rows, inputs, grad_rows.to(y_rows.dtype), allow_unused=True)
            offset = 1 if x_leaf.requires_grad else 0
            for j, g in enumerate(grads[offset:]):
                total = totals[j]
                if g is not None:
                    totals[j] = g if total is None else total + g
            ctx.saved[i] = None
            return grads[0] if x_leaf.requires_grad else grad_rows.new_zeros(x_leaf.shape)

        grad_x_N = engine.pipeline(grad_y_N.contiguous(), compute, "backward return", "backward dispatch")
        result: list[Tensor | None] = [grad_x_N if ctx.needs_input_grad[0] else None, None]
        it = iter(totals)
        for w in leaves:
            if w is not None and w.requires_grad:
                g = next(it)
                result.append(torch.zeros_like(w) if g is None else g)
            else:
                result.append(None)
        return tuple(result)


class _Engine:
    """One step's routes plus the compute callback, shared by forward and backward."""

    def __init__(
        self,
        chunks: list[Chunk],
        comm: Communicator,
        plan: Plan,
        ranks_per_node: int,
        experts: GroupedExperts,
    ) -> None:
        self.chunks = chunks
        self.comm = comm
        self.plan = plan
        self.ranks_per_node = ranks_per_node
        self.experts = experts
        self.rank = dist.get_rank(comm.group)

    def compute(self, x_rows: Tensor, i: int, weights: list[Tensor | None]) -> Tensor:
        w_in, w_out, b_in, b_out = weights[:4]
        assert w_in is not None and w_out is not None
        lora = weights[4:] or None  # an adapter's factors, moved with the weights
        return self.experts.apply_weights(
            x_rows, self.chunks[i].unit_counts, (w_in, w_out, b_in, b_out), lora_factors=lora
        )

    def _exchange(self, rows: Tensor, matrix: list[list[int]]) -> Tensor:
        return exchange(rows, matrix, self.rank, self.plan.exchange, self.ranks_per_node, self.comm.group)

    def pipeline(self, src_N: Tensor, compute: Any, out_name: str, back_name: str) -> Tensor:
        """Send each chunk's rows out, ``compute`` on what arrives, send results back, sum them.

        The transient row buffers (sent, received, reordered, returned) come from the
        workspace pool and go back to it once their exchange is done (re-faulting fresh
        multi-MiB buffers every step costs more than the copies that fill them on CPU).
        """
        comm = self.comm
        width, dtype, device = src_N.shape[1:], src_N.dtype, src_N.device
        outgoing: list[Future[Tensor]] = []
        sent: list[Tensor] = []
        for chunk in self.chunks:
            rows = WORKSPACE.take((chunk.send_index.numel(), *width), dtype, device)
            torch.index_select(src_N, 0, chunk.send_index, out=rows)
            sent.append(rows)
            outgoing.append(comm.submit(self._exchange, rows, chunk.matrix))
        returning: list[Future[Tensor]] = []
        for i, chunk in enumerate(self.chunks):
            received = comm.wait(outgoing[i], f"{out_name} all-to-all (chunk {i + 1}/{len(self.chunks)})")
            WORKSPACE.give(sent[i])
            perm = chunk.recv_perm
            unit_rows = received
            if perm is not None:
                unit_rows = WORKSPACE.take(tuple(received.shape), received.dtype, device)
                torch.index_select(received, 0, perm, out=unit_rows)
                WORKSPACE.give(received)
            del received
            result = compute(i, unit_rows)
            del unit_rows
            if perm is not None:
                ordered = WORKSPACE.take(tuple(result.shape), result.dtype, device)
                ordered.index_copy_(0, perm, result)
                WORKSPACE.give(result)  # kept only if nothing (autograd) still holds it
                result = ordered
            transposed = [list(col) for col in zip(*chunk.matrix, strict=True)]
            sent[i] = result
            returning.append(comm.submit(self._exchange, result, transposed))
            del result
        out_N = src_N.new_zeros(src_N.shape)
        for i, chunk in enumerate(self.chunks):
            back = comm.wait(returning[i], f"{back_name} all-to-all (chunk {i + 1}/{len(self.chunks)})")
            WORKSPACE.give(sent[i])
            out_N.index_add_(0, chunk.send_index, back.to(out_N.dtype))
            WORKSPACE.give(back)
        return out_N


class ExpertParallel:
    """A layer's expert parallelism: placement, communicator and the per-step expert stage."""

    def __init__(self, context: DistributedContext, placement: Placement, comm: Communicator) -> None:
        self.context = context
        self.placement = placement
        self.comm = comm

    @classmethod
    def create(
        cls,
        group: Any,
        num_experts: int,
        hidden_dim: int,
        ranks_per_node: int | None,
        timeout: float | None,
    ) -> ExpertParallel | None:
        """The expert parallelism for ``group`` (see ``resolve_group``), or ``None`` for one device."""
        context = resolve_group(group, timeout)
        if context is None:
            return None
        L = local_world_size(context.world_size) if ranks_per_node is None else ranks_per_node
        if context.world_size < L:  # torchrun's node is larger than this group
            L = context.world_size
        placement = Placement(context.world_size, context.rank, num_experts, hidden_dim, L)
        comm = Communicator(context.private_group, "moe", timeout)
        return cls(context, placement, comm)

    @property
    def world_size(self) -> int:
        """Ranks in the group."""
        return self.placement.world_size

    @property
    def meta_device(self) -> torch.device:
        """Where small metadata tensors live for this group's backend (NCCL: the current GPU)."""
        if dist.get_backend(self.comm.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def report_failure(self, step: int, keys: tuple[str, ...]) -> None:
        """Join this step's header exchange (fields ``keys``) flagging a rejected input.

        The other ranks then raise too instead of waiting for this one.
        """
        self.comm.step = step
        with contextlib.suppress(RuntimeError):  # expected: this rank is among those that failed
            self.check_same({key: 0 for key in keys})

    def check_same(self, fields: dict[str, int]) -> Tensor:
        """All-gather ``fields``; raise on every rank if any (but ``num_tokens``) differs."""
        return check_header(self.comm, fields, self.meta_device)

    @torch.no_grad()
    def broadcast_(self, module: nn.Module) -> None:
        """Make ``module``'s parameters and buffers those of the group's first rank."""
        source = dist.get_process_group_ranks(self.comm.group)[0]
        device = self.meta_device
        for tensor in [*module.parameters(), *module.buffers()]:
            staged = tensor.detach().to(device)

            def send(t: Tensor = staged) -> None:
                dist.broadcast(t, source, group=self.comm.group)

            self.comm.run(send, "router broadcast")
            tensor.copy_(staged)

    def first_rank_object(self, value: Any, what: str) -> Any:
        """The group's first rank's ``value`` (picklable), on every rank; a collective."""
        source = dist.get_process_group_ranks(self.comm.group)[0]
        box: list[Any] = [value]

        def send() -> None:
            dist.broadcast_object_list(box, source, group=self.comm.group)

        self.comm.run(send, f"{what} broadcast")
        return box[0]

    def layout(
        self,
        expert_ids_TK: Tensor,
        weights_TK: Tensor,
        num_experts: int,
        capacity_factor: float,
        batch_prioritized: bool,
        tokens_per_rank: list[int],
        valid_TK: Tensor | None = None,
    ) -> GlobalLayout:
        """The step's global capacity decision (see ``flexmoe.parallel.layout``); ``valid_TK``: used slots."""
        return make_global_layout(
            expert_ids_TK,
            weights_TK,
            num_experts,
            capacity_factor,
            batch_prioritized,
            tokens_per_rank,
            self.comm,
            valid_TK,
        )

    def sum_counts(self, counts: Tensor, what: str) -> Tensor:
        """``counts`` (an integer tensor) summed over the group, on ``counts``' device; a collective."""
        staged = counts.detach().to(self.meta_device, torch.int64).clone()

        def reduce() -> None:
            dist.all_reduce(staged, group=self.comm.group)

        self.comm.run(reduce, f"{what} all-reduce")
        return staged.to(counts.device)

    def gather_weights(self, experts: GroupedExperts, r: int) -> Weights:
        """The weights this rank computes with under sharing degree ``r`` (gathered if needed)."""
        own: Weights = (experts.w_in, experts.w_out, experts.b_in, experts.b_out)
        return self.gather_like(own, experts, r)

    def gather_lora(self, experts: GroupedExperts, r: int) -> tuple[Tensor | None, ...]:
        """The LoRA factors that go with ``gather_weights(experts, r)``, differentiably.

        Sharded experts: ``B_in`` and ``A_out`` are gathered like ``w_in`` and ``w_out``;
        ``A_in`` and ``B_out``, whole on each shard, first pass through ``SumOverShards``
        (each shard's gradient is partial), and are gathered only for ``r = 0`` (a gather
        group of ``r >= 1`` holds one expert, whose factors every member has).
        """
        factors = experts.travelling_lora()
        members = self.placement.gather_group(r)
        if not factors:
            return factors
        if self.placement.sharded:
            return self._gather_sharded_lora(factors, r, experts.activation in GATED_ACTIVATIONS)
        if len(members) == 1:
            return factors
        return tuple(None if t is None else self.gather_expert_rows(t, "lora factor") for t in factors)

    def _gather_sharded_lora(
        self, factors: tuple[Tensor | None, ...], r: int, gated: bool
    ) -> tuple[Tensor | None, ...]:
        out = list(factors)
        names = list(FACTOR_SHARDS)
        whole = [i for i, t in enumerate(out) if t is not None and FACTOR_SHARDS[names[i]] is None]
        summed = [i for i in whole if out[i].requires_grad]  # type: ignore[union-attr]
        if summed and torch.is_grad_enabled():
            expert_ranks = self.placement.gather_group(1)  # the S shards of this rank's expert
            moved = SumOverShards.apply(expert_ranks, self.comm, *(out[i] for i in summed))
            for i, t in zip(summed, moved, strict=True):
                out[i] = t
        if len(self.placement.gather_group(r)) == 1:
            return tuple(out)
        return tuple(
            t
            if t is None or (r >= 1 and FACTOR_SHARDS[name] is None)
            else self.gather_expert_part(t, FACTOR_SHARDS[name], r, gated)
            for name, t in zip(names, out, strict=True)
        )

    def gather_expert_part(self, own: Tensor, like: str | None, r: int, gated: bool) -> Tensor:
        """A sharded expert's per-expert tensor ``[1, ...]`` gathered over the group of ``r``, differentiably.

        ``like``: ``"w_in"`` or ``"w_out"`` for a tensor cut along the hidden dim like that
        weight (joined like ``gather_weights`` joins it), ``None`` for one whole on every
        shard (each expert's first member's copy is kept). Returns ``[n_e, ...]``: the
        group's experts (``r = 0``: all ``E``). A collective over the group.
        """
        pl = self.placement
        members = pl.gather_group(r)
        gathered: Tensor = GatherShards.apply(own.reshape(-1), members, self.comm)
        parts = gathered.view(len(members), *own.shape)
        n_sh = min(len(members), pl.shards)
        if like is None:
            return parts.view(len(members) // n_sh, n_sh, *own.shape[1:])[:, 0]
        return _join_hidden(parts, n_sh, pl.local_hidden_dim, 1 if like == "w_in" else 2, gated)

    def gather_expert_rows(self, own: Tensor, what: str) -> Tensor:
        """``[El, ...]`` per rank -> ``[W * El, ...]`` in slot order, differentiably; a collective."""
        gathered: Tensor = GatherExperts.apply(own, self.comm, what)
        return gathered

    def gather_like(
        self, tensors: Weights, experts: GroupedExperts, r: int, has_bias: bool | None = None
    ) -> Weights:
        """Gather tensors shaped like ``experts``' parameters as ``gather_weights`` does.

        The parameters themselves, their gradients or optimizer state. Differentiable; a
        collective over the gather group of ``r`` (every rank calls it).
        """
        pl = self.placement
        members = pl.gather_group(r)
        if len(members) == 1:
            return tensors
        if has_bias is None:
            has_bias = experts.b_in is not None
        El, D = pl.local_experts, experts.dim
        w_in_t, w_out_t, b_in_t, b_out_t = tensors
        if not pl.sharded:  # r = 0 with whole experts: one all-gather per tensor, no packing
            assert len(members) == pl.world_size
            names = ("w_in", "w_out", "b_in", "b_out")
            out: list[Tensor | None] = []
            for name, t in zip(names, (w_in_t, w_out_t, b_in_t, b_out_t), strict=True):
                if has_bias and name == "b_out" and t is None:
                    assert b_in_t is not None
                    t = b_in_t.new_zeros(El, D)
                if t is None or (name.startswith("b") and not has_bias):
                    out.append(None)
                    continue
                out.append(GatherExperts.apply(t, self.comm, f"weight ({name})"))
            w_in_g, w_out_g, b_in_g, b_out_g = out
            assert w_in_g is not None and w_out_g is not None
            return w_in_g, w_out_g, b_in_g, b_out_g
        pieces = [w_in_t.reshape(-1), w_out_t.reshape(-1)]
        if has_bias:
            assert b_in_t is not None
            own_b_out = b_out_t if b_out_t is not None else b_in_t.new_zeros(El, D)
            pieces += [b_in_t.reshape(-1), own_b_out.reshape(-1)]
        flat = torch.cat(pieces)
        gathered = GatherShards.apply(flat, members, self.comm)
        shapes = [w_in_t.shape, w_out_t.shape]
        if has_bias:
            assert b_in_t is not None
            shapes += [b_in_t.shape, torch.Size((El, D))]
        sizes = [s.numel() for s in shapes]
        parts = [
            t.view(len(members), *shape) for t, shape in zip(gathered.split(sizes, 1), shapes, strict=True)
        ]
        gated = experts.activation in GATED_ACTIVATIONS
        # Sharded: members hold consecutive hidden shards of n_e experts (n_sh shards each).
        n_sh = min(len(members), pl.shards)
        n_e = len(members) // n_sh
        F_loc = pl.local_hidden_dim
        b_in = _join_hidden(parts[2], n_sh, F_loc, 1, gated) if has_bias else None
        b_out = None
        if has_bias and members[0] % pl.shards == 0:  # the slice holding hidden shard 0
            b_out = parts[3].view(n_e, n_sh, D)[:, 0]
        w_in = _join_hidden(parts[0], n_sh, F_loc, 1, gated)
        return w_in, _join_hidden(parts[1], n_sh, F_loc, 2, gated), b_in, b_out

    def with_copies(
        self,
        experts: GroupedExperts,
        reroute: ReroutePlan,
        sends: list[tuple[int, int]] | None = None,
        cached: dict[int, Tensor] | None = None,
        received: dict[int, Tensor] | None = None,
    ) -> tuple[Weights, tuple[Tensor | None, ...]]:
        """The rank's own experts followed by the copies ``reroute`` gives it (differentiably).

        Returns the weights and the LoRA factors that travel with them (see
        ``GroupedExperts.travelling_lora``).

        ``sends``: the ``(expert, rank)`` copies that travel this step (default: the plan's
        transfers; every rank passes the same list); a copy this rank uses but is not
        sent comes from ``cached`` (its persistent replicas: packed rows, no gradient).
        The rows received are put in ``received`` (expert -> packed row) when given.
        """
        pl = self.placement
        El, me, W = pl.local_experts, pl.rank, pl.world_size
        sends = reroute.transfers if sends is None else sends
        lora = experts.travelling_lora()
        own = [experts.w_in, experts.w_out, experts.b_in, experts.b_out, *lora]
        present = [t for t in own if t is not None]
        mine = sorted(e for e, p in sends if p == me)  # sources in rank order = experts in order
        send_local: list[int] = []
        send_splits = [0] * W
        for p in range(W):
            for e in sorted(e for e, q in sends if q == p):
                if e // El == me:
                    send_local.append(e - me * El)
                    send_splits[p] += 1
        order: list[tuple[str, int, Tensor | None]] = []
        for e in reroute.copies[me]:
            if e in mine:
                order.append(("got", mine.index(e), None))
            elif cached is not None and e in cached:
                order.append(("cached", -1, cached[e]))
            else:
                raise RuntimeError(f"expert {e}'s copy is neither sent to rank {me} nor held by it")
        spec = {
            "comm": self.comm,
            "exchange": bool(sends),  # every rank knows the same list
            "local_experts": El,
            "send_local": torch.tensor(send_local, dtype=torch.int64, device=present[0].device),
            "send_splits": send_splits,
            "recv_splits": [sum(1 for e in mine if e // El == q) for q in range(W)],
            "mine": mine,
            "order": order,
            "received": None,
        }
        got_rows: dict[int, Tensor] = {}
        if received is not None:
            spec["received"] = got_rows
        out = iter(ExpertCopies.apply(spec, *present))
        if received is not None:
            received.update({e: row.detach() for e, row in got_rows.items()})
        w_in, w_out = next(out), next(out)
        b_in = next(out) if experts.b_in is not None else None
        b_out = next(out) if experts.b_out is not None else None
        moved_lora = tuple(None if t is None else next(out) for t in lora)
        return (w_in, w_out, b_in, b_out), moved_lora

    def run(
        self,
        x_N: Tensor,
        kept: list[list[int]],
        plan: Plan,
        experts: GroupedExperts,
        reroute: ReroutePlan | None = None,
        sends: list[tuple[int, int]] | None = None,
        cached: dict[int, Tensor] | None = None,
        received: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """Expert outputs (unweighted) for this rank's kept rows, under a resolved ``plan`` (``r >= 1``).

        ``sends``, ``cached``, ``received``: persistent replicas (see ``with_copies``).
        """
        assert plan.r is not None and plan.r >= 1
        pl = self.placement
        if reroute is None:
            weights, lora = self.gather_weights(experts, plan.r), self.gather_lora(experts, plan.r)
            pieces = plan_pieces(pl, kept, plan.r)
            units = pl.local_experts
        else:
            weights, lora = self.with_copies(experts, reroute, sends, cached, received)
            pieces = reroute_pieces(kept, reroute, pl.local_experts)
            units = pl.local_experts + len(reroute.copies[pl.rank])
        chunks = build_chunks(pl.world_size, pl.rank, kept, pieces, units, plan.d, x_N.device)
        engine = _Engine(chunks, self.comm, plan, self.placement.ranks_per_node, experts)
        out: Tensor = _ExchangeExperts.apply(x_N, engine, *weights, *lora)
        return out
