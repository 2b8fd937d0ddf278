"""One plan's predicted step on a cluster: a time breakdown, the exchange's messages, peak memory.

``simulate`` composes the primitives of ``costmodel`` in the order the layer runs
(``flexmoe.layer`` and ``flexmoe.parallel.expert_parallel``), for a training step
(forward then backward) or a forward:

1. host: the runtime's fixed cost per step, and per pipelined chunk.
2. metadata: the header and routing-count all-gathers (``E*K`` int64 per rank) that
   make capacity decisions global (flexmoe's plans; static baselines have fixed
   shapes and skip them).
3. routing (router GEMM, softmax, top-k), permute (gather rows expert-major).
4. weight gather: ``r = 0`` (every expert), or ``g = S/r > 1`` shards of a sharded
   expert, all-gathered before the experts (forward) and reduce-scattered after
   (backward): ``(g - 1)`` messages of this rank's stored parameters each way.
5. rerouting (``rerouting=True``): planning on the host (the layer's least-loaded
   algorithm), an all-to-all of expert copies from their owners to the ranks that take
   spilled rows, and of their gradients back.
6. the pipelined exchange → experts → exchange back, ``d`` chunks per pass
   (``costmodel.pipeline_time``); the straggler rank's expert time paces every chunk
   (``paced_time``: on CPU nodes it speeds up as the other ranks finish).
7. combine (weight rows, scatter-add per token).

Capacity: flexmoe's plans keep ``min(count, C)`` rows per expert with the global
capacity of ``flexmoe.dispatch.layout.compute_capacity`` and send only kept rows. A
static baseline pads: every source sends exactly ``C_local = ceil(cf*T*K/E)`` rows
per expert (what a fixed-shape system such as GShard or Fairseq does) and drops the
rest, so its time does not depend on the load but its dropped fraction does; a
source's count fluctuates around its mean (Poisson-like), so even uniform routing
overflows ``C_local`` at capacity factor 1.0. (Global counts, which flexmoe's
capacity uses, fluctuate ``sqrt(W)`` times less relative to their mean; they are
taken at their mean.)

Memory (per rank, the largest): stored expert weights (+ gradients when training),
gathered weights and rerouted copies (+ their gradients), activations saved for
backward (local rows, received rows, the experts' hidden activations, outputs) and
the all-to-all buffers. Optimizer state and the rest of the model are not counted:
pass ``memory_budget`` for what one layer may use.

Legend: W ranks, E experts, El experts per rank, S = W/E shards per expert,
T tokens per rank, K top-k, D dim, F hidden, H = 2F gated else F, b bytes/element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flexmoe.config import Plan, RerouteConfig
from flexmoe.dispatch import capacity_limit
from flexmoe.placement import Placement
from flexmoe.planner.cluster import Cluster
from flexmoe.planner.costmodel import (
    ExchangeCost,
    Machine,
    all_gather_time,
    exchange_cost,
    gemm_time,
    pipeline_time,
    stream_time,
)
from flexmoe.planner.prediction import Breakdown, Prediction, Scored, StaticBaseline
from flexmoe.planner.rerouting import Rerouting, expected_rerouting
from flexmoe.planner.workload import Load, MoEWorkload

__all__ = [
    "REROUTE_PLANNING",
    "kept_rows",
    "paced_time",
    "reroute_settings",
    "simulate",
]

# Host time to plan rerouting: fixed + per expert (sorting, least-loaded choice). An
# assumption, of the order of ``flexmoe.planner.rerouting.plan_rerouting`` in Python.
REROUTE_PLANNING = (1e-4, 1e-6)
# Read+write passes over gathered expert shards per direction (see ``_weight_exchange_time``).
GATHER_COPY_PASSES = 3


def _placement(workload: MoEWorkload, machine: Machine) -> Placement:
    # Rank 0's view: only the rank-independent fields are used here.
    return Placement(machine.world_size, 0, workload.num_experts, workload.hidden_dim, machine.ranks_per_node)


def reroute_settings(config: RerouteConfig | None) -> dict[str, Any]:
    """The arguments of ``plan_rerouting`` that a layer with ``config`` uses."""
    c = config or RerouteConfig()
    return {
        "alpha": c.alpha,
        "min_chunk": c.min_chunk,
        "max_rows_per_rank": c.max_rows_per_rank,
        "max_copies_per_rank": c.max_copies_per_rank,
    }


def _expected_overflow(mean: NDArray[np.float64], capacity: float) -> NDArray[np.float64]:
    """``E[max(0, X - capacity)]`` for counts ``X`` around ``mean``, Poisson spread (normal approximation).

    A source's count for one expert fluctuates from step to step even under uniform
    routing; a fixed per-source capacity drops the part above it (GShard's drops at
    capacity factor 1.0).
    """
    sigma = np.sqrt(np.maximum(mean, 1e-12))
    z = (capacity - mean) / sigma
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    tail = 0.5 * np.vectorize(math.erfc)(z / math.sqrt(2))
    result: NDArray[np.float64] = np.maximum(0.0, (mean - capacity) * tail + sigma * pdf)
    return result


def kept_rows(
    workload: MoEWorkload, load: Load, W: int, static_capacity: float | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """``(rows computed per expert, rows each source sends per expert, dropped fraction)``."""
    T, K, E = workload.tokens_per_device, workload.top_k, workload.num_experts
    routed_E = load.rows_per_expert(workload, W)
    total = float(routed_E.sum())
    if static_capacity is not None:  # padded: every source sends exactly C_local rows per expert
        local = math.ceil(static_capacity * T * K / E - 1e-9)
        overflow = _expected_overflow(routed_E / W, float(local))
        padded = np.full(E, float(local))
        return padded * W, padded, W * float(overflow.sum()) / total
    cf = workload.capacity_factor
    kept = routed_E
    # The layer's rule, on the whole batch: over its T*K slots, or its routed assignments.
    if workload.experts_per_token is None:
        limit = capacity_limit(cf, W * T, K, E)
    else:
        limit = capacity_limit(cf, total, 1, E)
    if limit is not None:
        # Adaptive (cf < 0): the real maximum load, capped at the limit.
        capacity = float(limit) if cf > 0 else min(float(limit), float(routed_E.max()))
        kept = np.minimum(routed_E, capacity)
    return kept, kept / W, (total - float(kept.sum())) / total


def _expert_times(
    rows_RU: NDArray[np.float64],
    hidden: int,
    workload: MoEWorkload,
    machine: Machine,
    units_R: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Forward and backward expert time per rank for ``rows_RU[rank, unit]`` rows of width ``hidden``.

    With ``units_R``, ``rows_RU`` is ``[W, 1]``: each rank runs ``units_R`` units of that many rows.
    """
    D, b, dtype = workload.dim, workload.bytes_per_element, workload.dtype
    H = 2 * hidden if workload.gated else hidden
    m = rows_RU
    up = gemm_time(m, D, H, b, machine, dtype)  # [m, D] @ [D, H]
    down = gemm_time(m, hidden, D, b, machine, dtype)  # [m, F] @ [F, D]
    # The activation (SiLU/GELU of the gate, times the up half when gated): one
    # transcendental per hidden unit forward; backward recomputes it and takes its derivative.
    act = stream_time(m * (H + hidden) * b, machine, ops=2, transcendentals=m * hidden)
    act_bwd = stream_time(m * (2 * H + hidden) * b, machine, ops=4, transcendentals=2 * m * hidden)
    # Backward: input and weight gradients of each GEMM (the weight gradient is the
    # transposed product with the same FLOPs and bytes: [k, m] @ [m, n]).
    forward = (up + act + down).sum(1)
    backward = (2 * up + act_bwd + 2 * down).sum(1)
    if units_R is not None:
        forward, backward = forward * units_R, backward * units_R
    return forward, backward


def paced_time(work_R: NDArray[np.float64], machine: Machine) -> float:
    """When the slowest rank finishes ``work_R`` (seconds each at the all-busy rate).

    Ranks of one physical node share it: with ``n`` of its ``L`` ranks still computing,
    each runs ``1 + (s - 1) * (L - n) / (L - 1)`` times faster than with all ``L`` busy
    (``s`` = ``DeviceSpec.solo_speedup``; 1 on accelerators, where this is the maximum).
    Ranks finish in order of their work; the node's clock advances piecewise.
    """
    s = machine.cluster.device.solo_speedup
    L = min(machine.ranks_per_physical_node, work_R.size)
    if s == 1.0 or L < 2:
        return float(work_R.max()) if work_R.size else 0.0
    slowest = 0.0
    for start in range(0, work_R.size, L):
        clock, done = 0.0, 0.0
        for i, work in enumerate(np.sort(work_R[start : start + L])):
            active = L - i
            clock += (work - done) / (1.0 + (s - 1.0) * (L - active) / (L - 1))
            done = work
        slowest = max(slowest, clock)
    return slowest


def _weight_exchange_time(params: float, group: int, b: int, machine: Machine, whole: bool) -> float:
    """All-gather (or reduce-scatter) of ``params`` elements among ``group`` consecutive ranks.

    ``whole``: whole experts (``r = 0``), gathered tensor by tensor straight into the
    expert-major layout (``flexmoe.parallel.comm.all_gather_rows``): about ``group + 1``
    block copies per direction (this rank's block placed, or the received gradients
    summed). Otherwise hidden shards of sharded experts: the packed send buffer, the
    split into parameters and their join per expert, and backward the gradients' join
    and the sum onto the stored shard (``GATHER_COPY_PASSES`` read+write passes).
    """
    if group <= 1:
        return 0.0
    Lp = machine.ranks_per_physical_node
    intra = min(group, Lp) - 1
    inter = group - 1 - intra
    nbytes = params * b
    lat_i, bw_i = machine.link(False)
    lat_e, bw_e = machine.link(True)
    link_time = max(intra * (lat_i + nbytes / bw_i), inter * (lat_e + nbytes / bw_e))
    if whole:
        assemble = float(stream_time((group + 1) * nbytes, machine, ops=2))
    else:
        passes = GATHER_COPY_PASSES
        assemble = float(stream_time(passes * 2.0 * group * nbytes, machine, ops=passes))
    return machine.collective_overhead + link_time + assemble


def _copy_time(reroute: Rerouting, expert_bytes: float, machine: Machine) -> float:
    """The expert-copy all-to-all (owners send each copy to its rank), one direction.

    As in ``flexmoe.parallel.expert_parallel``: one all-to-all in which an owner sends
    every copy of its experts, so a hot expert's owner sends all of them.
    """
    if reroute.num_copies == 0:
        return 0.0
    W, El = machine.world_size, reroute.experts_per_rank
    Lp = machine.ranks_per_physical_node
    out = np.zeros((2, W))  # [intra, inter] bytes sent per rank
    into = np.zeros((2, W))
    messages = np.zeros((2, W))
    expert, rank = reroute.transfers_T2.T
    owner = expert // El
    kind = (owner // Lp != rank // Lp).astype(np.int64) if not machine.single_node else np.zeros_like(owner)
    np.add.at(out, (kind, owner), expert_bytes)
    np.add.at(into, (kind, rank), expert_bytes)
    np.add.at(messages, (kind, owner), 1)
    np.add.at(messages, (kind, rank), 1)
    worst = 0.0
    for kind in (0, 1):
        latency, bandwidth = machine.link(bool(kind))
        worst = max(
            worst, float((messages[kind] * latency + np.maximum(out[kind], into[kind]) / bandwidth).max())
        )
    return machine.collective_overhead + worst


@dataclass(frozen=True)
class _Step:
    """What one simulated step runs: the plan resolved for the layout, and its shared quantities."""

    cluster: Cluster
    workload: MoEWorkload
    machine: Machine
    placement: Placement
    r: int
    d: int
    exchange: str
    kind: str | None  # rerouting: "lla", "shadow" or None
    static_capacity: float | None

    @property
    def passes(self) -> int:
        """1 forward, 2 with a backward."""
        return 2 if self.workload.training else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of the layer's input."""
        return self.workload.dim * self.workload.bytes_per_element


@dataclass(frozen=True)
class _Work:
    """Who computes what: rows per rank and unit, the unit's hidden width, rows each rank receives."""

    rows_RU: NDArray[np.float64]
    hidden: int
    units_R: NDArray[np.int64] | None  # with rerouting: units (own experts and copies) per rank
    rows_R: NDArray[np.float64]
    received_R: NDArray[np.float64]  # rows each source sends each rank (its own come free)
    reroute: Rerouting | None


def _resolve(plan: Scored, cluster: Cluster, workload: MoEWorkload, machine: Machine) -> _Step:
    """Step 0: the plan on this layout (a baseline runs plain expert parallelism), validated."""
    placement = _placement(workload, machine)
    static_capacity = plan.capacity_factor if isinstance(plan, StaticBaseline) else None
    c = Plan(r=placement.shards) if isinstance(plan, StaticBaseline) else plan
    r = placement.shards if c.r is None else c.r
    if r not in placement.valid_r():
        raise ValueError(f"plan.r={c.r} is not valid here: r must be one of {placement.valid_r()}")
    kind = c.reroute_kind
    if kind is not None and (placement.sharded or r != 1):
        raise ValueError("rerouting applies to whole experts (num_experts >= world size) with r = 1")
    d = 1 if r == 0 else c.d
    return _Step(cluster, workload, machine, placement, r, d, c.exchange, kind, static_capacity)


def _who_computes(
    step: _Step,
    kept_E: NDArray[np.float64],
    rerouting_plan: Rerouting | None,
    reroute_config: RerouteConfig | None,
) -> _Work:
    """Rows per rank and unit under the plan's ``r`` and rerouting."""
    W, pl, F = step.machine.world_size, step.placement, step.workload.hidden_dim
    reroute: Rerouting | None = None
    units_R: NDArray[np.int64] | None = None
    hidden = F
    if step.r == 0:  # every expert gathered here: this rank's own rows, no exchange
        rows_RU = (kept_E / W)[None, :]
    elif not pl.sharded:
        rows_RU = kept_E.reshape(W, pl.local_experts)
        if step.kind is not None:
            reroute = rerouting_plan or expected_rerouting(
                kept_E, W, shadow=step.kind == "shadow", **reroute_settings(reroute_config)
            )
            units_R = reroute.units_R
            rows_RU = (reroute.rows_R / units_R)[:, None]
    else:
        g = pl.group_size(step.r)
        rows_RU = np.repeat(kept_E / g, pl.shards)[:, None]  # rank p computes 1/g of expert p // S's rows
        hidden = F // step.r
    rows_R = rows_RU.sum(1) if units_R is None else rows_RU[:, 0] * units_R
    # A shadowing rank's own rows stay home.
    received_R = rows_R / W if reroute is None else reroute.received_rows() / max(W - 1, 1)
    if step.r == 0:
        received_R = np.zeros(W)
    return _Work(rows_RU, hidden, units_R, rows_R, received_R, reroute)


def _exchange_and_experts(step: _Step, work: _Work) -> tuple[ExchangeCost, float, float, float]:
    """Step 6: the pipelined exchange and experts; ``(one exchange, exchange s, experts s, overlap saved s)``.

    Per chunk: ``1/d`` of every message and unit.
    """
    workload, machine, d = step.workload, step.machine, step.d
    xchg = exchange_cost(work.received_R / d, step.row_bytes, machine, step.exchange)
    fwd_R, bwd_R = _expert_times(work.rows_RU / d, work.hidden, workload, machine, work.units_R)
    eta = step.cluster.overlap_efficiency
    fwd_s, bwd_s = paced_time(fwd_R, machine), paced_time(bwd_R, machine)
    fwd_pipe, _ = pipeline_time(xchg.time, fwd_s, xchg.time, d, eta)
    exchange_s = 2 * d * xchg.time
    experts_s = d * fwd_s
    pipe_s = fwd_pipe
    if workload.training:
        bwd_pipe, _ = pipeline_time(xchg.time, bwd_s, xchg.time, d, eta)
        exchange_s *= 2
        experts_s += d * bwd_s
        pipe_s += bwd_pipe
    overlap_saved = exchange_s + experts_s - pipe_s
    if workload.training and d > 1:
        # Backward sums each chunk's weight gradients (``_ExchangeExperts.backward``).
        grads_R = work.units_R if work.units_R is not None else (work.rows_RU > 0).sum(1)
        hidden = work.hidden
        unit_params = workload.dim * ((2 * hidden if workload.gated else hidden) + hidden)
        b = workload.bytes_per_element
        experts_s += float(
            stream_time(3.0 * (d - 1) * float(grads_R.max()) * unit_params * b, machine, ops=d - 1)
        )
    return xchg, exchange_s, experts_s, overlap_saved


def _local_stages(step: _Step, local_rows: float) -> tuple[float, float, float, float, float]:
    """Steps 1-3: ``(host, metadata, routing, permute, combine)`` seconds."""
    workload, machine = step.workload, step.machine
    cluster, W = step.cluster, machine.world_size
    E, D, T, K = workload.num_experts, workload.dim, workload.tokens_per_device, workload.top_k
    host = cluster.step_overhead / machine.share
    if step.r != 0:
        host += step.passes * step.d * cluster.chunk_overhead / machine.share
    metadata = 0.0
    if step.static_capacity is None and W > 1:
        metadata = all_gather_time(6 * 8, W, machine, not machine.single_node)
        metadata += all_gather_time(E * K * 8, W, machine, not machine.single_node)
    router_dtype = "fp32" if "fp32" in cluster.device.flops else workload.dtype
    routing = float(gemm_time(T, D, E, 4, machine, router_dtype)) + float(
        stream_time(3.0 * T * E * 4, machine, ops=4)
    )
    permute = float(stream_time(2.0 * local_rows * step.row_bytes, machine))
    combine = float(stream_time(3.0 * local_rows * step.row_bytes + T * step.row_bytes, machine, ops=2))
    if workload.training:
        routing += 2 * float(gemm_time(T, D, E, 4, machine, router_dtype)) + float(
            stream_time(3.0 * T * E * 4, machine, ops=4)
        )
        permute *= 2
        combine *= 2
    return host, metadata, routing, permute, combine


def _weight_gathers(step: _Step) -> tuple[float, float, int, float]:
    """Step 4: ``(seconds, bytes per rank, gather group size, stored expert params per rank)``."""
    workload, machine, pl = step.workload, step.machine, step.placement
    b = workload.bytes_per_element
    stored = (
        pl.local_experts * workload.expert_params if not pl.sharded else workload.expert_params / pl.shards
    )
    group = machine.world_size if step.r == 0 else (pl.group_size(step.r) if pl.sharded else 1)
    seconds = step.passes * _weight_exchange_time(stored, group, b, machine, whole=not pl.sharded)
    return seconds, step.passes * (group - 1) * stored * b, group, stored


def _rerouting_cost(step: _Step, reroute: Rerouting | None) -> tuple[float, int, float]:
    """Step 5: ``(seconds, copies sent, copy bytes on the busiest rank)``."""
    if reroute is None:
        return 0.0, 0, 0.0
    workload, machine = step.workload, step.machine
    expert_bytes = workload.expert_params * workload.bytes_per_element
    planning, per_expert = REROUTE_PLANNING
    seconds = (planning + per_expert * workload.num_experts) / machine.share + step.passes * _copy_time(
        reroute, expert_bytes, machine
    )
    owners = np.bincount(
        reroute.transfers_T2[:, 0] // step.placement.local_experts, minlength=machine.world_size
    )
    copy_bytes = step.passes * float(np.maximum(owners, reroute.copies_R).max()) * expert_bytes
    return seconds, reroute.num_copies, copy_bytes


def _peak_memory(step: _Step, work: _Work, local_rows: float, group: int, stored: float) -> float:
    """Bytes on the fullest rank: weights (own, gathered, copies), activations, exchange buffers."""
    workload, W = step.workload, step.machine.world_size
    b, D, T, passes = workload.bytes_per_element, workload.dim, workload.tokens_per_device, step.passes
    expert_bytes = workload.expert_params * b
    copies_R = work.reroute.copies_R if work.reroute is not None else np.zeros(W)
    H_unit = 2 * work.hidden if workload.gated else work.hidden
    weights = stored * b * passes + (group - 1) * stored * b * passes + copies_R * expert_bytes * passes
    local = (2 * T + 2 * local_rows) * step.row_bytes
    expert_side = work.rows_R * (2 * D + H_unit + work.hidden) * b
    buffers = (
        (local_rows * max(step.r, 1) + work.rows_R) * step.row_bytes * (2 if step.exchange == "2dh" else 1)
    )
    return float(np.max(weights + local + expert_side + (buffers if step.r != 0 else 0.0)))


def simulate(
    cluster: Cluster,
    workload: MoEWorkload,
    load: Load,
    world_size: int,
    plan: Scored,
    *,
    ranks_per_node: int | None = None,
    memory_budget: float | None = None,
    machine: Machine | None = None,
    rerouting_plan: Rerouting | None = None,
    reroute_config: RerouteConfig | None = None,
) -> Prediction:
    """Predict one step of ``workload`` on ``world_size`` ranks of ``cluster`` under ``plan``.

    ``plan``: a ``Plan`` (``r=None`` is the default ``S``; ``reroute`` ``None`` or ``False``:
    no rerouting, ``True``/``"lla"``/``"shadow"``: that kind) or a ``StaticBaseline``.

    ``reroute_config``: the layer's rerouting settings (``alpha``, ``min_chunk`` and the
    hard bounds of ``flexmoe.config.RerouteConfig``; default: its defaults). ``machine``
    and ``rerouting_plan`` may be passed in when scoring many candidates of one
    (cluster, workload, load) to skip recomputing them.
    """
    machine = machine or Machine.create(cluster, world_size, ranks_per_node)
    step = _resolve(plan, cluster, workload, machine)
    kept_E, _, dropped = kept_rows(workload, load, machine.world_size, step.static_capacity)
    local_rows = float(kept_E.sum()) / machine.world_size  # rows each rank permutes and combines
    work = _who_computes(step, kept_E, rerouting_plan, reroute_config)
    xchg, exchange_s, experts_s, overlap_saved = _exchange_and_experts(step, work)
    host, metadata, routing, permute, combine = _local_stages(step, local_rows)
    gather, weight_bytes, group, stored = _weight_gathers(step)
    reroute_s, copies, copy_bytes = _rerouting_cost(step, work.reroute)
    breakdown = Breakdown(
        host=host,
        metadata=metadata,
        routing=routing,
        permute=permute,
        weight_gather=gather,
        rerouting=reroute_s,
        exchange=exchange_s,
        experts=experts_s,
        overlap_saved=overlap_saved,
        combine=combine,
    )
    peak = _peak_memory(step, work, local_rows, group, stored)
    budget = cluster.device.memory_bytes if memory_budget is None else memory_budget
    shorter = min(exchange_s, experts_s)
    return Prediction(
        plan=plan,
        breakdown=breakdown,
        exchange=xchg,
        exchanges_per_step=0
        if step.r == 0
        else 2 * step.d * step.passes * (2 if step.exchange == "2dh" else 1),
        row_bytes=2 * step.d * step.passes * xchg.bytes_out,
        weight_bytes=weight_bytes + copy_bytes,
        peak_memory=peak,
        fits=peak <= budget,
        dropped_fraction=dropped,
        straggler_rows=float(work.rows_R.max()),
        overlap=overlap_saved / shorter if shorter > 0 else 0.0,
        rerouted_copies=copies,
    )
