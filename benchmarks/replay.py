"""Replay a routing trace: measured in a real layer on this machine, and predicted on a cluster.

1. The trace: ``--trace PATH`` (a ``flexmoe train --trace`` recording or any routing
   trace), or, by default, a short ``flexmoe train`` run recorded here.
2. Measured: one ``MoELayer`` (``--dim``, ``--hidden``, the trace's experts and top-k)
   is made to route each recorded step's counts exactly (``force_routing`` with
   ``expert_ids_from_counts``), and a forward+backward is timed per step (median of
   ``--repeats``), next to the same layer with perfectly even counts: the ratio is
   what that step's skew costs on one process.
3. Predicted: ``simulate_trace`` scores every plan for every step on ``--cluster`` with
   ``--devices`` ranks; prints per step the default plan, the best fixed plan, the
   per-step best and a static baseline, then the summary table (median, p90, max).

    python benchmarks/replay.py                      # record 20 steps, replay 12 of them
    python benchmarks/replay.py --trace runs/x/routing.jsonl.gz --layer blocks.1.moe
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexmoe import MoELayer, Plan
from flexmoe.cli import main as flexmoe_main
from flexmoe.planner import MoEWorkload, load_cluster
from flexmoe.planner.replay import format_trace_simulation, simulate_trace
from flexmoe.planner.trace import RoutingTrace, TraceRecord, read_routing_trace
from flexmoe.tools.replay import expert_ids_from_counts, force_routing, routing_from_counts
from harness import environment, measure_interleaved, write_json


def record_trace(folder: Path, steps: int, experts: int, top_k: int) -> Path:
    """A short ``flexmoe train`` run (its output hidden) that records its routing."""
    run = folder / "run"
    args = ["train", "--steps", str(steps), "--batch-size", "8", "--context", "64", "--dim", "64"]
    args += ["--experts", str(experts), "--top-k", str(top_k), "--eval-every", str(steps + 1)]
    args += ["--log-every", str(steps), "--run-dir", str(run), "--trace", "routing.jsonl", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        flexmoe_main(args)
    return run / "routing.jsonl"


def even_counts(num_experts: int, routed: int) -> list[int]:
    """``routed`` slots spread as evenly as the experts allow."""
    base, extra = divmod(routed, num_experts)
    return [base + (e < extra) for e in range(num_experts)]


def step_fn(
    layer: MoELayer,
    counts: Sequence[int],
    tokens: int,
    seed: int,
    experts_per_token: Sequence[int] | None = None,
) -> Callable[[], None]:
    """A forward+backward of ``layer`` routed to exactly ``counts`` (and the histogram of a
    per-token number of experts, when the step recorded one)."""
    K = layer.config.top_k
    valid_TK = None
    if experts_per_token is None:
        ids_TK = expert_ids_from_counts(counts, K, tokens, seed=seed)
    else:
        ids_TK, valid_TK = routing_from_counts(counts, K, experts_per_token, seed=seed)
    x_TD = torch.randn(tokens, layer.config.dim, generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        with force_routing(layer, ids_TK, valid_TK):
            layer(x_TD).square().mean().backward()
        layer.zero_grad(set_to_none=True)

    return step


def replay_measured(trace: RoutingTrace, records: list[TraceRecord], args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    layer = MoELayer(args.dim, args.hidden, trace.num_experts, trace.top_k)
    print(
        f"\nmeasured: MoELayer dim {args.dim}, hidden {args.hidden}, {trace.num_experts} experts, "
        f"top-{trace.top_k}, fwd+bwd, median of {args.repeats} (this process, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"{'step':>6s} {'tokens':>7s} {'max/mean':>9s} {'ms':>9s} {'even ms':>9s} {'ratio':>7s}")
    rows = []
    for record in records:
        routed = sum(record.counts)  # tokens * top_k unless a per-token number of experts
        mean = routed / trace.num_experts
        imbalance = max(record.counts) / mean if mean else 0.0
        even = even_counts(trace.num_experts, routed)
        hist = record.experts_per_token
        timings = measure_interleaved(  # round-robin: drift and other load hit both alike
            {
                "trace": step_fn(layer, record.counts, record.tokens, record.step, hist),
                "even": step_fn(layer, even, record.tokens, record.step, hist),
            },
            warmup=1,
            repeats=args.repeats,
        )
        seconds, even_seconds = timings["trace"].median, timings["even"].median
        rows.append(
            {
                "step": record.step,
                "tokens": record.tokens,
                "load_max_over_mean": imbalance,
                "step_s": seconds,
                "even_s": even_seconds,
            }
        )
        print(
            f"{record.step:6d} {record.tokens:7d} {imbalance:9.2f} {seconds * 1e3:9.2f} "
            f"{even_seconds * 1e3:9.2f} {seconds / even_seconds:7.2f}"
        )
    times = np.array([r["step_s"] for r in rows])
    ratios = times / np.array([r["even_s"] for r in rows])
    print(
        f"median {np.median(times) * 1e3:.2f} ms, p90 {np.percentile(times, 90) * 1e3:.2f} ms; "
        f"over even routing: median {np.median(ratios):.2f}x, max {ratios.max():.2f}x"
    )
    return rows


def replay_predicted(trace: RoutingTrace, layer: str, args: argparse.Namespace) -> dict:
    cluster = load_cluster(args.cluster)
    workload = MoEWorkload(
        dim=args.sim_dim,
        hidden_dim=args.sim_hidden,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        tokens_per_device=args.sim_tokens,
    )
    sim = simulate_trace(cluster, workload, trace, args.devices, layer=layer)
    summary = sim.summary()
    fixed = next(r["plan"] for r in summary if not r["static"])
    shards = max(p.r for p in sim.plans if isinstance(p, Plan) and p.r is not None)
    default = Plan(r=shards, reroute=False).label  # the layer's default plan (r = S), untuned
    shown = {"default " + default: sim.times(default), "best fixed " + fixed: sim.times(fixed)}
    shown["per-step best"] = sim.per_step_best_S
    shown["static cf=1.25"] = sim.times("static cf=1.25")
    print(
        f"\npredicted: {cluster.name}, {args.devices} devices, dim {args.sim_dim}, hidden {args.sim_hidden} "
        f"(gated), {args.sim_tokens} tokens per device, bf16, training; ms per step"
    )
    print(f"{'step':>6s} {'max/mean':>9s} " + " ".join(f"{name:>22s}" for name in shown))
    for s, step in enumerate(sim.steps):
        cells = " ".join(f"{times[s] * 1e3:22.2f}" for times in shown.values())
        print(f"{step:6d} {sim.load_max_over_mean_S[s]:9.2f} {cells}")
    print()
    print(format_trace_simulation(sim, top=6))
    return {"plans": summary, "per_step": {name: times.tolist() for name, times in shown.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", type=Path, default=None, help="a routing trace (default: record one)")
    parser.add_argument("--layer", default=None, help="the trace's layer to replay (default: its first)")
    parser.add_argument("--record-steps", type=int, default=20, help="steps of the recorded run")
    parser.add_argument("--experts", type=int, default=8, help="experts of the recorded run")
    parser.add_argument("--top-k", type=int, default=2, help="top-k of the recorded run")
    parser.add_argument(
        "--max-steps", type=int, default=12, help="replay at most this many steps (evenly spaced)"
    )
    parser.add_argument("--dim", type=int, default=256, help="measured layer: model dim")
    parser.add_argument("--hidden", type=int, default=512, help="measured layer: hidden dim per expert")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cluster", default="a100-80gb-hdr200")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--sim-dim", type=int, default=2048)
    parser.add_argument("--sim-hidden", type=int, default=1408)
    parser.add_argument("--sim-tokens", type=int, default=8192, help="tokens per device (simulated)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = args.trace or record_trace(Path(folder), args.record_steps, args.experts, args.top_k)
        trace = read_routing_trace(path)
    records = trace.steps(args.layer)
    if len(records) > args.max_steps:
        chosen = np.linspace(0, len(records) - 1, args.max_steps).round().astype(int)
        records = [records[i] for i in chosen]
    trace.records = records  # the simulator replays the same steps
    layer = records[0].layer
    source = args.trace or f"a {args.record_steps}-step `flexmoe train --trace` run"
    print(
        f"trace: {source}; layer {layer}, {len(records)} steps, {trace.num_experts} experts, "
        f"top-{trace.top_k} ({time.perf_counter() - started:.1f} s)"
    )
    print(environment())
    measured = replay_measured(trace, records, args)
    print(f"({time.perf_counter() - started:.1f} s so far)")
    predicted = replay_predicted(trace, layer, args)
    print(f"({time.perf_counter() - started:.1f} s in all)")
    write_json(args.json, {"environment": environment(), "measured": measured, "predicted": predicted})


if __name__ == "__main__":
    main()
