"""``MoELayer``: route -> plan -> expert strategy -> combine, composed from the stages.

The layer owns the router, the experts' parameters, the shared experts and the balance
losses; an *expert strategy* (``LocalExperts``, or ``ExpertParallelExperts`` over a
process group) decides where expert weights live and how rows reach them, and reports
what it did, from which the layer builds its stats in one place.

Legend: T tokens, D model dim, E experts, K top-k, N kept routed slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from flexmoe.compiling import eager_only
from flexmoe.config import (
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
    validate_top_p,
)
from flexmoe.dispatch import count_per_expert
from flexmoe.experts import DenseFFN, GroupedExperts
from flexmoe.layer.build import make_experts, share_across_ranks
from flexmoe.layer.expert_parallel import ExpertParallelExperts
from flexmoe.layer.local import Call, ExpertsOutput, LocalExperts
from flexmoe.layer.placement_methods import ExpertPlacementMethods
from flexmoe.layer.stats import ExpertStep, MoEStats, StatsSource
from flexmoe.parallel import ExpertParallel
from flexmoe.planner import Tuner
from flexmoe.routing import RouterOutput, aux_free_bias_update, build_router, load_balance_loss, router_z_loss

__all__ = [
    "ExpertResolver",
    "MoELayer",
    "MoEStats",
    "attach_aux_free_update",
    "name_moe_layers",
    "update_expert_biases",
]


class Keep:
    """The type of ``KEEP``: "leave this setting as it is" where ``None`` is a value."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


class ExpertResolver(Protocol):
    """Runs the experts of some calls in place of the layer's strategy (``MoELayer.expert_resolver``).

    ``flexmoe.adapters.ExpertWeave`` installs one to send each token's chosen experts to
    its adapter's versions. ``run`` gets the routed batch and returns ``None`` to leave
    the call to the strategy, or the weighted expert rows and the call's facts.
    """

    def run(self, x_TD: Tensor, route: RouterOutput, call: Call) -> ExpertsOutput | None:
        """The call's expert rows (``None``: the strategy runs them)."""


class MoELayer(ExpertPlacementMethods):
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
        zero_experts: zero-computation experts (``"skip"``, ``"copy"``, ``"constant"``) the
            router also chooses among; see ``ExpertConfig.zero_experts``.
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
    scalar) and ``stats`` a ``MoEStats``. Distributed, each rank's ``aux_loss`` is its
    tokens' share of the whole batch's: add it to each rank's loss, average the router's
    gradient over the ranks (as data parallelism does), and the router gradient is the
    single-device layer's on the concatenated batch, whatever each rank's token count.
    """

    aux_loss: Tensor
    _pending_counts_E: Tensor
    expert_resolver: ExpertResolver | None = None  # see ExpertResolver

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
        zero_experts: tuple[str, ...] = (),
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
                zero_experts=zero_experts,  # type: ignore[arg-type]
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
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if ranks_per_node is not None and not (isinstance(ranks_per_node, int) and ranks_per_node >= 1):
            raise ValueError(f"ranks_per_node must be an int >= 1 or None, got {ranks_per_node!r}")
        self.config = config
        self._default_plan: Plan | str | None = None
        torch_device = None if device is None else torch.device(device)
        self.router = build_router(config.dim, config.num_choices, config.router, torch_device)
        ep = ExpertParallel.create(group, config.num_experts, config.hidden_dim, ranks_per_node, timeout)
        self.experts = make_experts(config, experts, device, dtype, None if ep is None else ep.placement)
        self.strategy: LocalExperts | ExpertParallelExperts
        if ep is None:
            self.strategy = LocalExperts(self.experts, config.num_experts, config.capacity.batch_prioritized)
        else:
            share_across_ranks(ep, config, self.router, self.experts)
            assert isinstance(self.experts, GroupedExperts)
            self.strategy = ExpertParallelExperts(ep, self.experts, config)
        ecfg = config.experts
        self.shared_experts: DenseFFN | None = None
        if ecfg.num_shared_experts > 0:
            hidden = ecfg.shared_hidden_dim or ecfg.num_shared_experts * config.hidden_dim
            self.shared_experts = DenseFFN(
                config.dim, hidden, ecfg.activation, ecfg.bias, ecfg.shared_expert_gate, device, dtype
            )
        self.zero_constants: nn.Parameter | None = None  # the "constant" zero experts' vectors
        constants = ecfg.zero_experts.count("constant")
        if constants:
            self.zero_constants = nn.Parameter(torch.zeros(constants, config.dim, device=device, dtype=dtype))
        self.register_buffer(
            "_pending_counts_E",
            torch.zeros(config.num_choices, dtype=torch.int64, device=device),
            persistent=False,
        )
        self.aux_loss = torch.zeros(())
        self._stats_source: StatsSource | None = None
        self._stats: MoEStats | None = None

    def set_routing(
        self,
        *,
        top_k: int | None = None,
        top_p: float | Keep | None = KEEP,
        min_k: int | None = None,
        capacity_factor: float | None = None,
        normalize_single: bool | None = None,
    ) -> MoEConfig:
        """Change this layer's routing for every later call, and return the new config.

        ``top_k``, ``min_k``, ``capacity_factor`` and ``normalize_single`` (see
        ``RouterConfig``: weight 1 for a token's single expert, for a model trained with
        renormalised weights that runs with fewer experts) replace the configured
        values; ``top_p`` sets top-p routing (``None`` turns it off). What is not given
        is kept.
        This is how a layer schedule, a mean-k controller or an inference option (fewer
        experts per token) changes a layer between steps; per-call keyword arguments of
        ``forward`` override it for one call. The new config is validated as a whole. On a
        distributed layer every rank must make the same change.
        """
        cfg = self.config
        router = cfg.router if isinstance(top_p, Keep) else dataclasses.replace(cfg.router, top_p=top_p)
        if min_k is not None:
            router = dataclasses.replace(router, min_k=min_k)
        if normalize_single is not None:
            router = dataclasses.replace(router, normalize_single=normalize_single)
        capacity = (
            cfg.capacity
            if capacity_factor is None
            else dataclasses.replace(cfg.capacity, capacity_factor=capacity_factor)
        )
        new = dataclasses.replace(
            cfg, top_k=cfg.top_k if top_k is None else top_k, router=router, capacity=capacity
        )
        self.config = new
        self.router.config = new.router
        if isinstance(self.strategy, ExpertParallelExperts):
            self.strategy.config = new
        return new

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        *,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        plan: Plan | str | None = None,
        top_p: float | None = None,
    ) -> Tensor:
        """Apply the layer to ``x [..., dim]``; keyword arguments override this call only.

        ``top_p``: top-p routing for this call (see ``RouterConfig.top_p``); ``None``
        keeps the configured rule.

        Under ``torch.compile`` a single-device layer is traced whole (``fullgraph=True``
        works); a distributed one runs eagerly inside the compiled model (its collectives
        and host-side planning are one graph break around the layer).
        """
        overrides = {"top_k": top_k, "capacity_factor": capacity_factor, "plan": plan, "top_p": top_p}
        if self.world_size > 1 and torch.compiler.is_compiling():
            y: Tensor = self._forward_eagerly(x, **overrides)
            return y
        return self._forward(x, **overrides)  # type: ignore[arg-type]

    @eager_only
    def _forward_eagerly(self, x: Tensor, **overrides: object) -> Tensor:
        return self._forward(x, **overrides)  # type: ignore[arg-type]

    def _forward(
        self,
        x: Tensor,
        *,
        top_k: int | None = None,
        capacity_factor: float | None = None,
        plan: Plan | str | None = None,
        top_p: float | None = None,
    ) -> Tensor:
        try:
            call = self._check_call(x, top_k, capacity_factor, plan, top_p)
        except (TypeError, ValueError):
            self.strategy.fail()  # the other ranks would otherwise wait for this one
            raise
        x_TD = x.reshape(-1, self.config.dim)
        backend = self._backend(x)
        strategy = self.strategy
        if isinstance(strategy, LocalExperts) and x_TD.shape[0] == 0:
            return self._empty_forward(x, call, strategy, backend)
        # 1. agree on the call with the other ranks (expert parallelism)
        x_TD, header = strategy.begin(x_TD, call)
        # 2. route
        route = self.router(x_TD, call.top_k, call.top_p)
        zero_experts = bool(self.config.experts.zero_experts)
        routed = routed_experts_only(route, self.config.num_experts) if zero_experts else route
        # 3. plan, dispatch and run the experts wherever they live (or an expert resolver
        #    runs them: several adapters' experts in one batch, flexmoe.adapters)
        resolver = self.expert_resolver
        out = None if resolver is None else resolver.run(x_TD, routed, call)
        if out is None:
            out = strategy.run(self._experts_input(x_TD, strategy), routed, call, header)
        # 4. combine: the per-token sum of the weighted expert rows
        y_TD = out.combine()
        if zero_experts:
            y_TD = y_TD + self._zero_experts(x_TD, route).to(y_TD.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)
        # 5. what the call routed over the whole batch, the balance terms, the stats
        per_token, choices = self._tally(route, routed, call.top_k, out.step)
        terms = self._balance(route, out.step, choices)
        fixed_k = per_token is None
        source = StatsSource(
            out.step, call.top_k, call.capacity_factor, backend, terms, per_token, every_token_k=fixed_k
        )
        if choices is not None:
            source = dataclasses.replace(source, zero_expert_choices=choices[self.config.num_experts :])
        self._record(source)
        return strategy.end(y_TD).reshape(x.shape)

    def _experts_input(self, x_TD: Tensor, strategy: object) -> Tensor:
        """``x_TD`` in the dtype the local grouped experts compute in.

        Under autocast they compute in its dtype: casting the tokens before the permutation
        moves half the bytes and casts ``T`` rows instead of ``T * K`` (the router has
        already read ``x_TD`` in its own precision).
        """
        device_type = x_TD.device.type
        if (
            type(strategy) is LocalExperts
            and isinstance(self.experts, GroupedExperts)
            and torch.is_autocast_enabled(device_type)
        ):
            return x_TD.to(torch.get_autocast_dtype(device_type))
        return x_TD

    def _zero_experts(self, x_TD: Tensor, route: RouterOutput) -> Tensor:
        """What the zero-computation experts add: ``w * x`` (copy), ``w * c`` (constant), nothing (skip)."""
        E = self.config.num_experts
        weights_TK = route.weights_TK if route.valid_TK is None else route.weights_TK * route.valid_TK
        y_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
        constant = 0
        for j, kind in enumerate(self.config.experts.zero_experts):
            coef_T1 = (weights_TK * (route.expert_ids_TK == E + j)).sum(dim=1, keepdim=True)
            if kind == "skip":  # adds nothing; kept in the graph (its weight's gradient is zero)
                y_TD = y_TD + 0.0 * coef_T1
            elif kind == "copy":
                y_TD = y_TD + coef_T1 * x_TD.float()
            else:
                assert self.zero_constants is not None
                y_TD = y_TD + coef_T1 * self.zero_constants[constant].float()
                constant += 1
        return y_TD

    def _tally(
        self, route: RouterOutput, routed: RouterOutput, top_k: int, step: ExpertStep
    ) -> tuple[Tensor | None, Tensor | None]:
        """The whole batch's experts per token (``[K + 1]``) and choices per router choice (``[E + Z]``).

        The choices are counted (used slots only) with zero-computation experts, else ``None``.
        Distributed with a per-token number of experts, the ranks' tallies are summed (one
        small all-reduce). With a fixed ``k`` every token of the batch used ``k`` experts:
        nothing to count (``None``; the stats say so when built).
        """
        if routed.valid_TK is None:  # no top-p and no zero-computation experts, on every rank
            return None, None
        per_token = count_per_expert(routed.experts_per_token(), top_k + 1)
        choices = None
        if self.config.experts.zero_experts:
            C = self.config.num_choices
            ids = route.expert_ids_TK
            if route.valid_TK is not None:
                ids = ids.masked_fill(~route.valid_TK, C)
            choices = count_per_expert(ids, C + 1)[:C]
        if step.world_size == 1:
            return per_token, choices
        parts = [per_token] if choices is None else [per_token, choices]
        assert isinstance(self.strategy, ExpertParallelExperts)
        total = self.strategy.sum_over_ranks(torch.cat(parts))
        return total[: top_k + 1], None if choices is None else total[top_k + 1 :]

    def _record(self, source: StatsSource) -> None:
        """Keep what the call's ``stats`` are built from (built on first access: no host sync here)."""
        self._stats_source = source
        self._stats = None

    @property
    def stats(self) -> MoEStats | None:
        """What the last forward call did (``None`` before the first call); see ``MoEStats``."""
        if self._stats is None and self._stats_source is not None:
            self._stats = self._stats_source.build()
        return self._stats

    def _check_call(
        self,
        x: Tensor,
        top_k: int | None,
        capacity_factor: float | None,
        plan: Plan | str | None,
        top_p: float | None = None,
    ) -> Call:
        """Validate one call's input and overrides."""
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != cfg.dim:
            raise ValueError(f"x must have shape [..., dim={cfg.dim}], got {tuple(x.shape)}")
        k = cfg.top_k if top_k is None else validate_top_k(top_k, cfg.num_choices)
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
        if isinstance(plan, Plan):
            resolved = self.strategy.resolve(plan)  # validates
            plan = resolved if self.world_size > 1 else plan
        if cfg.check_finite and not bool(torch.isfinite(x).all()):  # NOTE: host sync, opt-in.
            raise ValueError("x contains non-finite values (NaN or Inf); check_finite=True")
        p = cfg.router.top_p if top_p is None else validate_top_p(top_p)
        return Call(top_k=k, capacity_factor=cf, plan=plan, top_p=p)  # type: ignore[arg-type]

    def _backend(self, x: Tensor) -> str:
        """The expert GEMM backend this call's input runs on."""
        if not isinstance(self.experts, GroupedExperts):
            return type(self.experts).__name__
        compute_dtype = self.experts.compute_dtype(x)
        if torch.compiler.is_compiling() and self.world_size == 1:
            return self.experts.compiled_backend(x.device, compute_dtype)
        return self.experts.resolved_backend(x.device, compute_dtype)

    def _balance(
        self, route: RouterOutput, step: ExpertStep, choices: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Set ``aux_loss``, count loads for aux-free balancing; returns the unweighted terms (detached).

        Distributed, each rank's terms are its tokens' share of the whole batch's: the
        per-token means are scaled by ``W * T_rank / T``, so the mean of the ranks'
        ``aux_loss`` is the whole batch's loss (and its router gradient the single-device
        one) for any per-rank token counts, empty ranks included. ``choices``: the whole
        batch's choices per router choice (zero-computation experts; see ``_tally``).
        """
        bcfg = self.config.balance
        aux = route.probs_TE.new_zeros(())
        balance = z = None
        share = 1.0
        if step.world_size > 1 and step.num_tokens > 0:
            share = step.world_size * route.probs_TE.shape[0] / step.num_tokens
        if bcfg.load_balance_weight > 0:
            fraction_E = step.routed_fraction_E
            if choices is not None and step.world_size > 1:  # every choice's share, zero experts too
                fraction_E = choices.to(torch.float64) / choices.sum().clamp_min(1)
            balance = share * load_balance_loss(
                route.probs_TE, route.expert_ids_TK, fraction_E, route.valid_TK
            )
            aux = aux + bcfg.load_balance_weight * balance
        if bcfg.z_loss_weight > 0:
            z = share * router_z_loss(route.logits_TE)
            aux = aux + bcfg.z_loss_weight * z
        self.aux_loss = aux
        if self.training and bcfg.aux_free_rate > 0:
            # With zero-computation experts the bias covers every choice, zero experts too.
            counts_E = step.routed_per_expert_E if choices is None else choices
            self._pending_counts_E += counts_E.to(self._pending_counts_E.device)
        return (None if balance is None else balance.detach(), None if z is None else z.detach())

    def _empty_forward(self, x: Tensor, call: Call, strategy: LocalExperts, backend: str) -> Tensor:
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        self._record(StatsSource(strategy.empty_step(call), call.top_k, call.capacity_factor, backend))
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

    # ------------------------------------------------------------- the plan
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

    def resolve_plan(self, plan: Plan | None = None) -> Plan:
        """``plan`` (default ``Plan()``) with its defaults filled in for this layer, validated."""
        plan = Plan() if plan is None else plan
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a flexmoe.Plan, got {type(plan).__name__}")
        return self.strategy.resolve(plan)

    def valid_plans(
        self, degrees: Sequence[int] = (1, 2, 4), exchanges: Sequence[str] = ("flat", "2dh")
    ) -> list[Plan]:
        """Every distinct resolved plan this layer can run with these pipelining degrees and exchanges.

        One device: ``[Plan(r=1, ...)]`` only (``d`` and the exchange do not apply there).
        """
        placement = self.placement
        if placement is None:
            return [self.resolve_plan()]
        plans: list[Plan] = []
        for r in placement.valid_r():
            for d in degrees:
                for exchange in exchanges:
                    plan = placement.resolve(Plan(r=r, d=d, exchange=exchange))  # type: ignore[arg-type]
                    if plan not in plans:
                        plans.append(plan)
        return plans

    @property
    def tuner(self) -> Tuner | None:
        """The online tuner (after the first ``plan="auto"`` call of a distributed layer), else ``None``."""
        return self.strategy.tuner if isinstance(self.strategy, ExpertParallelExperts) else None

    def prepare_for_inference(self) -> bool:
        """Pre-pack the expert weights for fast CPU inference (see ``GroupedExperts.prepare_for_inference``).

        Opt-in: the packed copies take as much memory again as the expert weights; they
        are dropped automatically when the weights change. Returns whether they were built.
        """
        if not isinstance(self.experts, GroupedExperts):
            return False
        return self.experts.prepare_for_inference()


def routed_experts_only(route: RouterOutput, num_experts: int) -> RouterOutput:
    """``route`` with the choices of zero-computation experts (ids ``>= E``) as unused slots."""
    real_TK = route.expert_ids_TK < num_experts
    valid_TK = real_TK if route.valid_TK is None else route.valid_TK & real_TK
    ids_TK = route.expert_ids_TK.clamp(max=num_experts - 1)  # any id: the slot is unused
    return dataclasses.replace(route, expert_ids_TK=ids_TK, valid_TK=valid_TK)


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
