"""Skewed routing on 2 worker processes: plain expert parallelism, every fixed plan, rerouting, and the tuner.

Routing is forced (``flexmoe.planner.replay.force_routing``: the router still runs and
weighs the forced experts): ``uniform``, ``zipf1.2`` (each token draws its ``K``
distinct experts with probabilities ``~ (rank+1)^-1.2``, the planner's
``Load.zipf``, whose expert ranks are shuffled with a fixed seed) and ``extreme``
(every token chooses experts 0 and 1, both on rank 0). For each skew, every fixed plan
(``r`` in {0, 1}, ``d`` in {1, 2, 4}; rerouting off, least-loaded, or shadowing with
``d`` in {1, 2}), the layer's own rerouting
decision (``Plan()``: the cost model decides) and ``plan="auto"`` (the online tuner,
after its search) run in one process group. Printed: the median training-step time
(forward+backward, slowest rank), the cost model's prediction for that plan on the
step's counts and its error, the speed-up over plain EP, rows of the busiest rank,
copies sent, and each rank's peak resident memory (Linux VmHWM, reset before each
mode's warm-up); then, per skew, auto against the best fixed plan and against plain
EP. After the warm-up (auto: its search), the modes run round-robin, one timed step
each per round after ``--settle`` untimed ones (a training job repeats one plan, so a
step is timed with that plan's buffers in place, not right after another mode's), so
that drift on a shared machine hits every mode alike; "paired" ratios are
medians over rounds of the ratio within a round (robust to drift between rounds),
beside the ratio of medians.

    python benchmarks/skew.py --calibrate    # measure this machine first (about 10 s)
    python benchmarks/skew.py --tokens 4096 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexmoe import MoELayer, Plan, TunerConfig
from flexmoe.planner import Load, load_cluster
from flexmoe.planner.cluster import default_calibration_path
from flexmoe.planner.layer_cost import CostModel
from flexmoe.tools.calibrate import calibrate
from flexmoe.tools.replay import force_routing
from harness import environment, write_json

FIXED = [
    Plan(r=1, reroute=False),  # plain expert parallelism: first
    Plan(r=1, d=2, reroute=False),
    Plan(r=1, d=4, reroute=False),
    Plan(r=1, reroute="lla"),
    Plan(r=1, d=2, reroute="lla"),
    Plan(r=1, d=4, reroute="lla"),
    Plan(r=1, reroute="shadow"),
    Plan(r=1, d=2, reroute="shadow"),
    Plan(r=0, reroute=False),
]


def _routing(name: str, tokens: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Expert ids ``[tokens, top_k]`` (distinct per token) drawn under skew ``name``."""
    if name == "extreme":  # every token chooses experts 0 .. K-1, all on rank 0
        return torch.arange(top_k).expand(tokens, top_k).clone()
    if name == "uniform":
        share = Load.uniform(num_experts).share_E
    else:  # zipfS: the planner's Zipf load (expert ranks shuffled with its fixed seed)
        share = Load.zipf(num_experts, float(name.removeprefix("zipf"))).share_E
    weights = torch.as_tensor(share, dtype=torch.float64).expand(tokens, num_experts)
    return torch.multinomial(weights, top_k, generator=torch.Generator().manual_seed(seed))


def _reset_peak() -> None:
    with contextlib.suppress(OSError):  # not Linux: peaks are then since process start
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _label(c: Plan) -> str:
    return "plain EP" if c == FIXED[0] else c.label


def _candidate(plan: Plan) -> Plan:
    """The plan as the cost model scores it (a plan that ran: ``r`` and ``reroute`` resolved)."""
    assert plan.r is not None
    return Plan(r=plan.r, d=plan.d if plan.r else 1, exchange=plan.exchange, reroute=plan.reroute or False)


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(args.seed)
        tuner = TunerConfig(cluster=args.cluster)
        layer = MoELayer(
            args.dim, args.hidden, args.experts, args.top_k, load_balance_weight=0.0, tuner=tuner
        )
        cost = CostModel(load_cluster(args.cluster), layer.config, world, world)
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
        modes: list[tuple[str, Plan | str]] = [(_label(c), c) for c in FIXED]
        modes += [("layer decides", Plan()), ("auto", "auto")]
        rows = []

        def step(plan: Plan | str, ids: torch.Tensor) -> float:
            layer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            dist.barrier()
            start = time.perf_counter()
            with force_routing(layer, ids):
                layer(xi, plan=plan).sum().backward()
            return _max_over_ranks(time.perf_counter() - start)

        for skew in args.skews:
            ids = _routing(skew, args.tokens, args.experts, args.top_k, seed=1000 * args.seed + rank)
            peaks: dict[str, list[float]] = {}
            for mode, plan in modes:  # warm-up (auto: its search), and each mode's peak memory
                _reset_peak()
                for _ in range(args.tuner_steps if plan == "auto" else 1):
                    step(plan, ids)
                table = torch.zeros(world, dtype=torch.float64)
                table[rank] = _peak_mib()
                dist.all_reduce(table)
                peaks[mode] = table.tolist()
            times: dict[str, list[float]] = {mode: [] for mode, _ in modes}
            predicted: dict[str, list[float]] = {mode: [] for mode, _ in modes}
            last: dict[str, Any] = {}
            for _ in range(args.repeats):  # round-robin: drift on a shared machine hits every mode alike
                for mode, plan in modes:
                    for _ in range(args.settle):  # untimed: the plan's buffers, as in steady training
                        step(plan, ids)
                    times[mode].append(step(plan, ids))
                    stats = layer.stats
                    assert stats is not None
                    counts = stats.routed_per_expert.tolist()
                    used = _candidate(stats.plan)
                    total = args.tokens * world
                    predicted[mode].append(cost.predict(used, counts, total, args.top_k, 0.0, True, x.dtype))
                    last[mode] = stats
            for mode, _ in modes:
                stats = last[mode]
                rows.append(
                    {
                        "skew": skew,
                        "mode": mode,
                        "plan": _label(_candidate(stats.plan)),
                        "step_s": statistics.median(times[mode]),
                        "times_s": times[mode],
                        "predicted_s": statistics.median(predicted[mode]),
                        "max_rows": max(stats.rows_per_rank) if stats.rows_per_rank else None,
                        "native_max_rows": max(stats.native_rows_per_rank)
                        if stats.native_rows_per_rank
                        else None,
                        "copies": stats.expert_copies,
                        "rerouted": stats.plan.reroute,
                        "peak_mib": peaks[mode],
                        "tuner_phase": stats.tuner.phase if stats.tuner else None,
                    }
                )
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


def _paired(base: dict[str, Any], row: dict[str, Any]) -> float:
    """Median over rounds of ``base``'s time over ``row``'s in the same round.

    The modes of one round run back to back, so a ratio within a round cancels the
    machine's drift between rounds (which a ratio of medians does not).
    """
    return statistics.median(b / t for b, t in zip(base["times_s"], row["times_s"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--skews", nargs="+", default=["uniform", "zipf1.2", "extreme"])
    parser.add_argument("--repeats", type=int, default=7, help="rounds (one step of every mode each)")
    parser.add_argument(
        "--settle", type=int, default=1, help="untimed steps of a mode before its timed step in each round"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tuner-steps", type=int, default=24, help="calls auto runs before it is timed (its search)"
    )
    parser.add_argument(
        "--cluster", default="this-machine", help="the cost model's machine (default: calibrated)"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="calibrate this machine first (flexmoe calibrate)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.calibrate or (args.cluster == "this-machine" and not default_calibration_path().exists()):
        print("calibrating this machine ...", flush=True)
        calibrate(workers=args.world, layer=(args.dim, args.hidden), tokens=args.tokens)

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, args.world, init_file, args, results))
            for r in range(args.world)
        ]
        for proc in procs:
            proc.start()
        rows = results.get(timeout=3600)
        for proc in procs:
            proc.join()

    print(
        f"MoE layer: dim {args.dim}, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, SwiGLU, "
        f"fp32, {args.tokens} tokens per rank, forward+backward; {args.world} gloo processes, 1 thread each"
    )
    header = (
        f"{'skew':9s} {'mode':17s} {'plan':17s} {'step ms':>8s} {'pred ms':>8s} {'error':>6s} "
        f"{'vs plain':>8s} {'paired':>6s} {'max rows':>8s} {'copies':>6s}  peak MiB per rank"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        plain = next(r for r in rows if r["skew"] == row["skew"] and r["mode"] == "plain EP")
        peaks = " ".join(f"{p:7.0f}" for p in row["peak_mib"])
        error = row["predicted_s"] / row["step_s"] - 1
        print(
            f"{row['skew']:9s} {row['mode']:17s} {row['plan']:17s} {row['step_s'] * 1e3:8.1f} "
            f"{row['predicted_s'] * 1e3:8.1f} {100 * error:+5.0f}% {plain['step_s'] / row['step_s']:7.2f}x "
            f"{_paired(plain, row):5.2f}x "
            f"{row['max_rows'] if row['max_rows'] is not None else '-':>8} {row['copies']:6d}  {peaks}"
        )
    print()
    for skew in args.skews:
        of = [r for r in rows if r["skew"] == skew]
        fixed = [r for r in of if r["mode"] not in ("auto", "layer decides")]
        best = min(fixed, key=lambda r: r["step_s"])
        auto = next(r for r in of if r["mode"] == "auto")
        plain = next(r for r in of if r["mode"] == "plain EP")
        reroute = next(r for r in of if r["mode"] == "r=1 d=1 flat +reroute")
        shadow = next(r for r in of if r["mode"] == "r=1 d=1 flat +shadow")
        decides = next(r for r in of if r["mode"] == "layer decides")
        print(
            f"{skew:9s} auto chose {auto['plan']}: {best['step_s'] / auto['step_s']:.2f}x the best "
            f"fixed plan ({best['mode']}; paired {_paired(best, auto):.2f}x), "
            f"{plain['step_s'] / auto['step_s']:.2f}x plain EP (paired {_paired(plain, auto):.2f}x)"
        )
        print(
            f"{'':9s} vs plain EP: least-loaded rerouting {plain['step_s'] / reroute['step_s']:.2f}x "
            f"(paired {_paired(plain, reroute):.2f}x), shadowing {plain['step_s'] / shadow['step_s']:.2f}x "
            f"(paired {_paired(plain, shadow):.2f}x), the layer's decision ({decides['plan']}) "
            f"{plain['step_s'] / decides['step_s']:.2f}x (paired {_paired(plain, decides):.2f}x)"
        )
    errors = [abs(r["predicted_s"] / r["step_s"] - 1) for r in rows]
    print(f"cost model: median |error| {100 * statistics.median(errors):.0f}%, max {100 * max(errors):.0f}%")
    write_json(args.json, {"args": vars(args), "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
