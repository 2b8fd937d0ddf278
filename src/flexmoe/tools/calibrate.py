"""``flexmoe calibrate``: measure this machine and describe it as a ``Cluster``.

Short measurements on ``workers`` local processes (one compute thread each, all
measuring at once, as the ranks of a job run), repeated in ``rounds`` and reduced to
medians (rates: the mean over ranks; collective times: the slowest rank):

1. dense GEMM FLOP/s (fp32 at expert-like shapes, bf16 briefly), streaming copy
   bandwidth, SiLU throughput, and the dispatch cost of a tiny op;
2. the gloo all-to-all through the layer's communicator thread: the thread's
   hand-off cost, the latency per message of back-to-back small all-to-alls, and the
   bandwidth from two large sizes;
3. the runtime's fixed costs: tiny distributed ``MoELayer`` steps (``d = 1`` and
   ``d = 4``, 2 and 8 experts per rank, flat and 2DH), whose sizes make data-dependent
   costs negligible; the per-step, per-chunk, per-kernel and per-collective host costs
   are fitted so that the cost model explains them (least squares, non-negative; the
   per-kernel cost is at least the tiny op's, the per-collective at least the hand-off);
4. a small real layer (the given widths, 128 tokens per rank by default): ``gemm_efficiency`` is the
   fraction of the GEMM probe's rate its expert compute reaches inside the layer
   (allocations, autograd, the communicator thread), from its ``d = 1`` time; and
   ``overlap_efficiency`` the value for which the model's ratio of ``d = 4`` to ``d = 1``
   matches the measured one (negative when pipelining makes a step slower than its
   chunking costs explain, as on CPU ranks whose communication needs the cores that
   compute); and ``solo_speedup`` the value for which the model's time of the same layer
   with every row on rank 0 (the other ranks idle but for the exchange; no rerouting)
   matches the measured one (a lone busy CPU rank has the machine's caches, memory
   bandwidth, clock headroom and spare cores for its communication to itself).

Rates are per rank while ``workers`` ranks run, stored per compute slot (core) so
that the simulator can predict more ranks than cores by sharing
(``Cluster.compute_slots_per_node``). ``Probes`` can also run inside other
measurements (``flexmoe.tools.measure``), interleaved with them, so that a busy
machine's load hits calibration and measurement alike.

The result is JSON in the user cache directory (``$XDG_CACHE_HOME/flexmoe/
this-machine.json``, else ``~/.cache/flexmoe/this-machine.json``) or at a given path;
``load_cluster("this-machine")`` reads it back.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexmoe.config import Plan
from flexmoe.layer import MoELayer
from flexmoe.parallel import all_reduce_mean
from flexmoe.parallel.comm import Communicator, all_to_all
from flexmoe.planner.cluster import Cluster, DeviceSpec, LinkSpec, default_calibration_path
from flexmoe.planner.simulate import simulate
from flexmoe.planner.workload import Load, MoEWorkload
from flexmoe.tools.local import run_local
from flexmoe.tools.replay import force_routing

__all__ = ["DEFAULT_LAYER", "Probes", "calibrate", "cluster_from_samples", "default_calibration_path"]

_LOCAL_RANKS = 64  # ranks one machine may host in a simulation ("devices per node")
_RATES = (
    "fp32_flops",
    "fp32_flops_small",
    "bf16_flops",
    "stream",
    "silu",
)
_SMALL_ROWS = 64
# Tiny layers for the host-cost fit: (experts per rank, pipelining degree, exchange).
_TINY = ((2, 1, "flat"), (2, 4, "flat"), (8, 1, "flat"), (2, 1, "2dh"))
_TINY_DIM, _TINY_TOKENS = 32, 32
# A small real layer, pipelined or not, for the efficiency and overlap fits: its widths
# are the caller's (GEMM efficiency depends on them), with few tokens per rank.
_MID_TOKENS = 128
DEFAULT_LAYER = (256, 512)  # dim, expert hidden dim (benchmarks/parallel.py's layer)
_MID, _LARGE = 256 << 10, 1 << 20  # floats per peer of the bandwidth all-to-alls


def _clock(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Seconds per call of ``fn()``, averaged over ``repeat`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _nothing() -> None:
    return None


def _step(layer: Any, x: torch.Tensor, plan: Any) -> None:
    """One forward and backward of ``layer`` under ``plan``."""
    layer(x, plan=plan).sum().backward()


class Probes:
    """One rank's calibration probes; ``sample()`` runs each once (every rank calls it together)."""

    def __init__(
        self, rank: int, world: int, widths: tuple[int, int] = DEFAULT_LAYER, tokens: int = _MID_TOKENS
    ) -> None:

        self.world, self.rank = world, rank
        self.comm = Communicator(None, "calibrate", timeout=120)
        shapes = [(512, 256, 1024), (512, 1024, 256)]  # an expert's two projections, 512 rows
        self.gemm_flops = sum(2.0 * m * k * n for m, k, n in shapes)
        self.mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
        self.small_mats = [(a[:_SMALL_ROWS].contiguous(), b) for a, b in self.mats]
        self.bf16 = (torch.randn(64, 256, dtype=torch.bfloat16), torch.randn(256, 256, dtype=torch.bfloat16))
        self.src = torch.randn(6 << 20)  # 24 MiB: beyond a core's last-level cache share
        self.h, self.h_out = torch.randn(1 << 20), torch.empty(1 << 20)
        self.tiny, self.tiny_out = torch.ones(8), torch.empty(8)
        self.a2a_x = {n: torch.randn(world * n) for n in (16, _MID, _LARGE)}
        self.layers = []
        for per_rank, _, _ in _TINY:
            torch.manual_seed(0)
            layer = MoELayer(
                _TINY_DIM, _TINY_DIM, per_rank * world, 2, load_balance_weight=0.0, ranks_per_node=world
            )
            self.layers.append(layer)
        self.tiny_x = torch.randn(_TINY_TOKENS, _TINY_DIM, generator=torch.Generator().manual_seed(rank))
        self.counts: list[list[float]] = [[] for _ in _TINY]
        dim, hidden = widths
        torch.manual_seed(0)
        self.mid = MoELayer(dim, hidden, 2 * world, 2, load_balance_weight=0.0, ranks_per_node=world)
        self.mid_x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(rank))

        self.mid_counts: list[float] = []
        self.skewed_counts: list[float] = []

    def _barrier(self) -> None:

        all_reduce_mean(0.0)

    def _a2a_small(self) -> None:
        self._a2a(16)

    def _a2a(self, per_peer: int) -> None:

        sizes = [per_peer] * self.world
        self.comm.run(all_to_all, "calibration all-to-all", self.a2a_x[per_peer], sizes, sizes, None)

    def sample(self) -> dict[str, float]:
        """One round of every probe on this rank: rates (per second) and times (seconds)."""
        out: dict[str, float] = {}
        gemms = lambda n: [a @ b for _ in range(n) for a, b in self.mats]  # noqa: E731
        # Sustained, not burst: on a shared machine a 10 ms GEMM often runs unpreempted,
        # a layer step of 100+ ms does not; 8 rounds of the two projections last that long.
        self._barrier()
        out["fp32_flops"] = 8 * self.gemm_flops / _clock(lambda: gemms(8))
        repeat = 8 * 512 // _SMALL_ROWS  # the same FLOPs in GEMMs of few rows
        out["fp32_flops_small"] = (
            8 * self.gemm_flops / _clock(lambda: [a @ b for _ in range(repeat) for a, b in self.small_mats])
        )
        a16, b16 = self.bf16
        out["bf16_flops"] = 2.0 * 64 * 256 * 256 / _clock(lambda: a16 @ b16)
        out["stream"] = 2.0 * self.src.numel() * 4 / _clock(self.src.clone)  # a fresh output, as ops make
        out["silu"] = self.h.numel() / _clock(lambda: torch.ops.aten.silu.out(self.h, out=self.h_out))
        out["op"] = _clock(lambda: torch.add(self.tiny, self.tiny, out=self.tiny_out), 50)
        out["handoff"] = _clock(lambda: self.comm.run(_nothing, "no-op"), 5)
        # Back-to-back small all-to-alls: the latency a pipelined exchange sees.
        self._barrier()
        self._a2a(16)
        out["a2a_small"] = _clock(self._a2a_small, 8)
        for name, n in (("a2a_mid", _MID), ("a2a_large", _LARGE)):
            self._barrier()
            self._a2a(n)
            out[name] = _clock(functools.partial(self._a2a, n), 2)
        # Tiny layers: fixed costs.
        for i, (layer, (_, d, exchange)) in enumerate(zip(self.layers, _TINY, strict=True)):
            x = self.tiny_x.clone().requires_grad_()
            plan = Plan(r=1, d=d, exchange=exchange)  # type: ignore[arg-type]
            self._barrier()
            out[f"tiny{i}"] = _clock(functools.partial(_step, layer, x, plan))
            assert layer.stats is not None
            self.counts[i] = [float(c) for c in layer.stats.routed_per_expert.tolist()]
        # A small real layer without and with pipelining: how much overlap this machine gets.
        # Each is timed after an untimed step of the same plan: a training job repeats its
        # plan, so its steps find their buffers in place (right after other probes, a step
        # runs up to 15 % slower, re-faulting fresh memory).
        for d in (1, 4):
            x = self.mid_x.clone().requires_grad_()
            _step(self.mid, x, Plan(r=1, d=d))
            self._barrier()
            out[f"mid_d{d}"] = _clock(functools.partial(_step, self.mid, x, Plan(r=1, d=d)))
        assert self.mid.stats is not None
        self.mid_counts = [float(c) for c in self.mid.stats.routed_per_expert.tolist()]
        # The same layer with every row on rank 0 (its experts 0 and 1), the other ranks
        # idle but for the exchange (no rerouting): how much faster a lone busy rank is.

        x = self.mid_x.clone().requires_grad_()
        ids = torch.tensor([[0, 1]]).expand(x.shape[0], 2)
        with force_routing(self.mid, ids):
            _step(self.mid, x, Plan(r=1, d=1, reroute=False))
            self._barrier()
            out["mid_skewed"] = _clock(functools.partial(_step, self.mid, x, Plan(r=1, d=1, reroute=False)))
        assert self.mid.stats is not None and not self.mid.stats.plan.reroute
        self.skewed_counts = [float(c) for c in self.mid.stats.routed_per_expert.tolist()]
        return out

    def routed_counts(self) -> list[list[float]]:
        """Routed counts per expert of the tiny layers, then of the small layer, even and skewed."""
        return [*self.counts, self.mid_counts, self.skewed_counts]

    def close(self) -> None:
        """Stop the communicator thread."""
        self.comm.close()


def _calibrate_worker(
    rank: int, world: int, rounds: int, layer: tuple[int, int], tokens: int = _MID_TOKENS
) -> tuple[list[dict[str, float]], list[list[float]]]:
    probes = Probes(rank, world, layer, tokens)
    probes.sample()  # warm-up
    samples = [probes.sample() for _ in range(rounds)]
    probes.close()
    return samples, probes.routed_counts()


def _nonneg_solve(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares ``A x = y`` with ``x >= 0`` (exhaustive over active sets; ``A`` has few columns)."""
    n = A.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(y**2))
    for size in range(1, n + 1):
        for free in itertools.combinations(range(n), size):
            x_free = np.linalg.lstsq(A[:, free], y, rcond=None)[0]
            if np.any(x_free < 0):
                continue
            x = np.zeros(n)
            x[list(free)] = x_free
            residual = float(np.sum((A @ x - y) ** 2))
            if residual < best_residual:
                best, best_residual = x, residual
    return best


def _tiny_workload(per_rank: int, workers: int, dim: int, hidden: int, tokens: int) -> Any:

    return MoEWorkload(
        dim=dim,
        hidden_dim=hidden,
        num_experts=per_rank * workers,
        top_k=2,
        gated=True,
        dtype="fp32",
        tokens_per_device=tokens,
    )


def _predict(
    cluster: Cluster,
    workers: int,
    per_rank: int,
    plan: tuple[int, str],
    counts: list[float],
    shape: tuple[int, int, int],
) -> float:

    workload = _tiny_workload(per_rank, workers, *shape)
    candidate = Plan(r=1, d=plan[0], exchange=plan[1], reroute=False)  # type: ignore[arg-type]
    return simulate(
        cluster, workload, Load.from_counts(counts), workers, candidate, ranks_per_node=workers
    ).time


def _fit_host_costs(
    cluster: Cluster,
    m: dict[str, float],
    counts: list[list[float]],
    workers: int,
    layer: tuple[int, int],
    tokens: int = _MID_TOKENS,
) -> Cluster:
    """Fit the host costs to the tiny layers, then the small layer's ``gemm_efficiency`` and overlap.

    Host costs: ``step_overhead``, ``chunk_overhead``, ``op_overhead`` (at least the tiny
    op's) and ``collective_overhead`` (at least the hand-off's); the model is linear in
    them, so this is a non-negative least-squares fit of four columns.
    """
    tiny_shape = (_TINY_DIM, _TINY_DIM, _TINY_TOKENS)
    floors = (0.0, 0.0, cluster.device.op_overhead, cluster.collective_overhead)

    def predict(c: Cluster) -> np.ndarray:
        return np.array(
            [
                _predict(c, workers, per_rank, (d, exchange), n, tiny_shape)
                for (per_rank, d, exchange), n in zip(_TINY, counts, strict=False)
            ]
        )

    mid_counts = counts[len(_TINY)]

    def mid(c: Cluster, d: int) -> float:
        return _predict(c, workers, 2, (d, "flat"), mid_counts, (*layer, tokens))

    fitted = cluster
    for _ in range(2):  # the host costs and the efficiency depend a little on each other
        # 1. host costs: the model is linear in them (columns: the change per unit cost).
        unit = 1e-3
        current = fitted
        base = predict(_with(current, floors))
        columns = [
            predict(_with(current, tuple(f + (unit if j == i else 0.0) for j, f in enumerate(floors)))) - base
            for i in range(len(floors))
        ]
        A = np.stack(columns, axis=1) / unit
        x = _nonneg_solve(A, np.array([m[f"tiny{i}"] for i in range(len(_TINY))]) - base)
        fitted = _with(current, tuple(f + float(v) for f, v in zip(floors, x, strict=True)))
        # 2. how fast the expert compute runs inside a real layer, relative to the GEMM
        # probe (allocation, autograd, the communicator thread): the small layer, d = 1.
        fitted = replace(
            fitted,
            device=replace(fitted.device, gemm_efficiency=_bisect_efficiency(fitted, mid, m["mid_d1"])),
        )
    # 3. overlap: the model's d=4 time is linear in overlap_efficiency; match the measured
    # d=4 / d=1 ratio of the small layer.
    target = m["mid_d4"] / m["mid_d1"] * mid(fitted, 1)
    at0 = mid(replace(fitted, overlap_efficiency=0.0), 4)
    at1 = mid(replace(fitted, overlap_efficiency=1.0), 4)
    eta = (at0 - target) / (at0 - at1) if at0 != at1 else 0.0
    fitted = replace(fitted, overlap_efficiency=min(1.0, max(-1.0, eta)))
    # 4. a lone busy rank: the skewed small layer (every row on rank 0) against the model,
    # whose straggler speeds up by ``solo_speedup`` while the others idle.
    if "mid_skewed" in m and len(counts) > len(_TINY) + 1:
        skewed = counts[len(_TINY) + 1]

        def lone(speedup: float) -> float:
            c = replace(fitted, device=replace(fitted.device, solo_speedup=speedup))
            return _predict(c, workers, 2, (1, "flat"), skewed, (*layer, tokens))

        lo, hi = 1.0, 4.0
        if lone(lo) <= m["mid_skewed"]:
            hi = lo
        for _ in range(30):
            mid_s = (lo + hi) / 2
            if lone(mid_s) > m["mid_skewed"]:
                lo = mid_s
            else:
                hi = mid_s
        fitted = replace(fitted, device=replace(fitted.device, solo_speedup=(lo + hi) / 2))
    return fitted


def _with(cluster: Cluster, costs: tuple[float, ...]) -> Cluster:
    step, chunk, op, collective = costs
    return replace(
        cluster,
        step_overhead=step,
        chunk_overhead=chunk,
        collective_overhead=collective,
        device=replace(cluster.device, op_overhead=op),
    )


def _bisect_efficiency(cluster: Cluster, mid: Callable[[Cluster, int], float], measured: float) -> float:
    """The ``gemm_efficiency`` in [0.05, 1] for which the small layer's d=1 time matches."""
    lo, hi = 0.05, 1.0

    def at(eff: float) -> float:
        return mid(replace(cluster, device=replace(cluster.device, gemm_efficiency=eff)), 1)

    if at(hi) >= measured:
        return hi
    if at(lo) <= measured:
        return lo
    for _ in range(30):
        eff = (lo + hi) / 2
        if at(eff) > measured:
            lo = eff
        else:
            hi = eff
    return (lo + hi) / 2


def cluster_from_samples(
    samples: list[list[dict[str, float]]],
    counts: list[list[float]],
    workers: int,
    layer: tuple[int, int] = DEFAULT_LAYER,
    slots: int | None = None,
    tokens: int = _MID_TOKENS,
) -> Cluster:
    """The ``Cluster`` of this machine from ``samples[rank][round]`` of ``Probes.sample``."""
    if slots is None:
        slots = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rounds = len(samples[0])
    m: dict[str, float] = {}
    for key in samples[0][0]:
        per_round = []
        for i in range(rounds):
            values = [samples[rank][i][key] for rank in range(workers)]
            per_round.append(statistics.mean(values) if key in _RATES else max(values))
        m[key] = statistics.median(per_round)
    share = min(1.0, slots / workers)
    # GEMM rate at 512 and at 64 rows: rate(m) = peak * m / (m + m_half).
    q = m["fp32_flops"] / m["fp32_flops_small"]
    big, small = 512.0, float(_SMALL_ROWS)
    half_rows = max(0.0, big * small * (q - 1) / (big - small * q)) if q < big / small else 4 * big
    peak = m["fp32_flops"] * (big + half_rows) / big
    handoff = m["handoff"]
    latency = max(0.0, (m["a2a_small"] - handoff) / (workers - 1))
    bytes_mid, bytes_large = (workers - 1) * _MID * 4.0, (workers - 1) * _LARGE * 4.0
    slope = (m["a2a_large"] - m["a2a_mid"]) / (bytes_large - bytes_mid)
    bandwidth = 1.0 / slope if slope > 0 else bytes_large / m["a2a_large"]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, slots)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    how = f"measured by `flexmoe calibrate` on {workers} gloo processes ({rounds} rounds, medians), {when}"
    # Stored per slot: the simulator divides by the share of a slot each rank gets.
    link = LinkSpec(
        bandwidth=bandwidth / share, latency=latency * share, node_bandwidth=bandwidth / share * slots
    )
    device = DeviceSpec(
        name=f"{platform.machine()} CPU core ({platform.processor() or 'unknown'}), 1 thread per rank",
        flops={"fp32": peak / share, "bf16": m["bf16_flops"] / share},
        gemm_efficiency=1.0,
        memory_bandwidth=m["stream"] / share,
        memory_efficiency=1.0,
        memory_bytes=float(memory),
        op_overhead=m["op"] * share,
        elementwise_rate=m["silu"] / share,
        gemm_half_rows=half_rows,
        solo_speedup=1.0,  # fitted below
    )
    cluster = Cluster(
        name="this-machine",
        device=device,
        devices_per_node=_LOCAL_RANKS,
        intra_node=link,
        inter_node=link,
        compute_slots_per_node=slots,
        overlap_efficiency=0.0,  # fitted below
        collective_overhead=handoff * share,
        sources={
            "device.flops": (
                f"{how}: fp32 [512,256]x[256,1024] and [512,1024]x[1024,256] GEMMs, 8 times back to back "
                f"(sustained, as in a layer step), and the same FLOPs with {_SMALL_ROWS} rows for "
                "gemm_half_rows; bf16 [64,256]x[256,256]"
            ),
            "device.gemm_half_rows": f"{how}: from the fp32 GEMM rates at 512 and {_SMALL_ROWS} rows",
            "device.solo_speedup": f"{how}: fitted to the small layer with every row on rank 0 (the "
            "others idle but for the exchange; no rerouting), d=1",
            "device.memory_bandwidth": f"{how}: clone of a 24 MiB fp32 buffer (read + write bytes)",
            "device.elementwise_rate": f"{how}: SiLU of 2^20 fp32 elements",
            "device.op_overhead": f"{how}: fitted to tiny MoELayer steps, at least a tiny add's cost",
            "device.gemm_efficiency": (
                f"{how}: fitted to a small MoELayer (dim {layer[0]}, hidden {layer[1]}, "
                f"{tokens} tokens per rank), d=1"
            ),
            "device.memory_bytes": "physical memory of this machine divided by its cores",
            "intra_node": (
                f"{how}: all-to-alls through the layer's communicator thread; latency from back-to-back "
                f"16-float messages, bandwidth from the slope between {_MID} and {_LARGE} floats per peer; "
                "the node bandwidth assumes the loopback scales with cores"
            ),
            "inter_node": "this machine is one node: same as intra_node",
            "compute_slots_per_node": "cores this process may run on (sched_getaffinity)",
            "overlap_efficiency": (
                f"{how}: fitted to a small MoELayer (dim {layer[0]}, hidden {layer[1]}, "
                f"{tokens} tokens per rank) with d=4 against d=1"
            ),
            "collective_overhead": (
                f"{how}: fitted to tiny MoELayer steps (flat and 2DH), at least the hand-off of a no-op "
                "to the communicator thread"
            ),
            "step_overhead": (
                f"{how}: fitted to tiny MoELayer steps (2 and 8 experts per rank, d=1 and 4, flat and 2DH)"
            ),
            "chunk_overhead": f"{how}: fitted to the same tiny steps",
        },
        notes=f"medians per rank while {workers} ranks ran: "
        + ", ".join(f"{k}={v:.4g}" for k, v in m.items()),
    )
    return _fit_host_costs(cluster, m, counts, workers, layer, tokens)


def calibrate(
    workers: int = 2,
    path: str | Path | None = None,
    rounds: int = 5,
    save: bool = True,
    layer: tuple[int, int] = DEFAULT_LAYER,
    tokens: int = _MID_TOKENS,
) -> Cluster:
    """Measure this machine on ``workers`` local gloo processes; store (unless ``save=False``) and return it.

    ``layer``: ``(dim, expert hidden dim)`` and ``tokens`` per rank of the small layer
    whose GEMM efficiency and overlap are fitted (use the widths and batch of the layers
    you will plan: a GEMM's efficiency grows with its rows).
    """
    if not isinstance(workers, int) or workers < 2:
        raise ValueError(f"workers must be an int >= 2 (the all-to-all needs two processes), got {workers!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    results = run_local(_calibrate_worker, workers, rounds, layer, tokens, timeout=600)
    cluster = cluster_from_samples([r[0] for r in results], results[0][1], workers, layer, tokens=tokens)
    if save:
        cluster.save(path or default_calibration_path())
    return cluster
