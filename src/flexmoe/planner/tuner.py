"""The online plan tuner's decisions (``plan="auto"``).

``Tuner`` picks ``r``, ``d``, the exchange and rerouting for every call of a layer whose
plan is ``"auto"``:

1. the step's load goes into a bucket: ``log2`` of the busiest rank's rows over the
   mean (whole experts; per expert when experts are sharded), in steps of
   ``TunerConfig.bucket_width``, and ``log2`` of the rows in steps of 0.5 (plus the
   call's ``top_k``, capacity factor, dtype and whether it trains);
2. a bucket seen for the first time is searched: every valid plan is scored with
   the cost model, and the ``measure_top`` best, plus plain expert parallelism (so the
   winner is never measurably slower than it) and, when the busiest rank has at least
   ``RerouteConfig.threshold`` times the mean rows, the best plan of each rerouting
   kind (so that a mis-ranked family is still tried), each run ``measure_steps``
   calls; the first call of each is a warm-up, the median of the rest is its time;
3. the fastest measured plan becomes the bucket's winner — among plans measured
   within the noise of the fastest (the largest relative spread of one plan's
   samples, between 2 % and 5 %), the one the model predicts fastest — and later
   calls in the bucket use it without searching;
4. a winner's time is then watched over windows of 5 calls: the first window's median
   becomes its reference (a search times back-to-back calls of one plan, faster than
   steady state; only a window more than ``2 * drift`` off the time it won with
   re-tunes here), and a later window whose median moves more than ``drift`` from the
   reference is searched again (the machine or the workload changed under it); a load
   that moves to another bucket reuses or searches that bucket.

The tuner is deterministic: fed the same counts and measured times (the layer reduces
them to the slowest rank), every rank takes the same decisions without communicating.
Every decision is returned as a ``TunerDecision`` (``layer.stats.tuner``) and logged (at
INFO when a bucket gets its winner, DEBUG per call) on the ``flexmoe.planner.tuner`` logger.

Legend: W ranks, E experts, El = E/W experts per rank, S = W/E shards per expert.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from flexmoe.config import Plan, RerouteConfig, TunerConfig
from flexmoe.planner.layer_cost import CostModel

__all__ = ["Tuner", "TunerDecision", "candidates_for"]

log = logging.getLogger(__name__)


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
    queue: list[Plan]
    predicted: dict[Plan, float]
    samples: dict[Plan, list[float]] = field(default_factory=dict)

    def next(self, steps: int) -> Plan | None:
        for c in self.queue:
            if len(self.samples.get(c, [])) < steps:
                return c
        return None


@dataclass
class _Winner:
    candidate: Plan
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
        candidates: list[Plan],
        plain: Plan,
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
        self._last: tuple[tuple[Any, ...], Plan] | None = None

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
            for rerouting in ("lla", "shadow"):
                kind = [c for c in ranked if c.reroute_kind == rerouting]
                if kind and not any(c.reroute_kind == rerouting for c in queue):
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

        def predict(c: Plan) -> float:
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
            plan=candidate,
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
) -> tuple[list[Plan], Plan]:
    """The plans the tuner considers, and plain expert parallelism (``r = S, d = 1``, flat)."""
    exchanges = ("flat", "2dh") if multi_node else ("flat",)
    out: list[Plan] = []
    for r in valid_r:
        for d in config.pipelining if r != 0 else (1,):
            for exchange in exchanges if r != 0 else ("flat",):
                out.append(Plan(r=r, d=d, exchange=exchange, reroute=False))  # type: ignore[arg-type]
                if reroute.enabled and not sharded and r == 1:
                    for kind in reroute.kinds:
                        out.append(Plan(r=r, d=d, exchange=exchange, reroute=kind))  # type: ignore[arg-type]
    plain = Plan(r=shards, d=1, exchange="flat", reroute=False)
    if plain not in out:
        out.insert(0, plain)
    return out, plain
