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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from flexmoe.config import RerouteConfig
from flexmoe.layer import MoELayer
from flexmoe.planner.cluster import Cluster
from flexmoe.planner.search import DEGREES, baselines, candidates, plan
from flexmoe.planner.simulate import Candidate
from flexmoe.planner.trace import RoutingTrace, _check_counts
from flexmoe.planner.workload import Load, MoEWorkload
from flexmoe.routing.routers import Router, RouterOutput

__all__ = [
    "TraceSimulation",
    "expert_ids_from_counts",
    "force_routing",
    "format_trace_simulation",
    "simulate_trace",
]


def _integers(values: Sequence[int] | Tensor | NDArray[Any], name: str) -> list[int]:
    """``values`` as a list of ints; ``ValueError`` naming ``name`` unless it is 1-D and integral."""
    array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values)
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.ndim != 1 or not integral:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got {values!r}")
    return [int(v) for v in array.tolist()]


def expert_ids_from_counts(
    counts: Sequence[int] | Tensor | NDArray[Any],
    top_k: int,
    num_tokens: int | None = None,
    *,
    num_experts: int | None = None,
    seed: int | None = 0,
) -> Tensor:
    """Expert ids ``[T, K]`` (int64, ``K`` distinct per row) with exactly ``counts[e]`` ids ``e``.

    ``T = num_tokens`` (default ``sum(counts) / top_k``). The counts must be one step's
    routing: ``num_experts`` (default ``len(counts)``) non-negative integers summing to
    ``T * K``, none over ``T``; otherwise ``ValueError`` names the argument.

    Construction: the expert-major list of the ``T*K`` slots (``counts[e]`` copies of
    ``e``) fills the ``[K, T]`` matrix row by row, so slot ``j`` goes to token ``j mod T``;
    one expert's slots are consecutive and at most ``T`` long, so no token gets an
    expert twice. ``seed`` (default 0) then shuffles the tokens and the order of each
    token's choices (which matters for capacity priority) reproducibly; ``None`` keeps
    the plain layout.
    """
    values = _integers(counts, "counts")
    if num_experts is not None and (not isinstance(num_experts, int) or num_experts < 1):
        raise ValueError(f"num_experts must be an int >= 1 or None, got {num_experts!r}")
    E = len(values) if num_experts is None else num_experts
    if not values:
        raise ValueError("counts must not be empty")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
    if num_tokens is not None and (
        isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0
    ):
        raise ValueError(f"num_tokens must be an int >= 0 or None, got {num_tokens!r}")
    T = _check_counts(values, E, top_k, num_tokens, tokens_name="num_tokens")
    K = top_k
    # 1. expert-major slots, 2. slot j -> (choice j // T, token j % T).
    ids_N = torch.repeat_interleave(torch.arange(E), torch.tensor(values, dtype=torch.int64))
    ids_TK = ids_N.view(K, T).t()
    if seed is not None and T > 0:
        # 3. shuffle tokens, then each token's choice order.
        generator = torch.Generator().manual_seed(seed)
        ids_TK = ids_TK[torch.randperm(T, generator=generator)]
        order_TK = torch.rand(T, K, generator=generator).argsort(dim=1)
        ids_TK = ids_TK.gather(1, order_TK)
    return ids_TK.contiguous()


def _check_expert_ids(expert_ids_TK: object, num_experts: int) -> Tensor:
    if not isinstance(expert_ids_TK, Tensor):
        raise TypeError(f"expert_ids_TK must be a torch.Tensor, got {type(expert_ids_TK).__name__}")
    if expert_ids_TK.dim() != 2 or expert_ids_TK.is_floating_point() or expert_ids_TK.is_complex():
        raise ValueError(
            f"expert_ids_TK must be a 2-D integer tensor [tokens, top_k], got shape "
            f"{tuple(expert_ids_TK.shape)}, dtype {expert_ids_TK.dtype}"
        )
    T, K = expert_ids_TK.shape
    if not 1 <= K <= num_experts:
        raise ValueError(f"expert_ids_TK must have 1 to num_experts={num_experts} columns, got {K}")
    ids = expert_ids_TK.to(torch.int64)
    if T and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert_ids_TK values must be in [0, num_experts={num_experts})")
    if T and K > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("expert_ids_TK: each row (token) must hold distinct experts")
    return ids


@contextmanager
def force_routing(layer: MoELayer, expert_ids_TK: Tensor) -> Iterator[None]:
    """Make ``layer`` route its ``T`` tokens to ``expert_ids_TK [T, K]`` inside the ``with`` block.

    Every forward of the layer in the block must see ``T`` tokens and use ``top_k=K``
    (else ``ValueError``). The router still runs: its logits and probabilities feed
    the auxiliary losses, and the weights are its scores of the forced experts
    (renormalised and scaled per its config), differentiable w.r.t. the router's
    parameters. Works through a forward hook on ``layer.router``: no parameter or
    state-dict key changes. On several ranks, each rank passes the ids of its own tokens.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a flexmoe.MoELayer, got {type(layer).__name__}")
    ids_TK = _check_expert_ids(expert_ids_TK, layer.config.num_experts)
    T, K = ids_TK.shape

    def hook(router: Router, args: tuple[Any, ...], kwargs: dict[str, Any], output: RouterOutput) -> Any:
        x_TD = args[0] if args else kwargs["x_TD"]
        top_k = args[1] if len(args) > 1 else kwargs["top_k"]
        if x_TD.shape[0] != T or top_k != K:
            raise ValueError(
                f"force_routing: the forced expert ids are for {T} tokens, top-{K}; the layer was "
                f"called with {x_TD.shape[0]} tokens, top-{top_k}"
            )
        logits_TE = output.logits_TE
        ids = ids_TK.to(logits_TE.device)
        with torch.autocast(device_type=logits_TE.device.type, enabled=False):
            scores_TE, _ = router.scores(logits_TE)
            weights_TK = scores_TE.gather(1, ids)
            cfg = router.config
            if cfg.normalize_weights and K > 1:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if cfg.routed_scaling_factor != 1.0:
                weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(ids, weights_TK, logits_TE, output.probs_TE)

    handle = layer.router.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


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
    plans: list[Candidate]
    times_SP: NDArray[np.float64]
    fits_SP: NDArray[np.bool_]
    load_max_over_mean_S: NDArray[np.float64]

    def times(self, label: str) -> NDArray[np.float64]:
        """Per-step times of the plan with this label."""
        for p, candidate in enumerate(self.plans):
            if candidate.label == label:
                column: NDArray[np.float64] = self.times_SP[:, p]
                return column
        raise KeyError(f"no plan labelled {label!r}")

    @property
    def per_step_best_S(self) -> NDArray[np.float64]:
        """Each step's fastest fitting flexmoe plan (a runtime re-planning every step)."""
        adaptive = np.array([not c.is_static for c in self.plans])
        times = np.where(self.fits_SP & adaptive, self.times_SP, np.inf)
        best: NDArray[np.float64] = times.min(axis=1)
        return np.where(np.isfinite(best), best, self.times_SP[:, adaptive].min(axis=1))

    def summary(self) -> list[dict[str, Any]]:
        """One row per plan (fastest median first, baselines last), then ``per-step best``."""
        best_S = self.per_step_best_S
        rows = []
        for p, candidate in enumerate(self.plans):
            times = self.times_SP[:, p]
            rows.append(
                {
                    "plan": candidate.label,
                    "static": candidate.is_static,
                    "median_s": float(np.median(times)),
                    "p90_s": float(np.percentile(times, 90)),
                    "max_s": float(times.max()),
                    "mean_s": float(times.mean()),
                    "best_steps": 0 if candidate.is_static else int(np.sum(times <= best_S * (1 + 1e-12))),
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
    plans: Sequence[Candidate] | None = None,
    ranks_per_node: int | None = None,
    memory_budget: float | None = None,
    degrees: Iterable[int] = DEGREES,
    rerouting: bool = True,
    reroute_config: RerouteConfig | None = None,
) -> TraceSimulation:
    """Predict every plan (``plans``, default all candidates) and baseline for each step of ``layer``.

    Each step's counts become a ``Load`` (``Load.from_counts``): the trace gives the
    shape of the load, step by step; ``workload`` gives its size (tokens per device),
    as with ``--load trace:PATH``. A rerouting candidate whose bounds cannot hold a
    step runs, as the layer does, plain expert parallelism in that step.
    """
    if trace.num_experts != workload.num_experts:
        raise ValueError(f"trace has num_experts={trace.num_experts}, the workload {workload.num_experts}")
    records = trace.steps(layer)
    chosen = list(plans) if plans is not None else candidates(workload, world_size, degrees, rerouting)
    chosen += [c for c in baselines(workload, world_size) if c not in chosen]
    adaptive = [c for c in chosen if not c.is_static]
    S, P = len(records), len(chosen)
    times_SP = np.zeros((S, P))
    fits_SP = np.zeros((S, P), dtype=bool)
    load_S = np.zeros(S)
    for s, record in enumerate(records):
        load = Load.from_counts(record.counts, name=f"step {record.step}")
        load_S[s] = load.max_over_mean
        report = plan(
            cluster,
            workload,
            load,
            world_size,
            ranks_per_node=ranks_per_node,
            memory_budget=memory_budget,
            plans=adaptive,
            reroute_config=reroute_config,
        )
        found = {p.candidate: p for p in [*report.predictions, *report.baselines]}
        for p, candidate in enumerate(chosen):
            prediction = found.get(candidate) or found.get(replace(candidate, rerouting=False))
            if prediction is None:  # a rerouting candidate dropped without its plain twin
                times_SP[s, p], fits_SP[s, p] = math.inf, False
                continue
            times_SP[s, p], fits_SP[s, p] = prediction.time, prediction.fits
    return TraceSimulation(records[0].layer, [r.step for r in records], chosen, times_SP, fits_SP, load_S)


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
