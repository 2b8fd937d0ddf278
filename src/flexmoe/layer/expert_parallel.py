"""The expert-parallel strategy: experts spread over a process group; a ``Plan`` moves rows or weights.

Each call, on every rank:

1. ``begin``: the call's header (tokens, top-k, capacity, plan, grad mode, dtype, the
   previous call's measured time, a stamp of the stored experts) is all-gathered and
   checked, so a rank with a different call or a bad input fails every rank at once;
2. ``run``: the global capacity decision (``flexmoe.parallel.layout``) on physical slots
   (``apply_placement`` may have moved experts; the router's ids stay logical), the
   plan (the given one, or the online tuner's with ``plan="auto"``), the rerouting
   decision (``flexmoe.planner.rerouting.decide_rerouting`` scored by the layer's cost
   model; persistent replicas need no transfer), then ``ExpertParallel.run`` moves rows
   and weights and computes the experts;
3. ``end``: the stopwatch that times this call for the tuner stops.

Legend: T tokens, D model dim, E experts, K top-k, N kept routed slots, W ranks,
El = E/W experts per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flexmoe.config import GATED_ACTIVATIONS, MoEConfig, Plan
from flexmoe.dispatch import permute
from flexmoe.experts import GroupedExperts
from flexmoe.experts.lora import FACTOR_SHARDS
from flexmoe.layer.cost import build_tuner, cost_model
from flexmoe.layer.local import Call, ExpertsOutput
from flexmoe.layer.replicas import ReplicaCache, Stamp
from flexmoe.layer.stats import ExpertStep, RowReport
from flexmoe.layer.stopwatch import Stopwatch
from flexmoe.parallel import ExpertParallel, MoveReport, move_experts, stable_hash
from flexmoe.parallel.layout import GlobalLayout
from flexmoe.placement import Placement, ReroutePlan, SlotMap, check_placement, experts_by_rank
from flexmoe.planner import CostModel, PlacementAdvice, Tuner, TunerDecision, advise_placement
from flexmoe.planner.rerouting import decide_rerouting, summarize
from flexmoe.routing import RouterOutput

__all__ = ["CALL_HEADER", "ExpertParallelExperts"]

# What every rank sends before each call (the same keys on every rank).
CALL_HEADER = (
    "num_tokens",
    "input_ok",
    "top_k",
    "top_p",
    "capacity_factor",
    "plan",
    "grad mode",
    "dtype",
    "previous_us",  # this rank's measured time of the previous call (the tuner's feedback)
    "weights_version",  # this rank's stored experts: sum of their in-place versions ...
    "weights_storage",  # ... and a hash of their storage (persistent replicas are fresh while both hold)
)
EXPERT_TENSORS = ("w_in", "w_out", "b_in", "b_out")


@dataclass(frozen=True)
class Header:
    """What the ranks told each other about this call."""

    tokens_per_rank: list[int]
    previous_s: float  # the previous call's time on the slowest rank
    stamps: list[Stamp]  # each rank's stored experts' stamp


class ExpertParallelExperts:
    """Experts spread over a process group (see the module docstring).

    Args:
        ep: the group's expert parallelism (``flexmoe.parallel.ExpertParallel``).
        experts: this rank's stored experts (the layer owns and registers them).
        config: the layer's configuration.
    """

    def __init__(self, ep: ExpertParallel, experts: GroupedExperts, config: MoEConfig) -> None:
        self.ep = ep
        self.experts = experts
        self.config = config
        self.slots = SlotMap(config.num_experts)
        self.replicas = ReplicaCache()
        self.tuner: Tuner | None = None  # built at the first "auto" call (a collective)
        self.cost: CostModel | None = None  # built at the first decision that needs it (a collective)
        self.watch: Stopwatch | None = None
        self.step = 0

    # ------------------------------------------------------------------ the call
    @property
    def world_size(self) -> int:
        """Ranks the experts are spread over."""
        return self.ep.world_size

    @property
    def placement(self) -> Placement:
        """Which rank stores which experts."""
        return self.ep.placement

    def resolve(self, plan: Plan) -> Plan:
        """``plan`` with ``r`` filled in for this layout, validated."""
        return self.ep.placement.resolve(plan)

    def fail(self) -> None:
        """Tell the other ranks this rank's call was refused (they would wait for it), then go on."""
        self.ep.report_failure(self.step, CALL_HEADER)
        self.step += 1

    def begin(self, x_TD: Tensor, call: Call) -> tuple[Tensor, Header]:
        """Agree on the call with every rank; start the stopwatch."""
        ep = self.ep
        ep.comm.step = self.step
        self.step += 1
        if self.watch is None:
            self.watch = Stopwatch(x_TD.device)
        previous_us = round(1e6 * self.watch.read())
        x_TD = self.watch.start(x_TD)
        values = (
            x_TD.shape[0],
            1,
            call.top_k,
            stable_hash(repr(call.top_p)),
            stable_hash(repr(float(call.capacity_factor))),
            stable_hash(repr(call.plan)),
            int(torch.is_grad_enabled()),
            stable_hash(str(x_TD.dtype)),
            previous_us,
            *self.weights_stamp(),
        )
        header = ep.check_same(dict(zip(CALL_HEADER, values, strict=True)))
        first_stamp = CALL_HEADER.index("weights_version")
        return x_TD, Header(
            tokens_per_rank=header[:, 0].tolist(),
            previous_s=float(header[:, CALL_HEADER.index("previous_us")].max()) / 1e6,
            stamps=[(int(a), int(b)) for a, b in header[:, first_stamp:].tolist()],
        )

    def run(self, x_TD: Tensor, route: RouterOutput, call: Call, header: object) -> ExpertsOutput:
        """Capacity, plan, rerouting, then the exchange and experts (see the module docstring)."""
        assert isinstance(header, Header), "begin() first"
        ep, cfg, cf = self.ep, self.config, call.capacity_factor
        glayout = ep.layout(
            self.slots.to_slots(route.expert_ids_TK),
            route.weights_TK,
            cfg.num_experts,
            cf,
            cfg.capacity.batch_prioritized,
            header.tokens_per_rank,
            route.valid_TK,
        )
        layout = glayout.local
        x_ND = permute(x_TD, layout)
        row_weights_N = route.weights_TK.reshape(-1).index_select(0, layout.slot_ids_N)
        decision = None
        if call.plan == "auto":
            decision = self._tune(glayout, call, x_TD.dtype, header.previous_s)
            plan = ep.placement.resolve(decision.plan)
        else:
            plan = call.plan
        assert plan.r is not None
        reroute = self._reroute(plan, glayout, call, x_TD.dtype)
        plan = dataclasses.replace(plan, reroute=False if reroute is None else reroute.kind)
        y_ND, replica_hits = self._compute(x_ND, row_weights_N, glayout, plan, reroute, header.stamps)
        routed_E = self.slots.to_logical(glayout.routed_per_expert_E)
        step = ExpertStep(
            num_tokens=glayout.num_tokens,
            capacity=layout.capacity,
            routed_per_expert_E=routed_E,
            tokens_per_expert_E=self.slots.to_logical(glayout.tokens_per_expert_E),
            dropped=glayout.dropped,
            plan=plan,
            world_size=ep.world_size,
            # Of the routed assignments (T*K with a fixed k; fewer under top-p routing).
            routed_fraction_E=routed_E.to(torch.float64) / max(1, int(routed_E.sum())),
            rows=self._row_report(plan, glayout, reroute, replica_hits),
            tuner=decision,
        )
        return ExpertsOutput(y_ND, layout, step)

    def sum_over_ranks(self, counts: Tensor) -> Tensor:
        """Per-rank counts of this call (experts per token, choices) summed over the group; a collective."""
        return self.ep.sum_counts(counts, "routing-tally")

    def end(self, y_TD: Tensor) -> Tensor:
        """Stop the stopwatch (its backward mark times the backward)."""
        assert self.watch is not None
        return self.watch.stop(y_TD)

    def _tune(
        self, glayout: GlobalLayout, call: Call, dtype: torch.dtype, previous_s: float
    ) -> TunerDecision:
        if self.tuner is None:
            self.tuner = build_tuner(self.ep, self.config, self.experts.w_in.device)
        return self.tuner.choose(
            glayout.routed_per_expert_E.tolist(),
            glayout.num_tokens,
            call.top_k,
            call.capacity_factor,
            torch.is_grad_enabled(),
            dtype,
            previous_s,
        )

    def _reroute(
        self, plan: Plan, glayout: GlobalLayout, call: Call, dtype: torch.dtype
    ) -> ReroutePlan | None:
        """The step's rerouting (``decide_rerouting``), scored by the layer's cost model."""
        if plan.r != 1 or self.ep.placement.sharded:
            return None
        W, kept = self.ep.world_size, glayout.kept
        loads: list[int] = glayout.tokens_per_expert_E.tolist()
        counts: list[int] = glayout.routed_per_expert_E.tolist()
        training = torch.is_grad_enabled()

        def predict(chosen: ReroutePlan | None) -> float:
            cost = self.cost_model()
            option = Plan(
                r=1, d=plan.d, exchange=plan.exchange, reroute=False if chosen is None else chosen.kind
            )
            actual = None
            if chosen is not None:  # the plan itself: its real sources, copies and held replicas
                # A training step sends held replicas too (their gradients go to the owner).
                every = [(e, p) for p, copies in enumerate(chosen.copies) for e in copies]
                actual = summarize(
                    chosen, loads, W, own_rows=lambda q, e: kept[q][e], transfers=every if training else None
                )
            return cost.predict(
                option,
                counts,
                glayout.num_tokens,
                call.top_k,
                call.capacity_factor,
                training,
                dtype,
                rerouting_plan=actual,
            )

        return decide_rerouting(
            loads,
            W,
            self.config.reroute,
            plan.reroute,
            sources=kept,
            held=self.replicas.held_slots(self.slots.slot_of_expert),
            predict=predict,
        )

    def _compute(
        self,
        x_ND: Tensor,
        row_weights_N: Tensor,
        glayout: GlobalLayout,
        plan: Plan,
        reroute: ReroutePlan | None,
        stamps: list[Stamp],
    ) -> tuple[Tensor, int]:
        """The experts' weighted rows in this rank's expert-major order, and the replica hits."""
        ep, experts = self.ep, self.experts
        if plan.r == 0:  # every expert gathered here; no rows move
            weights, lora = ep.gather_weights(experts, 0), ep.gather_lora(experts, 0)
            counts = glayout.local.counts
            return experts.apply_weights(x_ND, counts, weights, row_weights_N, lora_factors=lora or None), 0
        held = self.replicas.held_slots(self.slots.slot_of_expert)
        if reroute is None or held is None:
            y_ND = ep.run(x_ND, glayout.kept, plan, experts, reroute)
            return y_ND * row_weights_N.to(y_ND.dtype)[:, None], 0
        args = (self.slots.expert_of_slot(), ep.placement.local_experts, ep.placement.rank)
        sends, cached = self.replicas.sends(reroute, held, stamps, *args, torch.is_grad_enabled())
        received: dict[int, Tensor] = {}
        y_ND = ep.run(x_ND, glayout.kept, plan, experts, reroute, sends, cached, received)
        self.replicas.keep(sends, held, stamps, received, *args)
        hits = sum(len(c) for c in reroute.copies) - len(sends)
        return y_ND * row_weights_N.to(y_ND.dtype)[:, None], hits

    def _row_report(
        self, plan: Plan, glayout: GlobalLayout, reroute: ReroutePlan | None, replica_hits: int
    ) -> RowReport | None:
        """Rows per rank with and without rerouting, copies (whole experts, ``r = 1`` only)."""
        pl = self.ep.placement
        if pl.sharded or plan.r != 1:
            return None
        El, W = pl.local_experts, pl.world_size
        kept_E = glayout.tokens_per_expert_E.tolist()
        native = [sum(kept_E[p * El : (p + 1) * El]) for p in range(W)]
        if reroute is None:
            return RowReport(rows_per_rank=native, native_rows_per_rank=native, copies_per_rank=[0] * W)
        logical = self.slots.expert_of_slot()
        return RowReport(
            rows_per_rank=[int(r) for r in reroute.rows_per_rank],
            native_rows_per_rank=native,
            rerouted_rows=int(reroute.moved_rows),
            expert_copies=sum(len(c) for c in reroute.copies) - replica_hits,
            copies_per_rank=[len(c) for c in reroute.copies],
            replica_hits=replica_hits,
            shadowed_experts=sorted(logical[s] for s in reroute.shadowed),
        )

    # --------------------------------------------------------------- the model
    def cost_model(self) -> CostModel:
        """The layer's cost model (built on first use: a collective, the first rank's cluster)."""
        if self.cost is None:
            self.cost = cost_model(self.ep, self.config, self.experts.w_in.device)
        return self.cost

    def weights_stamp(self) -> Stamp:
        """The stamp of the experts stored here: (sum of in-place versions, storage hash)."""
        params = list(self.experts.parameters())
        version = sum(int(p._version) for p in params)
        return version, stable_hash(repr([p.data_ptr() for p in params]))

    # ------------------------------------------------------- placement, replicas
    @property
    def stored_experts(self) -> list[int]:
        """The logical experts this rank stores, in the order of its expert rows."""
        pl = self.ep.placement
        if pl.sharded:
            return [pl.first_expert]
        return experts_by_rank(self.slots.slot_of_expert, pl.world_size)[pl.rank]

    def apply_placement(
        self, slot_of_expert: Sequence[int], optimizer: torch.optim.Optimizer | None
    ) -> MoveReport:
        """Move every expert whose slot changes (see ``MoELayer.apply_placement``)."""
        ep, E = self.ep, self.config.num_experts
        sharded = ep.placement.sharded
        slots = check_placement(slot_of_expert, E, 1 if sharded else ep.world_size)
        if sharded:
            if slots != list(range(E)):
                raise ValueError(
                    f"apply_placement: only the identity placement exists with sharded experts "
                    f"({E} < W={ep.world_size})"
                )
            return MoveReport(0, 0, 0, 0, 0, 0, 0, 0.0)
        ep.check_same({"num_tokens": 0, "placement": stable_hash(repr(slots))})
        params = [p for p in (getattr(self.experts, n) for n in EXPERT_TENSORS) if p is not None]
        if self.experts.lora is not None:  # an adapter's factors (one row per expert) move too
            params += [p for p in self.experts.lora.travelling_factors() if p is not None]
        report = move_experts(params, self.slots.slot_of_expert, slots, ep.comm, optimizer)
        self.slots.set(slots)
        return report

    def set_replicas(self, replicas: Sequence[Sequence[int]] | None) -> None:
        """Keep persistent copies of hot experts (see ``MoELayer.set_replicas``); a collective."""
        ep, E = self.ep, self.config.num_experts
        if ep.placement.sharded:
            if replicas:
                raise ValueError("set_replicas needs a distributed layer with whole experts (E >= W)")
            return
        W = ep.world_size
        table: list[list[int]] | None = None
        if replicas is not None:
            if len(replicas) != W:
                raise ValueError(
                    f"replicas must list the experts of each of the {W} ranks, got {len(replicas)}"
                )
            table = []
            bound = self.config.reroute.max_copies_per_rank
            for p, experts in enumerate(replicas):
                row = sorted({int(e) for e in experts})
                if any(not 0 <= e < E for e in row):
                    raise ValueError(f"replicas[{p}] must hold expert ids in [0, {E}), got {list(experts)}")
                if bound is not None and len(row) > bound:
                    raise ValueError(
                        f"replicas[{p}] holds {len(row)} experts, more than max_copies_per_rank={bound}"
                    )
                table.append(row)
        ep.check_same({"replicas": stable_hash(repr(table))})
        self.replicas.set(table)

    def placement_advice(
        self,
        loads: Sequence[float],
        optimizer: torch.optim.Optimizer | None,
        horizon_steps: int,
        min_gain: float,
    ) -> PlacementAdvice:
        """A balanced placement for ``loads`` and whether moving pays (see ``MoELayer.placement_advice``)."""
        ep = self.ep
        if ep.placement.sharded:
            raise ValueError("placement_advice needs a distributed layer with whole experts (E >= W)")
        per_expert = 0
        for p in self.experts.parameters():
            per_expert += p[0].numel() * p.element_size()
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            per_expert += sum(
                v[0].numel() * v.element_size()
                for v in state.values()
                if isinstance(v, Tensor) and v.shape == p.shape and v.dim() > 0
            )
        cost = self.cost_model()
        k, cf = self.config.top_k, self.config.capacity.capacity_factor
        tokens = max(1, round(sum(loads) / k))
        dtype = self.experts.w_in.dtype

        def step_seconds(rows: list[float]) -> float:
            return cost.predict(Plan(r=1, reroute=False), rows, tokens, k, cf, True, dtype)  # type: ignore[arg-type]

        latency, bandwidth = cost.machine.link(not cost.machine.single_node)
        return advise_placement(
            loads,
            self.slots.slot_of_expert,
            ep.world_size,
            bytes_per_expert=per_expert,
            step_seconds=step_seconds,
            link_bytes_per_s=bandwidth,
            link_latency_s=latency,
            horizon_steps=horizon_steps,
            min_gain=min_gain,
        )

    # -------------------------------------------- single-device layout of tensors
    def local_part(self, name: str, full: Tensor) -> Tensor | None:
        """The part of the single-device expert tensor ``name`` this rank stores (``None``: none)."""
        if not self.slots.is_identity:  # whole experts in this rank's slots
            return full.index_select(0, torch.tensor(self.stored_experts, device=full.device))
        gated = self.config.experts.activation in GATED_ACTIVATIONS
        return self.ep.placement.local_slice(name, full, gated)

    def gather_single_device(self, tensors: Sequence[Tensor | None]) -> dict[str, Tensor | None]:
        """Tensors shaped like this rank's expert parameters, gathered into the single-device layout.

        A collective over every rank; logical expert order.
        """
        has_bias = self.experts.b_in is not None
        with torch.no_grad():
            full = self.ep.gather_like(tuple(tensors), self.experts, 0, has_bias=has_bias)  # type: ignore[arg-type]
        out: dict[str, Tensor | None] = {}
        for name, value in zip(EXPERT_TENSORS, full, strict=True):
            out[name] = None if value is None else self.slots.to_logical(value).detach().clone()
        return out

    def single_device_rows(self, tensors: Sequence[Tensor], split_like: str | None = None) -> list[Tensor]:
        """Tensors with one row per stored expert, gathered into ``[E, ...]`` in logical order.

        ``split_like``: sharded experts only, see ``MoELayer.single_device_expert_rows``.
        A collective over every rank.
        """
        if self.ep.placement.sharded:
            gated = self.config.experts.activation in GATED_ACTIVATIONS
            with torch.no_grad():
                return [self.ep.gather_expert_part(t, split_like, 0, gated).clone() for t in tensors]
        with torch.no_grad():
            return [
                self.slots.to_logical(self.ep.gather_expert_rows(t, "expert rows")).clone() for t in tensors
            ]

    def whole_stored_experts(self, tensors: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """Tensors shaped like this rank's experts, as the whole experts it stores (see the layer)."""
        if not self.ep.placement.sharded:
            return dict(tensors)
        gated = self.config.experts.activation in GATED_ACTIVATIONS
        with torch.no_grad():
            whole = self.ep.gather_like(
                tuple(tensors.get(n) for n in EXPERT_TENSORS),  # type: ignore[arg-type]
                self.experts,
                1,
                has_bias=self.experts.b_in is not None,
            )
            out = dict(zip(EXPERT_TENSORS, whole, strict=True))
            for name, t in tensors.items():  # an adapter's factors: "lora.A_in", ...
                if name.startswith("lora."):
                    like = FACTOR_SHARDS[name.removeprefix("lora.")]
                    out[name] = t if t is None else self.ep.gather_expert_part(t, like, 1, gated)
        return out

    def local_rows(self, full: Tensor, split_like: str | None = None) -> Tensor:
        """The part this rank stores of a per-expert ``[E, ...]`` tensor (``MoELayer.local_expert_rows``)."""
        pl = self.ep.placement
        if not pl.sharded:
            return full.index_select(0, torch.tensor(self.stored_experts, device=full.device))
        one = full[pl.first_expert : pl.first_expert + 1]
        if split_like is None:
            return one
        part = pl.shard_of(split_like, one, self.config.experts.activation in GATED_ACTIVATIONS)
        assert part is not None
        return part
