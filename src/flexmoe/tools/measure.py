"""Measured step times of flexmoe's plans on local gloo workers, for checking the cost model.

The same cases as ``benchmarks/parallel.py`` (one MoE layer over ``W`` processes,
every plan with ``r`` valid, ``d`` in {1, 2, 4}, flat and 2DH), measured for the
planner: plans are timed round-robin (so a change in the machine's load hits all
alike), each round's time is the slowest rank's forward + backward, and the result
per plan is the median over rounds. The routed counts of the step are returned too,
so that the simulator can be given the load the layer really saw.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from flexmoe.config import Plan
from flexmoe.layer import MoELayer
from flexmoe.parallel import all_reduce_mean
from flexmoe.parallel.comm import all_to_all
from flexmoe.planner.cluster import Cluster
from flexmoe.planner.workload import MoEWorkload
from flexmoe.tools.calibrate import Probes, cluster_from_samples
from flexmoe.tools.local import run_local

__all__ = ["BenchCase", "MeasuredPlan", "benchmark_plans", "measure_plans"]


@dataclass(frozen=True, kw_only=True)
class BenchCase:
    """One layer on ``world`` local processes (defaults: ``benchmarks/parallel.py``'s)."""

    world: int
    experts: int = 8
    tokens: int = 512
    dim: int = 256
    hidden: int = 512
    top_k: int = 2
    ranks_per_node: int = 2
    seed: int = 0

    def workload(self) -> MoEWorkload:
        """The planner's description of this layer (SwiGLU, fp32, dropless)."""
        return MoEWorkload(
            dim=self.dim,
            hidden_dim=self.hidden,
            num_experts=self.experts,
            top_k=self.top_k,
            gated=True,
            dtype="fp32",
            tokens_per_device=self.tokens,
            capacity_factor=0.0,
        )


@dataclass(frozen=True)
class MeasuredPlan:
    """A plan's measured step: per-round times (slowest rank) and their median."""

    plan: Plan
    times: tuple[float, ...]
    routed_per_expert: tuple[int, ...]

    @property
    def median(self) -> float:
        """Median seconds per step."""
        return statistics.median(self.times)


def benchmark_plans(valid_r: list[int], degrees: tuple[int, ...] = (1, 2, 4)) -> list[Plan]:
    """The benchmark's plans: ``r = 0``, then every other ``r`` with each ``d`` and exchange."""
    plans = [Plan(r=0)]
    for r in valid_r:
        if r == 0:
            continue
        for d in degrees:
            for exchange in ("flat", "2dh"):
                plans.append(Plan(r=r, d=d, exchange=exchange))
    return plans


def _max_over_ranks(value: float, world: int) -> float:

    sent = torch.full((world,), value, dtype=torch.float64)
    return float(all_to_all(sent, [1] * world, [1] * world, None).max())


def _worker(
    rank: int, world: int, cases: list[BenchCase], rounds: int, probe: bool
) -> tuple[list[list[MeasuredPlan]], list[dict[str, float]], list[list[float]]]:

    probes = Probes(rank, world, (cases[0].dim, cases[0].hidden)) if probe else None
    samples = []
    out = []
    for case in cases:
        torch.manual_seed(case.seed)
        layer = MoELayer(
            case.dim,
            case.hidden,
            case.experts,
            case.top_k,
            load_balance_weight=0.0,
            ranks_per_node=case.ranks_per_node,
        )
        assert layer.placement is not None
        x = torch.randn(case.tokens, case.dim, generator=torch.Generator().manual_seed(rank))
        plans = benchmark_plans(layer.placement.valid_r())
        times: dict[int, list[float]] = {i: [] for i in range(len(plans))}
        for round_ in range(rounds + 1):  # round 0 warms up
            if probes is not None:
                sample = probes.sample()
                if round_:
                    samples.append(sample)
            for i, plan in enumerate(plans):
                layer.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_()
                all_reduce_mean(0.0)  # barrier
                start = time.perf_counter()
                layer(xi, plan=plan).sum().backward()
                elapsed = _max_over_ranks(time.perf_counter() - start, world)
                if round_:
                    times[i].append(elapsed)
        assert layer.stats is not None
        counts = tuple(int(c) for c in layer.stats.routed_per_expert.tolist())
        out.append([MeasuredPlan(p, tuple(times[i]), counts) for i, p in enumerate(plans)])
    if probes is not None:
        probes.close()
        return out, samples, probes.routed_counts()
    return out, samples, []


def measure_plans(
    cases: list[BenchCase], rounds: int = 5, calibrate: bool = False, timeout: float = 600.0
) -> tuple[list[list[MeasuredPlan]], Cluster | None]:
    """Measure every benchmark plan of each case (all cases must share one ``world``).

    With ``calibrate``, the calibration probes of ``flexmoe calibrate`` run on the same
    workers at the start of every round, and the second result is this machine's
    ``Cluster`` from them (calibrated under the same load as the measurement).
    """
    worlds = {c.world for c in cases}
    if len(worlds) != 1:
        raise ValueError(f"cases must share one world size, got {sorted(worlds)}")
    world = worlds.pop()
    results = run_local(_worker, world, cases, rounds, calibrate, timeout=timeout)
    measured: list[list[MeasuredPlan]] = results[0][0]
    if not calibrate:
        return measured, None
    cluster = cluster_from_samples(
        [r[1] for r in results], results[0][2], world, (cases[0].dim, cases[0].hidden)
    )
    return measured, cluster
