"""Replaying routing traces as synthetic load: in a real layer, and in the simulator.

- ``expert_ids_from_counts(counts, top_k)``: expert ids ``[T, K]`` (``K`` distinct
  experts per token) whose per-expert counts are exactly ``counts``, such as one
  recorded step of a trace.
- ``force_routing(layer, expert_ids_TK)``: a context manager under which an
  ``MoELayer`` routes its tokens to those experts. The layer runs as usual from the
  router on (capacity, dispatch, experts, combine, stats, losses); the routing
  weights are the router's own scores of the forced experts (renormalised and scaled
  as its ``RouterConfig`` says), so they stay differentiable.
- ``simulate_trace(cluster, workload, trace, world_size)``: the simulator's predicted
  step time of every plan for each recorded step of one layer, with median and p90
  over the steps and the per-step best (what a runtime that re-plans every step
  would get); ``flexmoe plan --load trace:PATH[:LAYER] --per-step`` prints it.

Legend: T tokens, E experts, K top-k, S recorded steps, P plans.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flexmoe.config import Plan, RerouteConfig
from flexmoe.planner.cluster import Cluster
from flexmoe.planner.prediction import Prediction, Scored, StaticBaseline
from flexmoe.planner.search import DEGREES, baselines, candidates, plan
from flexmoe.planner.trace import RoutingTrace, TraceRecord
from flexmoe.planner.workload import Load, MoEWorkload

__all__ = [
    "TraceSimulation",
    "format_trace_simulation",
    "simulate_trace",
]


@dataclass(frozen=True)
class TraceSimulation:
    """Predicted step times of each plan for each recorded step of one layer.

    Attributes:
        layer: the trace's layer.
        steps: the recorded step numbers ``[S]``.
        plans: flexmoe's candidates, then the static baselines ``[P]``.
        times_SP: predicted seconds per step and plan.
        fits_SP: whether the plan fits the memory budget in that step.
        load_max_over_mean_S: the hottest expert's count over the mean, per step.
    """

    layer: str
    steps: list[int]
    plans: list[Scored]
    times_SP: NDArray[np.float64]
    fits_SP: NDArray[np.bool_]
    load_max_over_mean_S: NDArray[np.float64]

    def times(self, label: str) -> NDArray[np.float64]:
        """Per-step times of the plan with this label."""
        for p, scored in enumerate(self.plans):
            if scored.label == label:
                column: NDArray[np.float64] = self.times_SP[:, p]
                return column
        raise KeyError(f"no plan labelled {label!r}")

    @property
    def per_step_best_S(self) -> NDArray[np.float64]:
        """Each step's fastest fitting flexmoe plan (a runtime re-planning every step)."""
        adaptive = np.array([isinstance(c, Plan) for c in self.plans])
        times = np.where(self.fits_SP & adaptive, self.times_SP, np.inf)
        best: NDArray[np.float64] = times.min(axis=1)
        return np.where(np.isfinite(best), best, self.times_SP[:, adaptive].min(axis=1))

    def summary(self) -> list[dict[str, Any]]:
        """One row per plan (fastest median first, baselines last), then ``per-step best``."""
        best_S = self.per_step_best_S
        rows = []
        for p, scored in enumerate(self.plans):
            times = self.times_SP[:, p]
            static = isinstance(scored, StaticBaseline)
            rows.append(
                {
                    "plan": scored.label,
                    "static": static,
                    "median_s": float(np.median(times)),
                    "p90_s": float(np.percentile(times, 90)),
                    "max_s": float(times.max()),
                    "mean_s": float(times.mean()),
                    "best_steps": 0 if static else int(np.sum(times <= best_S * (1 + 1e-12))),
                    "fits": bool(self.fits_SP[:, p].all()),
                }
            )
        rows.sort(key=lambda r: (r["static"], r["median_s"]))
        rows.append(
            {
                "plan": "per-step best",
                "static": False,
                "median_s": float(np.median(best_S)),
                "p90_s": float(np.percentile(best_S, 90)),
                "max_s": float(best_S.max()),
                "mean_s": float(best_S.mean()),
                "best_steps": len(self.steps),
                "fits": True,
            }
        )
        return rows


def simulate_trace(
    cluster: Cluster,
    workload: MoEWorkload,
    trace: RoutingTrace,
    world_size: int,
    *,
    layer: str | None = None,
    plans: Sequence[Plan] | None = None,
    ranks_per_node: int | None = None,
    memory_budget: float | None = None,
    degrees: Iterable[int] = DEGREES,
    rerouting: bool = True,
    reroute_config: RerouteConfig | None = None,
) -> TraceSimulation:
    """Predict every plan (``plans``, default all candidates) and baseline for each step of ``layer``.

    Each step's counts become a ``Load`` (``Load.from_counts``): the trace gives the
    shape of the load, step by step; ``workload`` gives its size (tokens per device),
    as with ``--load trace:PATH``; a step recorded with a per-token number of experts
    (``experts_per_token``) routes its mean experts per token. A rerouting candidate
    whose bounds cannot hold a step runs, as the layer does, plain expert parallelism
    in that step.
    """
    if trace.num_experts != workload.num_experts:
        raise ValueError(f"trace has num_experts={trace.num_experts}, the workload {workload.num_experts}")
    records = trace.steps(layer)
    chosen = list(plans) if plans is not None else candidates(workload, world_size, degrees, rerouting)
    adaptive = list(chosen)
    scored: list[Scored] = [*chosen, *baselines()]
    S, P = len(records), len(scored)
    times_SP = np.zeros((S, P))
    fits_SP = np.zeros((S, P), dtype=bool)
    load_S = np.zeros(S)
    for s, record in enumerate(records):
        load = Load.from_counts(record.counts, name=f"step {record.step}")
        load_S[s] = load.max_over_mean
        report = plan(
            cluster,
            _step_workload(workload, record),
            load,
            world_size,
            ranks_per_node=ranks_per_node,
            memory_budget=memory_budget,
            plans=adaptive,
            reroute_config=reroute_config,
        )
        found: dict[Scored, Prediction] = {p.plan: p for p in [*report.predictions, *report.baselines]}
        for p, option in enumerate(scored):
            prediction = found.get(option)
            if prediction is None and isinstance(option, Plan):  # rerouting dropped: the plain twin
                prediction = found.get(replace(option, reroute=False))
            if prediction is None:  # a rerouting candidate dropped without its plain twin
                times_SP[s, p], fits_SP[s, p] = math.inf, False
                continue
            times_SP[s, p], fits_SP[s, p] = prediction.time, prediction.fits
    return TraceSimulation(records[0].layer, [r.step for r in records], scored, times_SP, fits_SP, load_S)


def _step_workload(workload: MoEWorkload, record: TraceRecord) -> MoEWorkload:
    """``workload`` with the step's mean routed experts per token, when it recorded one."""
    if record.experts_per_token is None or record.tokens == 0:
        return workload
    mean = min(float(workload.top_k), record.mean_experts_per_token)
    if mean <= 0 or mean == workload.top_k:
        return workload
    return replace(workload, experts_per_token=mean)


def format_trace_simulation(simulation: TraceSimulation, top: int = 12) -> str:
    """A table of each plan's median, p90 and max predicted step time over the trace's steps."""
    load = simulation.load_max_over_mean_S
    rows = simulation.summary()
    adaptive = [r for r in rows if not r["static"] and r["plan"] != "per-step best"]
    static = [r for r in rows if r["static"]]
    best = rows[-1]
    header = f"{'plan':24s} {'median ms':>10s} {'p90 ms':>10s} {'max ms':>10s} {'best in':>12s}"

    def line(r: dict[str, Any]) -> str:
        steps = "" if r["static"] else f"{r['best_steps']}/{len(simulation.steps)} steps"
        oom = "" if r["fits"] else " OOM"
        text = (
            f"{r['plan']:24s} {r['median_s'] * 1e3:10.2f} {r['p90_s'] * 1e3:10.2f} "
            f"{r['max_s'] * 1e3:10.2f} {steps:>12s}{oom}"
        )
        return text.rstrip()

    lines = [
        f"layer {simulation.layer}: {len(simulation.steps)} steps (steps {simulation.steps[0]}-"
        f"{simulation.steps[-1]}), load max/mean median {np.median(load):.2f}, p90 "
        f"{np.percentile(load, 90):.2f}, max {load.max():.2f}",
        "",
        header,
        "-" * len(header),
        *[line(r) for r in adaptive[:top]],
    ]
    if len(adaptive) > top:
        lines.append(f"... {len(adaptive) - top} more candidates")
    lines += [line(best), "baselines (fixed capacity, padded, d=1, flat):", *[line(r) for r in static]]
    fixed = adaptive[0]
    lines.append(
        f"best fixed plan {fixed['plan']}: median {fixed['median_s'] * 1e3:.2f} ms; re-planning every step: "
        f"median {best['median_s'] * 1e3:.2f} ms ({fixed['median_s'] / best['median_s']:.2f}x)"
    )
    return "\n".join(lines)
