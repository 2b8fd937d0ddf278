"""The layer's cost model and its online plan tuner (``plan="auto"``).

One cost model serves every decision a distributed layer makes about its plan: the
planner's simulator (``flexmoe.planner.simulate``) on a ``Cluster`` that describes the
machine — the file ``flexmoe calibrate`` writes, a preset, or, with neither, a rough
model of the device (with a warning). ``CostModel`` scores a candidate plan on this
step's exact per-expert counts.

``Tuner`` picks ``r``, ``d``, the exchange and rerouting for every call of a layer whose
plan is ``"auto"``:

1. the step's load goes into a bucket: ``log2`` of the busiest rank's rows over the
   mean (whole experts; per expert when experts are sharded), in steps of
   ``TunerConfig.bucket_width``, and ``log2`` of the rows in steps of 0.5 (plus the
   call's ``top_k``, capacity factor, dtype and whether it trains);
2. a bucket seen for the first time is searched: every valid candidate is scored with
   the cost model, and the ``measure_top`` best, plus plain expert parallelism (so the
   winner is never measurably slower than it) and, when the busiest rank has at least
   ``RerouteConfig.threshold`` times the mean rows, the best plan of each rerouting
   kind (so that a mis-ranked family is still tried), each run ``measure_steps``
   calls; the first call of each is a warm-up, the median of the rest is its time;
3. the fastest measured candidate becomes the bucket's winner — among candidates
   measured within the noise of the fastest (the largest relative spread of one
   candidate's samples, between 2 % and 5 %), the one the model predicts fastest —
   and later calls in the bucket use it without searching;
4. a winner's time is then watched over windows of 5 calls: the first window's median
   becomes its reference (a search times back-to-back calls of one plan, faster than
   steady state; only a window more than ``2 * drift`` off the time it won with
   re-tunes here), and a later window whose median moves more than ``drift`` from the
   reference is searched again (the machine or the workload changed under it); a load
   that moves to another bucket reuses or searches that bucket.

Measured times are this layer's forward plus backward on each rank (``Stopwatch``),
reduced to the slowest rank through the next call's header all-gather, so every rank
feeds the same numbers to the same deterministic tuner and all take the same decision
without another collective. Every decision is in ``layer.stats.tuner`` and logged (at
INFO when a bucket gets its winner, DEBUG per call) on the ``flexmoe.tuner`` logger.

Legend: W ranks, E experts, El = E/W experts per rank, S = W/E shards per expert.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from flexmoe.config import GATED_ACTIVATIONS, MoEConfig, Plan, RerouteConfig, TunerConfig

if TYPE_CHECKING:
    from flexmoe.parallel.expert_parallel import ExpertParallel
    from flexmoe.planner.cluster import Cluster
    from flexmoe.planner.rerouting import Rerouting
    from flexmoe.planner.simulate import Candidate

__all__ = ["CostModel", "Stopwatch", "Tuner", "TunerDecision", "resolve_cluster", "rough_cluster"]

log = logging.getLogger("flexmoe.tuner")

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- cluster
def rough_cluster(device: torch.device) -> Cluster:
    """A rough description of ``device`` for when nothing was calibrated.

    CPU: one dense GEMM and one copy, timed here (a fraction of a second), and gloo on
    one machine for the links; CUDA: the H100 preset. Good enough to rank plans, not to
    predict times: the tuner measures its best candidates anyway.
    """
    from flexmoe.planner.cluster import Cluster, DeviceSpec, LinkSpec, load_cluster

    if device.type == "cuda":
        return load_cluster("h100-80gb-ndr400")
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    big = torch.empty(1 << 22)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(4):
        a @ b
    flops = 4 * 2 * 256 * 512 * 512 / max(time.perf_counter() - start, 1e-9)
    start = time.perf_counter()
    for _ in range(4):
        big.clone()
    stream = 4 * 2 * big.numel() * 4 / max(time.perf_counter() - start, 1e-9)
    link = LinkSpec(bandwidth=1e9, latency=2e-4)
    return Cluster(
        name="rough model of this CPU (run `flexmoe calibrate` for a measured one)",
        device=DeviceSpec(
            name="CPU core",
            flops={"fp32": flops, "bf16": flops / 4},
            gemm_efficiency=0.8,
            memory_bandwidth=stream,
            memory_efficiency=1.0,
            memory_bytes=float(16 << 30),
            op_overhead=5e-6,
            elementwise_rate=1e9,
        ),
        devices_per_node=64,
        intra_node=link,
        inter_node=link,
        compute_slots_per_node=torch.get_num_threads(),
        overlap_efficiency=0.0,
        collective_overhead=2e-4,
        step_overhead=5e-3,
    )


def resolve_cluster(spec: str | None, device: torch.device) -> Cluster:
    """``TunerConfig.cluster`` as a ``Cluster`` (see there); warns when it falls back to a rough model."""
    from flexmoe.planner.calibrate import default_calibration_path
    from flexmoe.planner.cluster import load_cluster

    if spec is not None:
        return load_cluster(spec)
    if default_calibration_path().exists():
        return load_cluster("this-machine")
    warnings.warn(
        "flexmoe: no calibration of this machine (run `flexmoe calibrate`); the layer's cost model "
        "uses a rough description of the device",
        stacklevel=3,
    )
    return rough_cluster(device)


def _agree(ep: ExpertParallel, cluster: Cluster) -> Cluster:
    """The first rank's cluster, on every rank (decisions must not depend on local files)."""
    from flexmoe.planner.cluster import Cluster

    source = dist.get_process_group_ranks(ep.comm.group)[0]
    box: list[Any] = [cluster.to_dict()]

    def send() -> None:
        dist.broadcast_object_list(box, source, group=ep.comm.group)

    ep.comm.run(send, "cost model broadcast")
    return Cluster.from_dict(box[0])


# -------------------------------------------------------------------------- cost model
class CostModel:
    """Predicted seconds of one call of a layer under a candidate plan, on this step's counts."""

    def __init__(
        self,
        cluster: Cluster,
        config: MoEConfig,
        world_size: int,
        ranks_per_node: int,
    ) -> None:
        from flexmoe.planner.costmodel import Machine

        self.cluster = cluster
        self.config = config
        self.world_size = world_size
        self.ranks_per_node = ranks_per_node
        self.machine = Machine.create(cluster, world_size, ranks_per_node)

    def predict(
        self,
        candidate: Candidate,
        counts_E: list[int],
        tokens: int,
        top_k: int,
        capacity_factor: float,
        training: bool,
        dtype: torch.dtype,
        reroute: RerouteConfig | None = None,
        rerouting_plan: Rerouting | None = None,
    ) -> float:
        """Seconds of the call (forward, plus backward when ``training``) under ``candidate``.

        ``counts_E``: the step's routed assignments per expert over all ranks; ``tokens``:
        the global batch. ``rerouting_plan``: the step's actual rerouting (the layer's plan,
        ``flexmoe.planner.rerouting.summarize``) instead of one planned from the counts.
        """
        from flexmoe.planner.simulate import simulate
        from flexmoe.planner.workload import Load, MoEWorkload

        cfg = self.config
        W = self.world_size
        workload = MoEWorkload(
            dim=cfg.dim,
            hidden_dim=cfg.hidden_dim,
            num_experts=cfg.num_experts,
            top_k=top_k,
            gated=cfg.experts.activation in GATED_ACTIVATIONS,
            dtype=_DTYPES.get(dtype, "fp32"),
            tokens_per_device=max(1, round(tokens / W)),
            capacity_factor=capacity_factor,
            training=training,
        )
        load = Load.from_counts(counts_E) if sum(counts_E) > 0 else Load.uniform(cfg.num_experts)
        prediction = simulate(
            self.cluster,
            workload,
            load,
            W,
            candidate,
            machine=self.machine,
            reroute_config=reroute or cfg.reroute,
            rerouting_plan=rerouting_plan,
        )
        return prediction.time


# --------------------------------------------------------------------------- stopwatch
class _Mark(torch.autograd.Function):
    """Identity whose backward notes the time (the layer's backward passes it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, watch: Stopwatch, which: int) -> Tensor:
        ctx.watch, ctx.which = watch, which
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.watch.mark(ctx.which)
        return grad, None, None


class Stopwatch:
    """A layer's forward and backward time on this rank, read at the next call.

    Four marks: forward start and end (in ``forward``), backward start (the output's
    gradient arrives) and end (the input's gradient leaves; only when the input
    requires grad, else the sample is the forward alone). CPU: wall clock; CUDA: events
    on the current stream, read (waiting for them) at the next call.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = [None] * 4

    def mark(self, which: int) -> None:
        """Note mark ``which`` (0 forward start, 1 forward end, 2 backward start, 3 backward end)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[which] = event
        else:
            self._marks[which] = time.perf_counter()

    def start(self, x: Tensor) -> Tensor:
        """Forward start; returns ``x`` marked for the backward's end."""
        self._marks = [None] * 4
        self.mark(0)
        return _Mark.apply(x, self, 3) if x.requires_grad else x

    def stop(self, y: Tensor) -> Tensor:
        """Forward end; returns ``y`` marked for the backward's start."""
        self.mark(1)
        return _Mark.apply(y, self, 2) if y.requires_grad else y

    def _between(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return float(a.elapsed_time(b)) / 1e3
        return float(b - a)

    def read(self) -> float:
        """Seconds of the last call (0.0 when none finished)."""
        m = self._marks
        if m[0] is None or m[1] is None:
            return 0.0
        seconds = self._between(m[0], m[1])
        if m[2] is not None and m[3] is not None:
            seconds += self._between(m[2], m[3])
        return seconds


# ------------------------------------------------------------------------------- tuner
@dataclass(frozen=True)
class TunerDecision:
    """What the tuner did for one call (``layer.stats.tuner``).

    Attributes:
        bucket: the load bucket (see the module docstring).
        phase: ``"search"`` (measuring a candidate), ``"tuned"`` (the bucket's winner),
            ``"retune"`` (drift detected; this call starts a new search).
        plan: the plan this call runs.
        predicted_s: the cost model's time for it on this step's counts.
        previous_s: the previous call's measured time (slowest rank; 0 if none).
        imbalance: the busiest rank's rows over the mean, this step.
        scores: during a search: ``(candidate label, predicted s, measured s or None)`` of
            every measured candidate so far; else empty.
    """

    bucket: tuple[Any, ...]
    phase: str
    plan: Plan
    predicted_s: float
    previous_s: float
    imbalance: float
    scores: tuple[tuple[str, float, float | None], ...] = ()


@dataclass
class _Search:
    queue: list[Candidate]
    predicted: dict[Candidate, float]
    samples: dict[Candidate, list[float]] = field(default_factory=dict)

    def next(self, steps: int) -> Candidate | None:
        for c in self.queue:
            if len(self.samples.get(c, [])) < steps:
                return c
        return None


@dataclass
class _Winner:
    candidate: Candidate
    measured: float
    predicted: float
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    baseline: float | None = None  # median of the first full window of ``recent``


# Measured times closer than this (relative) are a tie that the model breaks (when its
# predictions differ by more than this too; else the measured fastest wins): at least
# NOISE_FLOOR, at most NOISE_CAP, else the largest relative spread of one candidate's samples.
NOISE_FLOOR, NOISE_CAP = 0.02, 0.05


def _spread(samples: dict[Any, list[float]]) -> float:
    spreads = [
        (max(kept) - min(kept)) / statistics.median(kept)
        for kept in (v[1:] if len(v) > 1 else v for v in samples.values())
        if kept and statistics.median(kept) > 0
    ]
    return max(spreads, default=0.0)


def _median_after_warmup(samples: list[float]) -> float:
    kept = samples[1:] if len(samples) > 1 else samples
    return statistics.median(kept)


class Tuner:
    """The online plan tuner of one layer (see the module docstring)."""

    def __init__(
        self,
        cost: CostModel,
        config: TunerConfig,
        candidates: list[Candidate],
        plain: Candidate,
        experts_per_rank: int,
        reroute_threshold: float = 1.3,
    ) -> None:
        if plain not in candidates:
            raise ValueError(f"plain expert parallelism {plain} must be among the candidates")
        self.cost = cost
        self.config = config
        self.candidates = candidates
        self.plain = plain
        self.experts_per_rank = experts_per_rank
        self.reroute_threshold = reroute_threshold
        self.winners: dict[tuple[Any, ...], _Winner] = {}
        self.searches: dict[tuple[Any, ...], _Search] = {}
        self._last: tuple[tuple[Any, ...], Candidate] | None = None

    def imbalance(self, counts_E: list[int]) -> float:
        """Busiest rank's rows over the mean (whole experts), or busiest expert's over the mean."""
        El = self.experts_per_rank
        units = [sum(counts_E[i : i + El]) for i in range(0, len(counts_E), El)] if El else list(counts_E)
        total = sum(units)
        return max(units) * len(units) / total if total else 1.0

    def bucket(
        self, counts_E: list[int], top_k: int, capacity_factor: float, training: bool, dtype: torch.dtype
    ) -> tuple[Any, ...]:
        """The load bucket of a call (see the module docstring)."""
        rows = max(1, sum(counts_E))
        return (
            round(math.log2(self.imbalance(counts_E)) / self.config.bucket_width),
            round(2 * math.log2(rows)),
            top_k,
            float(capacity_factor),
            training,
            str(dtype),
        )

    def _feed(self, seconds: float) -> str | None:
        """Attribute the previous call's time to what it ran; returns ``"retune"`` on drift."""
        if self._last is None or seconds <= 0:
            return None
        key, candidate = self._last
        search = self.searches.get(key)
        if search is not None and candidate in search.predicted:
            search.samples.setdefault(candidate, []).append(seconds)
            return None
        winner = self.winners.get(key)
        if winner is None or winner.candidate != candidate:
            return None
        winner.recent.append(seconds)
        if len(winner.recent) == winner.recent.maxlen:
            now = statistics.median(winner.recent)
            drift = self.config.drift
            if winner.baseline is None:
                # The first window after winning becomes the reference: a search measures
                # back-to-back calls of one plan (and keeps the fastest candidate), which
                # runs faster than steady state; only a gross mismatch re-tunes here.
                reference, tolerance = winner.measured, 2 * drift
                if abs(now - reference) <= tolerance * reference:
                    winner.baseline = now
                    return None
            else:
                reference, tolerance = winner.baseline, drift
                if abs(now - reference) <= tolerance * reference:
                    return None
            log.info(
                "re-tuning bucket %s: %s now takes %.2f ms (reference %.2f ms, won with %.2f ms)",
                key,
                candidate.label,
                1e3 * now,
                1e3 * reference,
                1e3 * winner.measured,
            )
            del self.winners[key]
            return "retune"
        return None

    def _start_search(self, key: tuple[Any, ...], predict: Any, imbalance: float) -> _Search:
        predicted = {c: predict(c) for c in self.candidates}
        ranked = sorted(self.candidates, key=lambda c: (predicted[c], self.candidates.index(c)))
        queue = ranked[: self.config.measure_top]
        if self.plain not in queue:
            queue.append(self.plain)
        # Skewed load: measure the best plan of each rerouting kind too, whatever the model
        # says (the model ranks, measurements decide; a mis-ranked family would never be tried).
        if imbalance >= self.reroute_threshold:
            for shadow in (False, True):
                kind = [c for c in ranked if c.rerouting and c.shadow == shadow]
                if kind and not any(c.rerouting and c.shadow == shadow for c in queue):
                    queue.append(kind[0])
        search = _Search(queue=queue, predicted={c: predicted[c] for c in queue})
        self.searches[key] = search
        return search

    def choose(
        self,
        counts_E: list[int],
        tokens: int,
        top_k: int,
        capacity_factor: float,
        training: bool,
        dtype: torch.dtype,
        previous_s: float,
    ) -> TunerDecision:
        """The plan of this call; ``previous_s``: the previous call's time (slowest rank)."""
        phase = self._feed(previous_s) or "tuned"
        key = self.bucket(counts_E, top_k, capacity_factor, training, dtype)

        def predict(c: Candidate) -> float:
            return self.cost.predict(c, counts_E, tokens, top_k, capacity_factor, training, dtype)

        winner = self.winners.get(key)
        scores: tuple[tuple[str, float, float | None], ...] = ()
        if winner is not None:
            candidate = winner.candidate
        else:
            search = self.searches.get(key) or self._start_search(key, predict, self.imbalance(counts_E))
            steps = self.config.measure_steps
            choice = search.next(steps)
            if choice is None:  # every queued candidate measured: the fastest wins ...
                times = {c: _median_after_warmup(search.samples[c]) for c in search.queue}
                fastest = min(times.values())
                # ... unless others measured within the noise: then the model breaks the tie.
                noise = min(NOISE_CAP, max(NOISE_FLOOR, _spread(search.samples)))
                close = [c for c in search.queue if times[c] <= fastest * (1.0 + noise)]
                # ... when it predicts a clear difference; a tie in both: the measured fastest.
                favoured = min(search.predicted[c] for c in close) * (1.0 + noise)
                close = [c for c in close if search.predicted[c] <= favoured]
                best = min(close, key=lambda c: (times[c], search.queue.index(c)))
                self.winners[key] = _Winner(best, times[best], search.predicted[best])
                del self.searches[key]
                log.info(
                    "bucket %s: %s wins (%s)",
                    key,
                    best.label,
                    ", ".join(
                        f"{c.label}: measured {1e3 * times[c]:.2f} ms, "
                        f"predicted {1e3 * search.predicted[c]:.2f} ms"
                        for c in search.queue
                    ),
                )
                candidate = best
            else:
                candidate = choice
                phase = "search" if phase != "retune" else phase
                scores = tuple(
                    (
                        c.label,
                        search.predicted[c],
                        _median_after_warmup(search.samples[c]) if search.samples.get(c) else None,
                    )
                    for c in search.queue
                )
        self._last = (key, candidate)
        decision = TunerDecision(
            bucket=key,
            phase=phase,
            plan=dataclasses.replace(candidate.to_plan(), reroute=candidate.reroute_kind),
            predicted_s=predict(candidate),
            previous_s=previous_s,
            imbalance=self.imbalance(counts_E),
            scores=scores,
        )
        log.debug("call plan %s (%s), predicted %.2f ms", candidate.label, phase, 1e3 * decision.predicted_s)
        return decision


def candidates_for(
    valid_r: list[int],
    shards: int,
    sharded: bool,
    multi_node: bool,
    config: TunerConfig,
    reroute: RerouteConfig,
) -> tuple[list[Candidate], Candidate]:
    """The plans the tuner considers, and plain expert parallelism (``r = S, d = 1``, flat)."""
    from flexmoe.planner.simulate import Candidate

    exchanges = ("flat", "2dh") if multi_node else ("flat",)
    out: list[Candidate] = []
    for r in valid_r:
        for d in config.pipelining if r != 0 else (1,):
            for exchange in exchanges if r != 0 else ("flat",):
                out.append(Candidate(r=r, d=d, exchange=exchange))
                if reroute.enabled and not sharded and r == 1:
                    for kind in reroute.kinds:
                        out.append(
                            Candidate(r=r, d=d, exchange=exchange, rerouting=True, shadow=kind == "shadow")
                        )
    plain = Candidate(r=shards, d=1, exchange="flat")
    if plain not in out:
        out.insert(0, plain)
    return out, plain


def build_tuner(ep: ExpertParallel, config: MoEConfig, device: torch.device) -> Tuner:
    """The layer's tuner (collective: every rank of the group calls it in the same call)."""
    cost = cost_model(ep, config, device)
    placement = ep.placement
    multi_node = placement.ranks_per_node < placement.world_size
    candidates, plain = candidates_for(
        placement.valid_r(), placement.shards, placement.sharded, multi_node, config.tuner, config.reroute
    )
    El = 0 if placement.sharded else placement.local_experts
    return Tuner(cost, config.tuner, candidates, plain, El, config.reroute.threshold)


def cost_model(ep: ExpertParallel, config: MoEConfig, device: torch.device) -> CostModel:
    """The layer's cost model (collective: the first rank's cluster is broadcast)."""
    cluster = _agree(ep, resolve_cluster(config.tuner.cluster, device))
    placement = ep.placement
    return CostModel(cluster, config, placement.world_size, placement.ranks_per_node)
