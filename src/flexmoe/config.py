"""Typed configuration of an MoE layer: frozen, keyword-only dataclasses, one per stage.

Every value is validated in ``__post_init__`` and a bad value raises ``ValueError``
naming the field and what was expected. Runtime objects (devices, process groups)
are never config fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "BalanceConfig",
    "CapacityConfig",
    "ExpertConfig",
    "MoEConfig",
    "Plan",
    "RerouteConfig",
    "RouterConfig",
    "TunerConfig",
    "validate_capacity_factor",
    "validate_top_k",
    "validate_top_p",
]

RouterKind = Literal["softmax", "sigmoid", "cosine"]
Activation = Literal["relu", "gelu", "silu", "swiglu", "geglu"]
Backend = Literal["auto", "loop", "fused", "grouped_mm"]
ZeroExpert = Literal["skip", "copy", "constant"]

ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS: tuple[str, ...] = ("swiglu", "geglu")
BACKENDS: tuple[str, ...] = ("auto", "loop", "fused", "grouped_mm")
ROUTER_KINDS: tuple[str, ...] = ("softmax", "sigmoid", "cosine")
ZERO_EXPERTS: tuple[str, ...] = ("skip", "copy", "constant")


def _require(condition: bool, name: str, expected: str, got: object) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {got!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_top_k(top_k: object, num_experts: int, name: str = "top_k") -> int:
    """Check that ``top_k`` is an int in ``[1, num_experts]`` and return it."""
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:  # type: ignore[operator]
        raise ValueError(f"{name} must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    return top_k  # type: ignore[return-value]


def validate_top_p(top_p: object, name: str = "top_p") -> float:
    """Check that ``top_p`` is a real number in ``(0, 1]`` and return it as a float."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"{name} must be a float in (0, 1], got {top_p!r}")
    return float(top_p)


def validate_capacity_factor(capacity_factor: object, name: str = "capacity_factor") -> float:
    """Check that ``capacity_factor`` is a finite real number and return it as a float.

    ``> 0`` fixed capacity, ``< 0`` adaptive capacity capped at ``|cf|`` times the even
    share, ``0`` dropless.
    """
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise ValueError(
            f"{name} must be a finite float (>0 fixed, <0 adaptive with cap, 0 dropless), "
            f"got {capacity_factor!r}"
        )
    if not math.isfinite(capacity_factor):
        raise ValueError(
            f"{name} must be finite (>0 fixed, <0 adaptive with cap, 0 dropless), got {capacity_factor!r}"
        )
    return float(capacity_factor)


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """How tokens choose experts.

    Attributes:
        kind: ``"softmax"`` (softmax over experts, then top-k), ``"sigmoid"`` (independent
            sigmoid scores, DeepSeek-V3) or ``"cosine"`` (cosine similarity between a
            low-dimensional projection of the token and learned expert embeddings, X-MoE).
        normalize_weights: renormalise the selected top-k weights to sum to one (only
            when a token takes more than one expert: a single renormalised weight would
            always be 1 and the router would get no gradient, so top-1 keeps the raw
            score, as in Switch) ...
        normalize_single: ... unless this is set: a token's single expert then gets
            weight 1, as ``transformers`` and llama.cpp give it when a model trained
            with renormalised weights runs with one expert per token (``flexmoe.hf``
            sets it for converted models that renormalise).
        num_groups: split experts into this many groups (group-limited routing) ...
        topk_groups: ... and let each token choose experts only from its best groups.
        routed_scaling_factor: multiplies the final routing weights (DeepSeek-V3).
        selection_bias: keep a per-expert bias that is added to the scores for the
            top-k *choice* only, never to the weights (auxiliary-loss-free balancing).
        noise_std: standard deviation of Gaussian noise added to the router logits
            while training (noisy top-k). 0 disables it.
        input_jitter: multiplicative uniform jitter ``U(1-eps, 1+eps)`` on the router
            input while training (Switch Transformer). 0 disables it.
        cosine_dim: projection dimension of the cosine router.
        cosine_init_temperature: initial temperature of the cosine router (learned,
            clamped below at 0.01).
        top_p: a per-token number of experts (top-p routing): of the token's ``top_k``
            best experts (in choice order), the fewest whose probabilities (``probs``:
            softmax, or the sigmoid scores normalised to sum to one) reach ``top_p``,
            and at least ``min_k``. ``None``: always ``top_k``. The weights are then
            renormalised over the experts each token kept (when it kept more than one).
        min_k: the fewest experts a token takes under ``top_p``.
    """

    kind: RouterKind = "softmax"
    normalize_weights: bool = True
    normalize_single: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    noise_std: float = 0.0
    input_jitter: float = 0.0
    cosine_dim: int = 256
    cosine_init_temperature: float = 0.07
    top_p: float | None = None
    min_k: int = 1

    def __post_init__(self) -> None:
        _require(self.kind in ROUTER_KINDS, "router.kind", f"one of {ROUTER_KINDS}", self.kind)
        for name in ("normalize_weights", "normalize_single"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"router.{name}", "a bool", value)
        if self.top_p is not None:
            validate_top_p(self.top_p, name="router.top_p")
        _require(_is_int(self.min_k) and self.min_k >= 1, "router.min_k", "an int >= 1", self.min_k)
        _require(
            _is_int(self.num_groups) and self.num_groups >= 1,
            "router.num_groups",
            "an int >= 1",
            self.num_groups,
        )
        _require(
            _is_int(self.topk_groups) and 1 <= self.topk_groups <= self.num_groups,
            "router.topk_groups",
            f"an int in [1, num_groups={self.num_groups}]",
            self.topk_groups,
        )
        _require(
            math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
            "router.routed_scaling_factor",
            "a finite float > 0",
            self.routed_scaling_factor,
        )
        _require(self.noise_std >= 0, "router.noise_std", "a float >= 0", self.noise_std)
        _require(0 <= self.input_jitter < 1, "router.input_jitter", "a float in [0, 1)", self.input_jitter)
        _require(
            _is_int(self.cosine_dim) and self.cosine_dim >= 1,
            "router.cosine_dim",
            "an int >= 1",
            self.cosine_dim,
        )
        _require(
            self.cosine_init_temperature > 0,
            "router.cosine_init_temperature",
            "a float > 0",
            self.cosine_init_temperature,
        )


@dataclass(frozen=True, kw_only=True)
class CapacityConfig:
    """How many assignments each expert accepts.

    Attributes:
        capacity_factor: ``> 0``: fixed capacity ``ceil(cf * T * k / E)`` per expert,
            the overflow is dropped and counted; ``< 0``: capacity is the real maximum
            load of this step, capped at ``ceil(|cf| * T * k / E)``; ``0``: dropless.
        batch_prioritized: when dropping, drop each expert's lowest-scored assignments
            first (batch-prioritised routing). Otherwise first choices outrank second
            choices, and within one choice rank earlier tokens win (GShard order).
    """

    capacity_factor: float = 0.0
    batch_prioritized: bool = False

    def __post_init__(self) -> None:
        validate_capacity_factor(self.capacity_factor)


@dataclass(frozen=True, kw_only=True)
class ExpertConfig:
    """The routed experts' FFN.

    Attributes:
        activation: ``relu``, ``gelu``, ``silu`` (``y = W2 act(W1 x)``) or the gated
            ``swiglu`` / ``geglu`` (``y = W2 (act(Wg x) * (Wu x))``).
        bias: give every expert projection a bias.
        backend: grouped-GEMM backend. ``auto`` picks the fastest measured for the
            device; ``loop`` is a per-expert loop under plain autograd; ``fused`` is a
            per-expert loop with a hand-written backward and preallocated buffers;
            ``grouped_mm`` uses ``torch._grouped_mm``.
        num_shared_experts: number of always-on experts, fused into one dense FFN.
        shared_hidden_dim: hidden size of that FFN (default ``num_shared_experts *
            hidden_dim``).
        shared_expert_gate: scale the shared output by a learned sigmoid gate
            (Qwen2-MoE).
        zero_experts: zero-computation experts (MoE++) the router chooses among next to
            the routed ones, as experts ``E, E+1, ...``: ``"skip"`` adds nothing,
            ``"copy"`` adds the token itself, ``"constant"`` a learned vector, each times
            its routing weight. They take routing weight and no FLOPs.
    """

    activation: Activation = "swiglu"
    bias: bool = False
    backend: Backend = "auto"
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_expert_gate: bool = False
    zero_experts: tuple[ZeroExpert, ...] = ()

    def __post_init__(self) -> None:
        _require(
            isinstance(self.zero_experts, tuple) and all(z in ZERO_EXPERTS for z in self.zero_experts),
            "zero_experts",
            f"a tuple of {ZERO_EXPERTS}",
            self.zero_experts,
        )
        _require(self.activation in ACTIVATIONS, "activation", f"one of {ACTIVATIONS}", self.activation)
        _require(self.backend in BACKENDS, "backend", f"one of {BACKENDS}", self.backend)
        _require(
            _is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
            "num_shared_experts",
            "an int >= 0",
            self.num_shared_experts,
        )
        if self.shared_hidden_dim is not None:
            _require(
                _is_int(self.shared_hidden_dim) and self.shared_hidden_dim >= 1,
                "shared_hidden_dim",
                "an int >= 1 or None",
                self.shared_hidden_dim,
            )

    @property
    def gated(self) -> bool:
        """Whether the activation is a gated linear unit."""
        return self.activation in GATED_ACTIVATIONS


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    """Load-balancing terms.

    Attributes:
        load_balance_weight: weight of the Switch/GShard load-balance loss
            ``E * sum_i f_i * P_i`` (1.0 at perfect balance). On by default (0.01).
        z_loss_weight: weight of the router z-loss ``mean_t logsumexp(logits_t)^2``.
        aux_free_rate: step size ``gamma`` of auxiliary-loss-free balancing:
            ``b_i <- b_i + gamma * sign(mean(c) - c_i)`` after each optimizer step.
            Requires ``RouterConfig.selection_bias``; 0 disables the update.
    """

    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    aux_free_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("load_balance_weight", "z_loss_weight", "aux_free_rate"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, "a finite float >= 0", value)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How one forward call is executed in parallel; every plan computes the same layer.

    Attributes:
        r: sharing degree for sharded experts (``E < W``); ``None`` picks the default.
            On a single device only ``None``/``0``/``1`` are meaningful.
        d: pipelining degree (number of overlapped chunks).
        exchange: all-to-all algorithm, ``"flat"`` or ``"2dh"``.
        reroute: rerouting of hot experts' rows (expert parallelism with whole
            experts): ``True`` or ``"lla"`` forces least-loaded rerouting; ``"shadow"``
            forces the shadowing planner (each hot expert's other source ranks compute
            their own rows of it with a copy, and what is left is placed least-loaded;
            see ``flexmoe.planner.rerouting``); ``False`` forbids both; ``None`` lets the
            layer's ``RerouteConfig`` decide from this step's load. A forced kind whose
            bounds cannot hold the step raises ``ValueError``; a step that needs no rows
            moved runs plain expert parallelism. After a call, ``stats.plan.reroute`` is
            what ran: ``"shadow"`` (some expert shadowed), ``"lla"`` (rows rerouted,
            none shadowed: also what ``"shadow"`` runs when no other rank has rows of the
            hot experts) or ``False``.
    """

    r: int | None = None
    d: int = 1
    exchange: Literal["flat", "2dh"] = "flat"
    reroute: bool | Literal["lla", "shadow"] | None = None

    def __post_init__(self) -> None:
        if self.r is not None:
            _require(_is_int(self.r) and self.r >= 0, "plan.r", "an int >= 0 or None", self.r)
        _require(_is_int(self.d) and self.d >= 1, "plan.d", "an int >= 1", self.d)
        _require(self.exchange in ("flat", "2dh"), "plan.exchange", "'flat' or '2dh'", self.exchange)
        _require(
            self.reroute is None or isinstance(self.reroute, bool) or self.reroute in ("lla", "shadow"),
            "plan.reroute",
            "True, False, None, 'lla' or 'shadow'",
            self.reroute,
        )

    @property
    def reroute_kind(self) -> Literal["lla", "shadow"] | None:
        """The rerouting this plan forces: ``"lla"`` (``True`` or ``"lla"``), ``"shadow"``, or ``None``."""
        if self.reroute is True or self.reroute == "lla":
            return "lla"
        return "shadow" if self.reroute == "shadow" else None

    @property
    def label(self) -> str:
        """A short name, e.g. ``"r=1 d=2 flat +reroute"`` or ``"r=0 (DP)"``."""
        if self.r == 0:
            return "r=0 (DP)"
        text = f"r={'S' if self.r is None else self.r} d={self.d} {self.exchange}"
        kind = self.reroute_kind
        return text if kind is None else text + (" +shadow" if kind == "shadow" else " +reroute")


@dataclass(frozen=True, kw_only=True)
class RerouteConfig:
    """When and how far a distributed layer reroutes hot experts' rows (``flexmoe.planner.rerouting``).

    Attributes:
        enabled: allow rerouting when a call's plan leaves it to the layer.
        threshold: reroute only if the busiest rank has at least this many times the
            mean rows per rank (LLEP's lambda) ...
        min_gain: ... and the predicted step time drops by at least this fraction.
        alpha: the per-rank row target is ``alpha`` times the mean (LLEP's alpha).
        min_chunk: smallest piece of an expert sent to another rank (rows).
        max_copies_per_rank: hard bound on expert copies a rank receives per step.
        max_rows_per_rank: hard bound on rows a rank computes per step: a step whose
            plain expert parallelism exceeds it is rerouted (whether or not that pays), or
            raises ``ValueError`` when no plan fits the bounds; it does not apply when
            rerouting is forbidden (``enabled=False`` or ``Plan(reroute=False)``).
        kinds: the rerouting plans the layer may choose from: ``"lla"`` (least-loaded:
            few copies, rows travel to them) and ``"shadow"`` (hot experts copied to every
            rank that has rows for them, which computes its own rows: no row traffic,
            more copies).

    Whether rerouting pays, and which kind, is the cost model's call (``flexmoe.planner.simulate`` on the
    layer's cluster, ``TunerConfig.cluster``): the same model ``plan="auto"`` scores with.
    """

    enabled: bool = True
    threshold: float = 1.3
    min_gain: float = 0.05
    alpha: float = 1.0
    min_chunk: int = 1
    max_copies_per_rank: int | None = None
    max_rows_per_rank: int | None = None
    kinds: tuple[str, ...] = ("lla", "shadow")

    def __post_init__(self) -> None:
        _require(
            isinstance(self.kinds, tuple) and len(self.kinds) > 0 and set(self.kinds) <= {"lla", "shadow"},
            "kinds",
            "a non-empty tuple of 'lla' and/or 'shadow'",
            self.kinds,
        )
        _require(self.threshold >= 1.0, "threshold", "a float >= 1", self.threshold)
        _require(0.0 <= self.min_gain < 1.0, "min_gain", "a float in [0, 1)", self.min_gain)
        _require(self.alpha >= 1.0, "alpha", "a float >= 1", self.alpha)
        _require(_is_int(self.min_chunk) and self.min_chunk >= 1, "min_chunk", "an int >= 1", self.min_chunk)
        for name in ("max_copies_per_rank", "max_rows_per_rank"):
            value = getattr(self, name)
            if value is not None:
                _require(_is_int(value) and value >= 0, name, "an int >= 0 or None", value)


@dataclass(frozen=True, kw_only=True)
class TunerConfig:
    """The cost model and the online tuner of a distributed layer (``flexmoe.planner.tuner``).

    Attributes:
        cluster: the cost model's machine: a preset name, ``"this-machine"`` (the file
            ``flexmoe calibrate`` writes) or a cluster JSON path; ``None``: the
            calibration if there is one, else a rough model of the device (with a
            warning). The first rank's cluster is used by all.
        measure_top: with ``plan="auto"``, candidates measured online per load bucket
            (the best predicted ones), besides plain expert parallelism.
        measure_steps: steps each measured candidate runs; the first is a warm-up, the
            median of the others is its time.
        pipelining: pipelining degrees ``d`` the tuner considers.
        bucket_width: load buckets are ``log2`` of the busiest rank's rows over the mean,
            in steps of this width (and ``log2`` of the rows, in steps of 0.5): a new
            bucket is searched, a known one reuses its winner.
        drift: re-tune a bucket when the median of its winner's last 5 calls moves this
            far (a fraction) from the median of the first 5 after it won (or, for those
            first 5, more than twice this far from the time it won with).
    """

    cluster: str | None = None
    measure_top: int = 2
    measure_steps: int = 4
    pipelining: tuple[int, ...] = (1, 2, 4)
    bucket_width: float = 0.25
    drift: float = 0.3

    def __post_init__(self) -> None:
        _require(
            self.cluster is None or isinstance(self.cluster, str), "cluster", "a str or None", self.cluster
        )
        _require(
            _is_int(self.measure_top) and self.measure_top >= 0,
            "measure_top",
            "an int >= 0",
            self.measure_top,
        )
        _require(
            _is_int(self.measure_steps) and self.measure_steps >= 1,
            "measure_steps",
            "an int >= 1",
            self.measure_steps,
        )
        _require(
            isinstance(self.pipelining, tuple)
            and len(self.pipelining) > 0
            and all(_is_int(d) and d >= 1 for d in self.pipelining),
            "pipelining",
            "a non-empty tuple of ints >= 1",
            self.pipelining,
        )
        _require(self.bucket_width > 0, "bucket_width", "a float > 0", self.bucket_width)
        _require(self.drift > 0, "drift", "a float > 0", self.drift)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Everything that defines an MoE layer.

    Attributes:
        dim: model dimension ``D`` (input and output).
        hidden_dim: hidden dimension ``F`` of each routed expert.
        num_experts: number of routed experts ``E``.
        top_k: experts per token ``K``.
        router, capacity, experts, balance: the per-stage settings.
        reroute: least-loaded rerouting of a distributed layer (ignored on one device).
        tuner: the cost model and online plan tuner of a distributed layer.
        check_finite: raise on non-finite inputs (costs a host sync).
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    reroute: RerouteConfig = field(default_factory=RerouteConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    check_finite: bool = False

    @property
    def num_choices(self) -> int:
        """What the router chooses among: the routed experts, then the zero-computation ones."""
        return self.num_experts + len(self.experts.zero_experts)

    def __post_init__(self) -> None:
        _require(_is_int(self.dim) and self.dim >= 1, "dim", "an int >= 1", self.dim)
        _require(
            _is_int(self.hidden_dim) and self.hidden_dim >= 1, "hidden_dim", "an int >= 1", self.hidden_dim
        )
        _require(
            _is_int(self.num_experts) and self.num_experts >= 1,
            "num_experts",
            "an int >= 1",
            self.num_experts,
        )
        validate_top_k(self.top_k, self.num_choices)
        _require(
            self.router.min_k <= self.top_k,
            "router.min_k",
            f"an int in [1, top_k={self.top_k}]",
            self.router.min_k,
        )
        groups = self.router.num_groups
        if self.experts.zero_experts and groups > 1:
            raise ValueError("experts.zero_experts cannot be combined with router.num_groups > 1")
        if self.num_experts % groups != 0:
            raise ValueError(f"router.num_groups must divide num_experts={self.num_experts}, got {groups!r}")
        if groups > 1:
            reachable = self.router.topk_groups * (self.num_experts // groups)
            validate_top_k(self.top_k, reachable, name="top_k (with group-limited routing)")
        if self.balance.aux_free_rate > 0 and not self.router.selection_bias:
            raise ValueError(
                "balance.aux_free_rate > 0 needs router.selection_bias=True (the bias it updates), "
                f"got aux_free_rate={self.balance.aux_free_rate!r} with selection_bias=False"
            )
