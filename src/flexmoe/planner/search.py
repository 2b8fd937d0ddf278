"""Scoring every candidate plan, picking the best, and sweeping device counts.

Candidates (``candidates``): every valid ``r`` (0 and the divisors of ``S``),
``d`` in ``degrees``, flat and 2DH exchange, and rerouting off, least-loaded or
shadowing (whole experts only). Baselines (``baselines``): what a non-adaptive system runs — the
default placement (plain EP, or EP+MP for sharded experts), a fixed capacity factor
of 1.0 or 1.25 with padded buffers, no overlap, flat all-to-all.

The best plan is the fastest candidate that fits the memory budget (the fastest
overall, flagged, if none fits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from flexmoe.config import Plan, RerouteConfig
from flexmoe.placement import Placement
from flexmoe.planner.cluster import Cluster
from flexmoe.planner.costmodel import Machine
from flexmoe.planner.prediction import Prediction, Scored, StaticBaseline
from flexmoe.planner.rerouting import Rerouting, expected_rerouting
from flexmoe.planner.simulate import kept_rows, reroute_settings, simulate
from flexmoe.planner.workload import Load, MoEWorkload

__all__ = ["DEGREES", "STATIC_CAPACITIES", "PlanReport", "baselines", "candidates", "plan", "sweep"]

DEGREES = (1, 2, 4, 8)
STATIC_CAPACITIES = (1.0, 1.25)


def candidates(
    workload: MoEWorkload,
    world_size: int,
    degrees: Iterable[int] = DEGREES,
    rerouting: bool = True,
    exchanges: Iterable[str] = ("flat", "2dh"),
) -> list[Plan]:
    """Flexmoe's candidate plans for ``workload`` on ``world_size`` ranks (``r`` and ``reroute`` set)."""
    placement = Placement(world_size, 0, workload.num_experts, workload.hidden_dim, world_size)
    out: list[Plan] = []
    for r in placement.valid_r():
        if r == 0:
            out.append(Plan(r=0, reroute=False))
            continue
        for d in degrees:
            for exchange in exchanges:
                out.append(Plan(r=r, d=d, exchange=exchange, reroute=False))  # type: ignore[arg-type]
                if rerouting and not placement.sharded and world_size > 1:
                    for kind in ("lla", "shadow"):
                        out.append(Plan(r=r, d=d, exchange=exchange, reroute=kind))  # type: ignore[arg-type]
    return out


def baselines() -> list[StaticBaseline]:
    """The static baselines: default placement, fixed capacity 1.0 / 1.25, padded, ``d = 1``, flat."""
    return [StaticBaseline(cf) for cf in STATIC_CAPACITIES]


@dataclass(frozen=True)
class PlanReport:
    """Every candidate's prediction for one (cluster, workload, load, world size).

    Attributes:
        world_size: ``W``.
        load: the routing load's name.
        predictions: flexmoe's candidates, fastest first.
        baselines: the static baselines.
        default: flexmoe's default plan (``r = S``, ``d = 1``, flat, no rerouting) with the
            workload's capacity policy: what the layer runs when nobody tunes it.
    """

    world_size: int
    load: str
    predictions: list[Prediction]
    baselines: list[Prediction]
    default: Prediction

    @property
    def best(self) -> Prediction:
        """The fastest candidate that fits in memory (else the fastest)."""
        fitting = [p for p in self.predictions if p.fits]
        return fitting[0] if fitting else self.predictions[0]

    def speedups(self) -> dict[str, float]:
        """Baseline time over the best plan's time, per baseline label."""
        return {b.plan.label: b.time / self.best.time for b in self.baselines}

    def find(self, label: str) -> Prediction:
        """The prediction of the plan (or baseline) with this label."""
        for p in [*self.predictions, *self.baselines]:
            if p.plan.label == label:
                return p
        raise KeyError(f"no plan labelled {label!r}")


def plan(
    cluster: Cluster,
    workload: MoEWorkload,
    load: Load,
    world_size: int,
    *,
    ranks_per_node: int | None = None,
    memory_budget: float | None = None,
    plans: Sequence[Plan] | None = None,
    degrees: Iterable[int] = DEGREES,
    rerouting: bool = True,
    reroute_config: RerouteConfig | None = None,
) -> PlanReport:
    """Score the candidates (``plans``, default ``candidates(...)``) and the static baselines.

    Rerouting candidates use ``reroute_config`` (the layer's settings, default its
    defaults); when its bounds cannot hold the step they are left out, as the layer
    then runs plain expert parallelism.
    """
    machine = Machine.create(cluster, world_size, ranks_per_node)
    chosen = list(plans) if plans is not None else candidates(workload, world_size, degrees, rerouting)
    reroute: dict[str, Rerouting] = {}  # by kind
    for kind in ("lla", "shadow"):
        if any(c.reroute_kind == kind for c in chosen):
            kept_E, _, _ = kept_rows(workload, load, world_size, None)
            try:
                reroute[kind] = expected_rerouting(
                    kept_E, world_size, shadow=kind == "shadow", **reroute_settings(reroute_config)
                )
            except ValueError:
                chosen = [c for c in chosen if c.reroute_kind != kind]

    def run(c: Scored) -> Prediction:
        kind = c.reroute_kind
        return simulate(
            cluster,
            workload,
            load,
            world_size,
            c,
            memory_budget=memory_budget,
            machine=machine,
            rerouting_plan=None if kind is None else reroute[kind],
            reroute_config=reroute_config,
        )

    predictions = sorted((run(c) for c in chosen), key=lambda p: p.time)
    placement = Placement(world_size, 0, workload.num_experts, workload.hidden_dim, world_size)
    default = run(Plan(r=placement.shards, reroute=False))
    return PlanReport(world_size, load.name, predictions, [run(c) for c in baselines()], default)


def sweep(
    cluster: Cluster,
    workload: MoEWorkload,
    load: Load | Callable[[int], Load],
    device_counts: Sequence[int],
    *,
    experts_per_device: float | None = None,
    memory_budget: float | None = None,
    reroute_config: RerouteConfig | None = None,
) -> list[PlanReport]:
    """``plan`` at each device count.

    ``experts_per_device`` scales the expert count with the devices (``E = that * W``;
    1 for a GShard-style layer with one expert per device); ``load`` is then a
    function of ``E`` (such as ``lambda E: Load.zipf(E, 1.2)``). Otherwise the
    workload is used as it is and ``load`` may be a ``Load``.
    """
    reports = []
    for W in device_counts:
        wl = workload
        if experts_per_device is not None:
            wl = replace(workload, num_experts=max(1, round(experts_per_device * W)))
        step_load = load(wl.num_experts) if callable(load) else load
        reports.append(
            plan(cluster, wl, step_load, W, memory_budget=memory_budget, reroute_config=reroute_config)
        )
    return reports
