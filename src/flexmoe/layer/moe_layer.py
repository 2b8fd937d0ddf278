"""``MoELayer``: route -> plan -> permute -> experts -> combine, composed from the stages.

Legend: T tokens, D model dim, E experts, K top-k, N kept routed slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flexmoe.config import (
    GATED_ACTIVATIONS,
    BalanceConfig,
    CapacityConfig,
    ExpertConfig,
    MoEConfig,
    Plan,
    RerouteConfig,
    RouterConfig,
    TunerConfig,
    validate_capacity_factor,
    validate_top_k,
)
from flexmoe.dispatch import Dispatcher, DispatchLayout, LocalDispatcher, make_layout
from flexmoe.dispatch.permute import combine, permute
from flexmoe.experts import DenseFFN, GroupedExperts, ModuleListExperts
from flexmoe.layer.cost import build_tuner, cost_model
from flexmoe.layer.stopwatch import Stopwatch
from flexmoe.parallel import ExpertParallel, stable_hash, tag_expert_parameters
from flexmoe.parallel.layout import GlobalLayout
from flexmoe.parallel.moves import MoveReport, move_experts
from flexmoe.placement import Placement, ReroutePlan, check_placement, experts_by_rank
from flexmoe.planner.layer_cost import CostModel
from flexmoe.planner.placement import PlacementAdvice, advise_placement
from flexmoe.planner.rerouting import plan_rerouting, summarize
from flexmoe.planner.tuner import Tuner, TunerDecision
from flexmoe.routing import aux_free_bias_update, build_router, load_balance_loss, router_z_loss
from flexmoe.routing.routers import RouterOutput
from flexmoe.workspace import WORKSPACE

__all__ = ["MoELayer", "MoEStats", "attach_aux_free_update", "name_moe_layers", "update_expert_biases"]


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
        balance_loss, z_loss: the unweighted loss terms (detached), or ``None`` when off.
        rows_per_rank, native_rows_per_rank: expert rows each rank computed, and would
            have computed without rerouting (distributed layers with whole experts).
        rerouted_rows, expert_copies: rows computed away from their expert's rank, and
            expert weight copies sent, this call; ``copies_per_rank`` the copies each
            rank received.
        replica_hits: copies served by persistent replicas (``set_replicas``), not sent.
        shadowed_experts: experts shadowed this call (``plan.reroute == "shadow"``): every
            rank computed its own rows of them with a copy.
        tuner: with ``plan="auto"``, the online tuner's decision for this call (a
            ``flexmoe.planner.tuner.TunerDecision``: bucket, phase, predicted time,
            the previous call's measured time), else ``None``.
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


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN layer: input ``[..., dim]``, output the same shape.

    Example:
        >>> layer = MoELayer(dim=64, hidden_dim=128, num_experts=8, top_k=2)
        >>> y = layer(torch.randn(4, 10, 64))
        >>> loss = y.square().mean() + layer.aux_loss

    Args:
        dim: model dimension ``D``.
        hidden_dim: hidden dimension of each routed expert.
        num_experts: routed experts ``E``.
        top_k: experts per token (overridable per call).
        activation: ``relu``, ``gelu``, ``silu``, ``swiglu`` or ``geglu``.
        bias: biases in the expert projections.
        backend: expert GEMM backend (``auto``, ``fused``, ``loop``, ``grouped_mm``).
        num_shared_experts, shared_hidden_dim, shared_expert_gate: always-on experts.
        router: ``"softmax"``, ``"sigmoid"``, ``"cosine"`` or a full ``RouterConfig``.
        capacity_factor: ``>0`` fixed, ``<0`` adaptive capped, ``0`` dropless
            (overridable per call).
        batch_prioritized: drop the lowest-scored assignments first.
        load_balance_weight, z_loss_weight: weights of the auxiliary losses.
        aux_free_rate: rate of auxiliary-loss-free balancing (needs a selection bias,
            which it switches on); apply it with ``update_expert_bias()`` after each
            optimizer step, or ``attach_aux_free_update(optimizer, model)``.
        experts: a custom expert module (see ``flexmoe.experts.ffn``) instead of the
            built-in grouped FFN.
        check_finite: raise ``ValueError`` on non-finite input (costs a host sync).
        device, dtype: where and in what dtype to create the expert parameters (the
            router always keeps fp32 parameters).
        group: the ``torch.distributed`` process group to spread the experts over
            (default: the default group when initialised with several ranks; ``False``:
            single-device). ``E >= W``: each rank stores ``E/W`` whole experts; ``E < W``:
            each stores one ``W/E``-th of one expert's hidden units. Every rank must
            construct and call the layer identically (checked; a mismatch raises on
            every rank). The layer's output on each rank is its own tokens' output;
            the whole computes the single-device layer on the ranks' concatenated
            batches. Expert parameters are tagged for data parallelism (see
            ``flexmoe.parallel.runtime``).
        ranks_per_node: ``L`` for the hierarchical (``"2dh"``) exchange (default:
            ``LOCAL_WORLD_SIZE``, else the whole group).
        timeout: seconds to wait for any one collective before raising
            ``CollectiveTimeoutError`` naming the layer and step (default: wait).
        rerouting: when and how far to reroute hot experts' rows to less loaded ranks
            (a ``flexmoe.RerouteConfig``; default: when the busiest rank has 1.3x the
            mean rows and the cost model says it pays). ``Plan(reroute=...)`` forces it.
        plan: the plan of calls that pass none: a ``flexmoe.Plan``, or ``"auto"`` for the
            online tuner (``flexmoe.planner.tuner``: scores plans with the cost model,
            measures the best few, caches the winner per load bucket). Also settable
            as ``layer.plan``.
        tuner: the cost model's machine and the tuner's settings (a
            ``flexmoe.TunerConfig``; default: the calibration of this machine).

    After each forward, ``aux_loss`` holds the weighted auxiliary loss (a differentiable
    scalar) and ``stats`` a ``MoEStats``.
    """

    aux_loss: Tensor
    stats: MoEStats | None
    _pending_counts_E: Tensor

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        *,
        activation: str = "swiglu",
        bias: bool = False,
        backend: str = "auto",
        num_shared_experts: int = 0,
        shared_hidden_dim: int | None = None,
        shared_expert_gate: bool = False,
        router: str | RouterConfig = "softmax",
        capacity_factor: float = 0.0,
        batch_prioritized: bool = False,
        load_balance_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        aux_free_rate: float = 0.0,
        experts: nn.Module | None = None,
        check_finite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        group: object = None,
        ranks_per_node: int | None = None,
        timeout: float | None = None,
        rerouting: RerouteConfig | None = None,
        plan: Plan | str | None = None,
        tuner: TunerConfig | None = None,
    ) -> None:
        if rerouting is not None and not isinstance(rerouting, RerouteConfig):
            raise TypeError(f"rerouting must be a flexmoe.RerouteConfig, got {type(rerouting).__name__}")
        if tuner is not None and not isinstance(tuner, TunerConfig):
            raise TypeError(f"tuner must be a flexmoe.TunerConfig, got {type(tuner).__name__}")
        if isinstance(router, str):
            router_config = RouterConfig(kind=router, selection_bias=aux_free_rate > 0)  # type: ignore[arg-type]
        elif isinstance(router, RouterConfig):
            router_config = router
        else:
            raise TypeError(
                f"router must be a router kind (str) or a RouterConfig, got {type(router).__name__}"
            )
        config = MoEConfig(
            dim=dim,
            hidden_dim=hidden_dim,
            num_experts=num_experts,
            top_k=top_k,
            router=router_config,
            capacity=CapacityConfig(capacity_factor=capacity_factor, batch_prioritized=batch_prioritized),
            experts=ExpertConfig(
                activation=activation,  # type: ignore[arg-type]
                bias=bias,
                backend=backend,  # type: ignore[arg-type]
                num_shared_experts=num_shared_experts,
                shared_hidden_dim=shared_hidden_dim,
                shared_expert_gate=shared_expert_gate,
            ),
            balance=BalanceConfig(
                load_balance_weight=load_balance_weight,
                z_loss_weight=z_loss_weight,
                aux_free_rate=aux_free_rate,
            ),
            reroute=rerouting or RerouteConfig(),
            tuner=tuner or TunerConfig(),
            check_finite=check_finite,
        )
        super().__init__()
        self._build(config, experts, device, dtype, group, ranks_per_node, timeout)
        self.plan = plan

    @classmethod
    def from_config(
        cls,
        config: MoEConfig,
        *,
        experts: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        group: object = None,
        ranks_per_node: int | None = None,
        timeout: float | None = None,
        plan: Plan | str | None = None,
    ) -> MoELayer:
        """Build a layer from a complete ``MoEConfig`` (other arguments as in ``__init__``)."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(config, experts, device, dtype, group, ranks_per_node, timeout)
        layer.plan = plan
        return layer

    def _build(
        self,
        config: MoEConfig,
        experts: nn.Module | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        group: object = None,
        ranks_per_node: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.config = config
        self._default_plan: Plan | str | None = None
        self._tuner: Tuner | None = None  # built at the first "auto" call (collective)
        self._cost: CostModel | None = None  # built at the first rerouting decision (collective)
        self._watch: Stopwatch | None = None
        self._replicas: list[list[int]] | None = None  # logical experts each rank keeps copies of
        self._replica_rows: dict[int, Tensor] = {}  # this rank's replicas: logical expert -> packed row
        self._replica_stamps: dict[tuple[int, int], tuple[int, int]] = {}  # (rank, expert) -> owner stamp
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if ranks_per_node is not None and not (isinstance(ranks_per_node, int) and ranks_per_node >= 1):
            raise ValueError(f"ranks_per_node must be an int >= 1 or None, got {ranks_per_node!r}")
        torch_device = None if device is None else torch.device(device)
        self.router = build_router(config.dim, config.num_experts, config.router, torch_device)
        self._ep = ExpertParallel.create(
            group, config.num_experts, config.hidden_dim, ranks_per_node, timeout
        )
        self.experts = self._make_experts(config, experts, device, dtype, self._ep)
        if self._ep is not None:
            self._setup_distributed(self._ep, torch_device)
        ecfg = config.experts
        self.shared_experts: DenseFFN | None = None
        if ecfg.num_shared_experts > 0:
            hidden = ecfg.shared_hidden_dim or ecfg.num_shared_experts * config.hidden_dim
            self.shared_experts = DenseFFN(
                config.dim, hidden, ecfg.activation, ecfg.bias, ecfg.shared_expert_gate, device, dtype
            )
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.register_buffer(
            "_pending_counts_E",
            torch.zeros(config.num_experts, dtype=torch.int64, device=device),
            persistent=False,
        )
        # Where each logical expert is stored (see ``apply_placement``). Not a buffer: the
        # state_dict stays as it was (portable copies, ``single_device_state_dict`` and
        # checkpoints, are per logical expert whatever the placement).
        self._placement: list[int] | None = None  # None: the identity
        self._slot_index: Tensor | None = None  # the placement as a tensor, on the last device used
        self.aux_loss = torch.zeros(())
        self.stats = None

    @staticmethod
    def _make_experts(
        config: MoEConfig,
        experts: nn.Module | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        ep: ExpertParallel | None = None,
    ) -> nn.Module:
        num_experts, hidden_dim = config.num_experts, config.hidden_dim
        what = "num_experts"
        if ep is not None:
            num_experts, hidden_dim = ep.placement.local_experts, ep.placement.local_hidden_dim
            if experts is not None:
                raise ValueError(
                    "experts: custom expert modules run on a single device only (group=False); "
                    "a distributed layer needs the built-in grouped experts"
                )
        if experts is None:
            ecfg = config.experts
            built = GroupedExperts(
                num_experts, config.dim, hidden_dim, ecfg.activation, ecfg.bias, ecfg.backend, device, dtype
            )
            if ep is not None and ep.placement.sharded:
                # Hidden shard s of its expert; w_out's columns are fan-in F, not F/S.
                with torch.no_grad():
                    bound = 1.0 / config.hidden_dim**0.5
                    built.w_out.uniform_(-bound, bound)
                    if built.b_out is not None:
                        built.b_out.uniform_(-bound, bound)
                if built.b_out is not None and ep.placement.shard_index != 0:
                    built.b_out = None  # the output bias lives on shard 0 only
            return built
        if isinstance(experts, nn.ModuleList):
            if len(experts) != num_experts:
                raise ValueError(f"experts must hold {what}={num_experts} modules, got {len(experts)}")
            return ModuleListExperts(experts, config.dim)
        if not isinstance(experts, nn.Module):
            raise TypeError(f"experts must be an nn.Module or nn.ModuleList, got {type(experts).__name__}")
        for name, expected in (("num_experts", num_experts), ("dim", config.dim)):
            got = getattr(experts, name, None)
            if got != expected:
                raise ValueError(f"experts.{name} must be {expected} to match the layer, got {got!r}")
        return experts

    def _setup_distributed(self, ep: ExpertParallel, device: torch.device | None) -> None:
        """Check that every rank built the same layer, share the router, tag expert parameters."""
        cfg = self.config
        fields = {
            "dim": cfg.dim,
            "hidden_dim": cfg.hidden_dim,
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "ranks_per_node": ep.placement.ranks_per_node,
            "custom experts": stable_hash(type(self.experts).__name__),
            "configuration (router, capacity, experts, balance)": stable_hash(repr(cfg)),
        }
        ep.check_same({"num_tokens": 0, **fields})
        ep.broadcast_(self.router)
        tag_expert_parameters(self.experts)
        self._step = 0
        global _DISTRIBUTED_LAYERS
        ep.comm.name = f"moe{_DISTRIBUTED_LAYERS}"  # construction order: the same on every rank
        _DISTRIBUTED_LAYERS += 1

    @property
    def name(self) -> str:
        """The name collective errors use (``name_moe_layers`` sets the module path)."""
        return "moe" if self._ep is None else self._ep.comm.name

    @name.setter
    def name(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(f"name must be a non-empty str, got {value!r}")
        if self._ep is not None:
            self._ep.comm.name = value

    @torch.no_grad()
    def load_single_device_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load the ``state_dict`` of a single-device layer of the same configuration.

        Each rank keeps the expert slices it stores (under the current placement), and
        everything else whole.
        """
        ep = self._ep
        if ep is None:
            self.load_state_dict(state_dict)
            return
        if not isinstance(self.experts, GroupedExperts):
            raise ValueError("load_single_device_state_dict needs the built-in experts")
        gated = self.config.experts.activation in GATED_ACTIVATIONS
        local: dict[str, Tensor] = {}
        stored = None if self._placement is None else torch.tensor(self.stored_experts)
        for key, value in state_dict.items():
            if key.startswith("experts."):
                name = key.removeprefix("experts.")
                if stored is not None:  # whole experts in this rank's slots
                    local[key] = value.index_select(0, stored.to(value.device))
                    continue
                part = ep.placement.local_slice(name, value, gated)
                if part is not None:
                    local[key] = part
            else:
                local[key] = value
        self.load_state_dict(local)

    def single_device_expert_grads(self) -> dict[str, Tensor | None]:
        """The gradients of the expert parameters in the single-device layout, by name.

        ``{"w_in": ..., "w_out": ..., "b_in": ..., "b_out": ...}`` as the equivalent
        single-device layer would hold them (logical expert order; ``None`` where there is
        no such parameter or no gradient). Distributed: gathered from every rank, a
        collective (call it on every rank).
        """
        experts = self.experts
        if not isinstance(experts, GroupedExperts):
            raise ValueError("single_device_expert_grads needs the built-in grouped experts")
        names = ("w_in", "w_out", "b_in", "b_out")
        params = [getattr(experts, name) for name in names]
        ep = self._ep
        if ep is None:
            return {
                n: None if p is None or p.grad is None else p.grad.detach()
                for n, p in zip(names, params, strict=True)
            }
        grads = [None if p is None else p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_bias = experts.b_in is not None
        with torch.no_grad():
            full = ep.gather_like(tuple(grads), experts, 0, has_bias=has_bias)  # type: ignore[arg-type]
        out: dict[str, Tensor | None] = {}
        for name, value in zip(names, full, strict=True):
            if value is not None and self._placement is not None:  # back to logical order
                value = value.index_select(0, self._slots_on(value.device))
            out[name] = None if value is None else value.detach().clone()
        return out

    def whole_stored_experts(self, tensors: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """Tensors shaped like this rank's expert parameters, as the whole experts it stores.

        ``tensors`` maps ``w_in``, ``w_out``, ``b_in``, ``b_out`` to tensors shaped like
        those parameters (the parameters, their gradients or optimizer state; ``None`` where
        there is none). Returns one row per expert of ``stored_experts``, each with its
        single-device shape. Only sharded experts (``E < W``) change: the hidden shards of
        the rank's expert are gathered from the ranks sharing it, a collective over them
        (call it on every rank).
        """
        ep = self._ep
        if ep is None or not ep.placement.sharded:
            return dict(tensors)
        experts = self.experts
        if not isinstance(experts, GroupedExperts):
            raise ValueError("whole_stored_experts needs the built-in grouped experts")
        names = ("w_in", "w_out", "b_in", "b_out")
        with torch.no_grad():
            whole = ep.gather_like(
                tuple(tensors.get(n) for n in names),  # type: ignore[arg-type]
                experts,
                1,
                has_bias=experts.b_in is not None,
            )
        return dict(zip(names, whole, strict=True))

    @property
    def placement(self) -> Placement | None:
        """Where this distributed layer's experts are stored (``None`` on one device)."""
        return None if self._ep is None else self._ep.placement

    def resolve_plan(self, plan: Plan | None = None) -> Plan:
        """``plan`` (default ``Plan()``) with its defaults filled in for this layer, validated."""
        plan = Plan() if plan is None else plan
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a flexmoe.Plan, got {type(plan).__name__}")
        if self._ep is None:
            if plan.r not in (None, 0, 1):
                raise ValueError(f"plan.r must be None, 0 or 1 on a single device, got {plan.r}")
            return Plan(r=1 if plan.r is None else plan.r, d=plan.d, exchange=plan.exchange, reroute=False)
        return self._ep.placement.resolve(plan)

    def valid_plans(
        self, degrees: Sequence[int] = (1, 2, 4), exchanges: Sequence[str] = ("flat", "2dh")
    ) -> list[Plan]:
        """Every distinct resolved plan this layer can run with these pipelining degrees and exchanges.

        One device: ``[Plan(r=1, ...)]`` only (``d`` and the exchange do not apply there).
        """
        if self._ep is None:
            return [self.resolve_plan()]
        plans: list[Plan] = []
        for r in self._ep.placement.valid_r():
            for d in degrees:
                for exchange in exchanges:
                    plan = self._ep.placement.resolve(Plan(r=r, d=d, exchange=exchange))  # type: ignore[arg-type]
                    if plan not in plans:
                        plans.append(plan)
        return plans

    def single_device_state_dict(self) -> dict[str, Tensor]:
        """The ``state_dict`` of the equivalent single-device layer.

        Expert slices are gathered from every rank: a collective, call it on every rank.
        """
        state = {key: value.detach() for key, value in self.state_dict().items()}
        ep = self._ep
        if ep is None:
            return state
        if not isinstance(self.experts, GroupedExperts):
            raise ValueError("single_device_state_dict needs the built-in experts")
        with torch.no_grad():
            full = ep.gather_weights(self.experts, 0)  # physical slot order
        for key in [k for k in state if k.startswith("experts.")]:
            del state[key]
        for name, value in zip(("w_in", "w_out", "b_in", "b_out"), full, strict=True):
            if value is not None:
                if self._placement is not None:  # back to logical order
                    value = value.index_select(0, self._slots_on(value.device))
                state[f"experts.{name}"] = value.detach().clone()
        return state

    # ------------------------------------------------------------- placement
    @property
    def expert_placement(self) -> list[int]:
        """``slot_of_expert``: the physical slot of each logical expert (rank ``slot // (E/W)``).

        The identity until ``apply_placement`` changes it; always the identity on one
        device or with sharded experts (``E < W``).
        """
        return list(range(self.config.num_experts)) if self._placement is None else list(self._placement)

    @property
    def stored_experts(self) -> list[int]:
        """The logical experts this rank stores, in the order of its expert parameters' rows.

        Sharded experts (``E < W``): the one expert this rank holds a shard of.
        """
        ep = self._ep
        if ep is None:
            return list(range(self.config.num_experts))
        pl = ep.placement
        if pl.sharded:
            return [pl.first_expert]
        return experts_by_rank(self.expert_placement, pl.world_size)[pl.rank]

    def apply_placement(
        self, slot_of_expert: Sequence[int] | Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> MoveReport:
        """Store logical expert ``e`` in slot ``slot_of_expert[e]`` from now on; a collective.

        Call it between steps, on every rank with the same placement (checked), e.g. one
        from ``flexmoe.placement.balanced_placement`` or a ``Rebalancer``. The
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
        E = self.config.num_experts
        slots = check_placement(
            slot_of_expert.tolist() if isinstance(slot_of_expert, Tensor) else slot_of_expert,
            E,
            1 if self._ep is None else self._ep.world_size if not self._ep.placement.sharded else 1,
        )
        ep = self._ep
        if ep is None or ep.placement.sharded:
            if slots != list(range(E)):
                where = "on one device" if ep is None else f"with sharded experts ({E} < W={ep.world_size})"
                raise ValueError(f"apply_placement: only the identity placement exists {where}")
            return MoveReport(0, 0, 0, 0, 0, 0, 0, 0.0)
        ep.check_same({"num_tokens": 0, "placement": stable_hash(repr(slots))})
        experts = self.experts
        assert isinstance(experts, GroupedExperts)
        params = [p for p in (experts.w_in, experts.w_out, experts.b_in, experts.b_out) if p is not None]
        report = move_experts(params, self.expert_placement, slots, ep.comm, optimizer)
        self._placement = None if slots == list(range(E)) else slots
        self._slot_index = None
        return report

    def set_replicas(self, replicas: Sequence[Sequence[int]] | None) -> None:
        """Keep persistent copies of hot experts on other ranks (EPLB-style replicas); a collective.

        ``replicas[p]``: the logical experts rank ``p`` keeps a copy of (``None``: none).
        Every rank passes the same table (checked). A replica is a copy the least-loaded
        rerouting (``flexmoe.planner.rerouting``) may give rows to without sending the
        expert's weights: it is filled the first time it is used, then reused for as
        long as the owner's weights are unchanged — every forward without grad
        (inference, evaluation) until the next optimizer step or load. A training step
        sends the copy anyway (its gradient must go back to the owner, and the weights
        change after it). Replicas count towards ``RerouteConfig.max_copies_per_rank``.
        The layer's output is the same with or without replicas; ``stats.replica_hits``
        counts the copies they served. Plan them from observed load with
        ``flexmoe.placement.replica_placement``.
        """
        ep = self._ep
        if ep is None or ep.placement.sharded:
            if replicas:
                raise ValueError("set_replicas needs a distributed layer with whole experts (E >= W)")
            return
        W, E = ep.world_size, self.config.num_experts
        table: list[list[int]] | None = None
        if replicas is not None:
            if len(replicas) != W:
                raise ValueError(
                    f"replicas must list the experts of each of the {W} ranks, got {len(replicas)}"
                )
            table = []
            for p, experts in enumerate(replicas):
                row = sorted({int(e) for e in experts})
                if any(not 0 <= e < E for e in row):
                    raise ValueError(f"replicas[{p}] must hold expert ids in [0, {E}), got {list(experts)}")
                bound = self.config.reroute.max_copies_per_rank
                if bound is not None and len(row) > bound:
                    raise ValueError(
                        f"replicas[{p}] holds {len(row)} experts, more than max_copies_per_rank={bound}"
                    )
                table.append(row)
        ep.check_same({"replicas": stable_hash(repr(table))})
        self._replicas = table if table and any(table) else None
        self._replica_rows.clear()
        self._replica_stamps.clear()

    @property
    def replicas(self) -> list[list[int]] | None:
        """The persistent replicas (``set_replicas``): logical experts per rank, or ``None``."""
        return None if self._replicas is None else [list(r) for r in self._replicas]

    def _weights_stamp(self) -> tuple[int, int]:
        """The stamp of the experts stored here: (sum of in-place versions, storage hash)."""
        params = list(self.experts.parameters())
        version = sum(int(p._version) for p in params)
        return version, stable_hash(repr([p.data_ptr() for p in params]))

    def _held_slots(self, ep: ExpertParallel) -> list[list[int]] | None:
        """Each rank's replicas as slots (what the rerouting planner sees), or ``None``."""
        if self._replicas is None:
            return None
        slot = self.expert_placement
        return [sorted(slot[e] for e in row) for row in self._replicas]

    def _replica_sends(
        self, ep: ExpertParallel, reroute: ReroutePlan, held: list[list[int]], stamps: list[list[int]]
    ) -> tuple[list[tuple[int, int]], dict[int, Tensor]]:
        """The copies that travel this step, and this rank's fresh replicas (slot -> packed row).

        A replica ``(p, e)`` serves without a transfer when the step takes no gradient
        and its owner's weights are those it was filled from (every rank keeps the same
        book of fills, so all agree without communicating).
        """
        El = ep.placement.local_experts
        logical = {s: e for e, s in enumerate(self.expert_placement)}
        grad = torch.is_grad_enabled()
        sends = list(reroute.transfers)
        cached: dict[int, Tensor] = {}
        for p, copies in enumerate(reroute.copies):
            for s in copies:
                if s not in held[p]:
                    continue
                e = logical[s]
                fresh = not grad and self._replica_stamps.get((p, e)) == tuple(stamps[s // El])
                if not fresh:
                    sends.append((s, p))
                elif p == ep.placement.rank:
                    cached[s] = self._replica_rows[e]  # booked fresh => filled here
        return sends, cached

    def _keep_replicas(
        self,
        ep: ExpertParallel,
        sends: list[tuple[int, int]],
        held: list[list[int]],
        stamps: list[list[int]],
        received: dict[int, Tensor],
    ) -> None:
        """Book the replicas filled by this step's transfers (every rank), keep this rank's rows."""
        El, me = ep.placement.local_experts, ep.placement.rank
        logical = {s: e for e, s in enumerate(self.expert_placement)}
        for s, p in sends:
            if s in held[p]:
                e = logical[s]
                self._replica_stamps[(p, e)] = tuple(stamps[s // El])  # type: ignore[assignment]
                if p == me:
                    self._replica_rows[e] = received[s]

    def placement_advice(
        self,
        loads: Sequence[float],
        optimizer: torch.optim.Optimizer | None = None,
        horizon_steps: int = 100,
        min_gain: float = 0.05,
    ) -> PlacementAdvice:
        """A balanced placement for per-expert ``loads``, and whether moving to it pays.

        See ``flexmoe.placement.advise_placement``: the move must pay back within
        ``horizon_steps`` steps. Predicted by the layer's cost model (the one the tuner
        and rerouting use: ``TunerConfig.cluster``): a training step of plain expert
        parallelism with ``loads`` in the current and in the proposed slots, and the
        move as the busiest rank's bytes (parameters plus, with ``optimizer``, its state
        tensors) over the cluster's link. Collective the first time (the cost model's
        cluster is the first rank's): every rank calls it.
        """
        ep = self._ep
        if ep is None or ep.placement.sharded:
            raise ValueError("placement_advice needs a distributed layer with whole experts (E >= W)")
        experts = self.experts
        assert isinstance(experts, GroupedExperts)
        per_expert = 0
        for p in experts.parameters():
            per_expert += p[0].numel() * p.element_size()
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            per_expert += sum(
                v[0].numel() * v.element_size()
                for v in state.values()
                if isinstance(v, Tensor) and v.shape == p.shape and v.dim() > 0
            )
        if self._cost is None:
            self._cost = cost_model(ep, self.config, experts.w_in.device)
        cost = self._cost

        k, cf = self.config.top_k, self.config.capacity.capacity_factor
        tokens = max(1, round(sum(loads) / k))
        dtype = experts.w_in.dtype

        def step_seconds(rows: list[float]) -> float:
            return cost.predict(Plan(r=1, reroute=False), rows, tokens, k, cf, True, dtype)  # type: ignore[arg-type]

        latency, bandwidth = cost.machine.link(not cost.machine.single_node)
        return advise_placement(
            loads,
            self.expert_placement,
            ep.world_size,
            bytes_per_expert=per_expert,
            step_seconds=step_seconds,
            link_bytes_per_s=bandwidth,
            link_latency_s=latency,
            horizon_steps=horizon_steps,
            min_gain=min_gain,
        )

    def _to_slots(self, expert_ids_TK: Tensor) -> Tensor:
        """Logical expert ids -> physical slots (the identity needs no work)."""
        if self._placement is None:
            return expert_ids_TK
        return self._slots_on(expert_ids_TK.device)[expert_ids_TK]

    def _to_logical(self, per_slot_E: Tensor) -> Tensor:
        """Per-slot counts -> per-logical-expert counts."""
        if self._placement is None:
            return per_slot_E
        return per_slot_E[self._slots_on(per_slot_E.device)]

    def _slots_on(self, device: torch.device) -> Tensor:
        """``slot_of_expert`` as an int64 tensor on ``device`` (cached)."""
        index = self._slot_index
        if index is None or index.device != device:
            index = torch.tensor(self.expert_placement, dtype=torch.int64, device=device)
            self._slot_index = index
        return index

    def prepare_for_inference(self) -> bool:
        """Pre-pack the expert weights for fast CPU inference (see ``GroupedExperts.prepare_for_inference``).

        Opt-in: the packed copies take as much memory again as the expert weights; they
        are dropped automatically when the weights change. Returns whether they were built.
        """
        if not isinstance(self.experts, GroupedExperts):
            return False
        return self.experts.prepare_for_inference()

    @property
    def plan(self) -> Plan | str | None:
        """The plan of calls that pass none: a ``Plan``, ``"auto"`` (the tuner) or ``None`` (``Plan()``)."""
        return self._default_plan

    @plan.setter
    def plan(self, value: Plan | str | None) -> None:
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"plan must be a flexmoe.Plan, 'auto' or None, got {value!r}")
        if value is not None and not isinstance(value, Plan | str):
            raise TypeError(f"plan must be a flexmoe.Plan, 'auto' or None, got {type(value).__name__}")
        self._default_plan = value

    @property
    def tuner(self) -> Tuner | None:
        """The online tuner (after the first ``plan="auto"`` call of a distributed layer), else ``None``."""
        return self._tuner

    @property
    def world_size(self) -> int:
        """Ranks the experts are spread over (1: single device)."""
        return 1 if self._ep is None else self._ep.world_size

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        *,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        plan: Plan | str | None = None,
    ) -> Tensor:
        """Apply the layer to ``x [..., dim]``; keyword arguments override this call only."""
        cfg = self.config
        if self._ep is None:
            k, cf, plan = self._check_call(x, top_k, capacity_factor, plan)
            plan = Plan() if plan == "auto" else plan
        else:
            try:
                k, cf, plan = self._check_call(x, top_k, capacity_factor, plan)
                if isinstance(plan, Plan):
                    plan = self._ep.placement.resolve(plan)
            except (TypeError, ValueError):
                # Tell the other ranks (they would otherwise wait for this one), then raise.
                self._ep.report_failure(self._step, _CALL_HEADER)
                self._step += 1
                raise

        x_TD = x.reshape(-1, cfg.dim)
        T = x_TD.shape[0]
        backend = type(self.experts).__name__
        if isinstance(self.experts, GroupedExperts):
            autocast = torch.is_autocast_enabled(x.device.type)
            compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            backend = self.experts.resolved_backend(x.device, compute_dtype)
        if self._ep is not None:
            return self._forward_distributed(self._ep, x, x_TD, k, cf, plan, backend)
        assert isinstance(plan, Plan)
        if T == 0:
            return self._empty_forward(x, k, cf, plan, backend)

        # 1. route
        route = self.router(x_TD, k)
        # 2. plan the dispatch: expert-major order, capacity, drops
        layout = make_layout(
            route.expert_ids_TK, route.weights_TK, cfg.num_experts, cf, cfg.capacity.batch_prioritized
        )
        # 3. permute (+ exchange, for distributed dispatchers)
        x_ND, row_weights_N, counts, metadata = self.dispatcher.dispatch(x_TD, route.weights_TK, layout, plan)
        # 4. experts, each output row scaled by its routing weight
        if getattr(self.experts, "accepts_row_weights", False):
            y_ND = self.experts(x_ND, counts, row_weights_N)
        else:
            y_ND = self.experts(x_ND, counts)
            if not isinstance(y_ND, Tensor) or y_ND.shape != x_ND.shape:
                got = tuple(y_ND.shape) if isinstance(y_ND, Tensor) else type(y_ND).__name__
                raise ValueError(f"experts must return the shape of its input {tuple(x_ND.shape)}, got {got}")
            y_ND = y_ND * row_weights_N.to(y_ND.dtype)[:, None]
        # 5. combine (+ exchange back): per-token sum
        y_TD = self.dispatcher.combine(y_ND, layout, metadata)
        WORKSPACE.give(y_ND)  # kept only if nothing else (a hook, a saved tensor) holds it
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)
        return self._finish_local(x, y_TD, route, layout, T, k, cf, plan, backend)

    def _check_call(
        self, x: Tensor, top_k: int | None, capacity_factor: float | None, plan: Plan | str | None
    ) -> tuple[int, float, Plan | str]:
        """Validate one call's input and overrides; returns ``(top_k, capacity_factor, plan)``."""
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x must have shape [..., dim={cfg.dim}], got {tuple(x.shape)}")
        k = cfg.top_k if top_k is None else validate_top_k(top_k, cfg.num_experts)
        if cfg.router.num_groups > 1 and top_k is not None:
            reachable = cfg.router.topk_groups * (cfg.num_experts // cfg.router.num_groups)
            validate_top_k(top_k, reachable, name="top_k (with group-limited routing)")
        cf = (
            cfg.capacity.capacity_factor
            if capacity_factor is None
            else validate_capacity_factor(capacity_factor)
        )
        if plan is None:
            plan = Plan() if self._default_plan is None else self._default_plan
        if isinstance(plan, str) and plan != "auto":
            raise ValueError(f"plan must be a flexmoe.Plan or 'auto', got {plan!r}")
        if not isinstance(plan, Plan | str):
            raise TypeError(f"plan must be a flexmoe.Plan or 'auto', got {type(plan).__name__}")
        if self._ep is None and isinstance(plan, Plan) and plan.r not in (None, 0, 1):
            raise ValueError(f"plan.r must be None, 0 or 1 on a single device, got {plan.r}")
        if cfg.check_finite and not bool(torch.isfinite(x).all()):  # NOTE: host sync, opt-in.
            raise ValueError("x contains non-finite values (NaN or Inf); check_finite=True")
        return k, cf, plan

    def _finish_local(
        self,
        x: Tensor,
        y_TD: Tensor,
        route: RouterOutput,
        layout: DispatchLayout,
        T: int,
        k: int,
        cf: float,
        plan: Plan,
        backend: str,
    ) -> Tensor:
        cfg = self.config
        self._balance(route.probs_TE, route.logits_TE, route.expert_ids_TK, layout.routed_per_expert_E)
        routed = layout.routed_per_expert_E.detach().cpu()
        routed_counts = routed.tolist()
        mean_load = T * k / cfg.num_experts
        self.stats = MoEStats(
            num_tokens=T,
            top_k=k,
            capacity_factor=cf,
            capacity=layout.capacity,
            routed_per_expert=routed,
            tokens_per_expert=layout.tokens_per_expert_E.detach().cpu(),
            dropped=layout.num_dropped,
            load_max_over_mean=max(routed_counts) / mean_load,
            plan=plan,
            world_size=1,
            backend=backend,
            balance_loss=self._last_terms[0],
            z_loss=self._last_terms[1],
        )
        return y_TD.reshape(x.shape)

    def _forward_distributed(
        self, ep: ExpertParallel, x: Tensor, x_TD: Tensor, k: int, cf: float, plan: Plan | str, backend: str
    ) -> Tensor:
        cfg = self.config
        ep.comm.step = self._step
        self._step += 1
        if self._watch is None:
            self._watch = Stopwatch(x.device)
        watch = self._watch
        previous_us = round(1e6 * watch.read())
        x_TD = watch.start(x_TD)
        values = (
            x_TD.shape[0],
            1,
            k,
            stable_hash(repr(float(cf))),
            stable_hash(repr(plan)),
            int(torch.is_grad_enabled()),
            stable_hash(str(x.dtype)),
            previous_us,
            *self._weights_stamp(),
        )
        header = ep.check_same(dict(zip(_CALL_HEADER, values, strict=True)))
        tokens_per_rank: list[int] = header[:, 0].tolist()
        previous_s = float(header[:, _CALL_HEADER.index("previous_us")].max()) / 1e6  # the slowest rank
        stamps = header[:, _CALL_HEADER.index("weights_version") :].tolist()  # [W, 2]
        route = self.router(x_TD, k)
        # Everything from here to the combine runs on physical slots (see apply_placement):
        # drops are decided per expert in an order that ignores its id, so they are unchanged.
        slot_ids_TK = self._to_slots(route.expert_ids_TK)
        glayout = ep.layout(
            slot_ids_TK,
            route.weights_TK,
            cfg.num_experts,
            cf,
            cfg.capacity.batch_prioritized,
            tokens_per_rank,
        )
        layout = glayout.local
        x_ND = permute(x_TD, layout)
        row_weights_N = route.weights_TK.reshape(-1).index_select(0, layout.slot_ids_N)
        experts = self.experts
        decision: TunerDecision | None = None
        if plan == "auto":
            if self._tuner is None:
                self._tuner = build_tuner(ep, cfg, x.device)
            decision = self._tuner.choose(
                glayout.routed_per_expert_E.tolist(),
                glayout.num_tokens,
                k,
                cf,
                torch.is_grad_enabled(),
                x.dtype,
                previous_s,
            )
            plan = ep.placement.resolve(decision.plan)
        assert isinstance(plan, Plan) and plan.r is not None and isinstance(experts, GroupedExperts)
        held = self._held_slots(ep)
        reroute = self._plan_rerouting(ep, plan, glayout, k, cf, x.dtype, held)
        plan = dataclasses.replace(plan, reroute=False if reroute is None else reroute.kind)
        replica_hits = 0
        if plan.r == 0:  # every expert gathered here; no rows move
            weights = ep.gather_weights(experts, 0)
            y_ND = experts.apply_weights(x_ND, layout.counts, weights, row_weights_N)
        elif reroute is not None and held is not None:
            sends, cached = self._replica_sends(ep, reroute, held, stamps)
            replica_hits = sum(len(c) for c in reroute.copies) - len(sends)
            received: dict[int, Tensor] = {}
            y_ND = ep.run(x_ND, glayout.kept, plan, experts, reroute, sends, cached, received)
            y_ND = y_ND * row_weights_N.to(y_ND.dtype)[:, None]
            self._keep_replicas(ep, sends, held, stamps, received)
        else:
            y_ND = ep.run(x_ND, glayout.kept, plan, experts, reroute)
            y_ND = y_ND * row_weights_N.to(y_ND.dtype)[:, None]
        y_TD = combine(y_ND, layout)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)
        T_global = glayout.num_tokens
        routed_E = self._to_logical(glayout.routed_per_expert_E)
        fraction_E = routed_E.to(torch.float64) / max(1, T_global * k)
        self._balance(route.probs_TE, route.logits_TE, route.expert_ids_TK, routed_E, fraction_E)
        routed_counts = routed_E.tolist()
        self.stats = MoEStats(
            num_tokens=T_global,
            top_k=k,
            capacity_factor=cf,
            capacity=layout.capacity,
            routed_per_expert=routed_E,
            tokens_per_expert=self._to_logical(glayout.tokens_per_expert_E),
            dropped=glayout.dropped,
            load_max_over_mean=max(routed_counts) / (T_global * k / cfg.num_experts) if T_global else 0.0,
            plan=plan,
            world_size=ep.world_size,
            backend=backend,
            balance_loss=self._last_terms[0],
            z_loss=self._last_terms[1],
        )
        if not ep.placement.sharded and plan.r == 1:
            El = ep.placement.local_experts
            kept_E = glayout.tokens_per_expert_E.tolist()
            native = [sum(kept_E[p * El : (p + 1) * El]) for p in range(ep.world_size)]
            self.stats.native_rows_per_rank = native
            self.stats.rows_per_rank = native if reroute is None else [int(r) for r in reroute.rows_per_rank]
            self.stats.copies_per_rank = [0] * ep.world_size
            if reroute is not None:
                self.stats.rerouted_rows = int(reroute.moved_rows)
                self.stats.expert_copies = sum(len(c) for c in reroute.copies) - replica_hits
                self.stats.replica_hits = replica_hits
                self.stats.copies_per_rank = [len(c) for c in reroute.copies]
                logical = {slot: e for e, slot in enumerate(self.expert_placement)}
                self.stats.shadowed_experts = sorted(logical[s] for s in reroute.shadowed)
        self.stats.tuner = decision
        return watch.stop(y_TD).reshape(x.shape)

    def _plan_rerouting(
        self,
        ep: ExpertParallel,
        plan: Plan,
        glayout: GlobalLayout,
        k: int,
        cf: float,
        dtype: torch.dtype,
        held: list[list[int]] | None = None,
    ) -> ReroutePlan | None:
        """The step's rerouting: forced by the plan, or chosen when the cost model says it pays.

        ``held``: each rank's persistent replicas (slots), which need no transfer. The
        kinds tried are the forced one (``True`` is ``"lla"``) or ``RerouteConfig.kinds``;
        unforced, the cost model picks the fastest of them and plain expert parallelism.
        """
        rc = self.config.reroute
        forced = plan.reroute
        if forced is False or (forced is None and not rc.enabled):
            return None
        if plan.r != 1 or ep.placement.sharded:
            return None
        kinds = rc.kinds if forced is None else ("lla",) if forced is True else (str(forced),)
        loads: list[int] = glayout.tokens_per_expert_E.tolist()
        plans: dict[str, ReroutePlan] = {}
        for kind in kinds:
            try:
                candidate = plan_rerouting(
                    loads,
                    ep.world_size,
                    alpha=rc.alpha,
                    min_chunk=rc.min_chunk,
                    max_rows_per_rank=rc.max_rows_per_rank,
                    max_copies_per_rank=rc.max_copies_per_rank,
                    held=held,
                    sources=glayout.kept if kind == "shadow" else None,
                )
            except ValueError:
                if forced is not None:
                    raise
                continue  # the bounds cannot hold this step this way
            if candidate.moved_rows and (kind == "lla" or candidate.shadowed or forced is not None):
                plans[kind] = candidate
        if forced is not None or not plans:
            return next(iter(plans.values()), None)
        if next(iter(plans.values())).imbalance_before < rc.threshold:
            return None
        if self._cost is None:
            self._cost = cost_model(ep, self.config, glayout.routed_per_expert_E.device)

        counts: list[int] = glayout.routed_per_expert_E.tolist()
        training = torch.is_grad_enabled()
        kept = glayout.kept

        def predict(kind: str | None) -> float:
            assert self._cost is not None
            option = Plan(r=1, d=plan.d, exchange=plan.exchange, reroute=False if kind is None else kind)  # type: ignore[arg-type]
            actual = None
            if kind is not None:  # the plan itself: its real sources, copies and held replicas
                chosen = plans[kind]
                # A training step sends held replicas too (their gradients go to the owner).
                every = [(e, p) for p, copies in enumerate(chosen.copies) for e in copies]
                actual = summarize(
                    chosen,
                    loads,
                    ep.world_size,
                    own_rows=lambda q, e: kept[q][e],
                    transfers=every if training else None,
                )
            return self._cost.predict(
                option, counts, glayout.num_tokens, k, cf, training, dtype, rerouting_plan=actual
            )

        best = min(plans, key=predict)
        return plans[best] if predict(best) <= predict(None) * (1.0 - rc.min_gain) else None

    def _balance(
        self,
        probs_TE: Tensor,
        logits_TE: Tensor,
        expert_ids_TK: Tensor,
        routed_E: Tensor,
        fraction_E: Tensor | None = None,
    ) -> None:
        bcfg = self.config.balance
        aux = probs_TE.new_zeros(())
        balance = z = None
        if bcfg.load_balance_weight > 0:
            balance = load_balance_loss(probs_TE, expert_ids_TK, fraction_E)
            aux = aux + bcfg.load_balance_weight * balance
        if bcfg.z_loss_weight > 0:
            z = router_z_loss(logits_TE)
            aux = aux + bcfg.z_loss_weight * z
        self.aux_loss = aux
        self._last_terms = (
            None if balance is None else balance.detach(),
            None if z is None else z.detach(),
        )
        if self.training and bcfg.aux_free_rate > 0:
            self._pending_counts_E += routed_E.to(self._pending_counts_E.device)

    def _empty_forward(self, x: Tensor, k: int, cf: float, plan: Plan, backend: str) -> Tensor:
        E = self.config.num_experts
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        zeros = torch.zeros(E, dtype=torch.int64)
        self.stats = MoEStats(
            num_tokens=0,
            top_k=k,
            capacity_factor=cf,
            capacity=None if cf == 0 else 0,
            routed_per_expert=zeros,
            tokens_per_expert=zeros.clone(),
            dropped=0,
            load_max_over_mean=0.0,
            plan=plan,
            world_size=1,
            backend=backend,
        )
        # Keep the graph connected so that backward through an empty batch works.
        return x.new_zeros(x.shape) + 0.0 * x

    # ------------------------------------------------------------- balancing
    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Apply one aux-loss-free update from the loads seen since the last call.

        ``b_i <- b_i + rate * sign(mean(c) - c_i)`` with ``c`` the routed counts summed
        over the forward calls since the previous update (so gradient accumulation
        counts every micro-batch). Does nothing if no training forward ran.
        """
        rate = self.config.balance.aux_free_rate
        bias = self.router.expert_bias_E
        if rate <= 0 or bias is None or not bool(self._pending_counts_E.any()):
            return
        bias.copy_(aux_free_bias_update(bias, self._pending_counts_E, rate))
        self._pending_counts_E.zero_()


_DISTRIBUTED_LAYERS = 0
# What every rank sends before each distributed call (the same keys on every rank).
_CALL_HEADER = (
    "num_tokens",
    "input_ok",
    "top_k",
    "capacity_factor",
    "plan",
    "grad mode",
    "dtype",
    "previous_us",  # this rank's measured time of the previous call (the tuner's feedback)
    "weights_version",  # this rank's stored experts: sum of their in-place versions ...
    "weights_storage",  # ... and a hash of their storage (persistent replicas are fresh while both hold)
)


def name_moe_layers(model: nn.Module, prefix: str = "") -> None:
    """Name every ``MoELayer`` in ``model`` by its module path (used in collective errors)."""
    for path, module in model.named_modules(prefix=prefix):
        if isinstance(module, MoELayer):
            module.name = path or "moe"


def update_expert_biases(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Call ``update_expert_bias`` on every ``MoELayer`` in a model (or iterable of modules)."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    for root in roots:
        for module in root.modules():
            if isinstance(module, MoELayer):
                module.update_expert_bias()


def attach_aux_free_update(optimizer: torch.optim.Optimizer, model: nn.Module) -> object:
    """Run ``update_expert_biases(model)`` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: update_expert_biases(model))
