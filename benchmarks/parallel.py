"""Expert-parallel plans on W local gloo processes: bytes sent per rank and step time, per plan.

For every valid plan (r, d in {1, 2, 4}, flat / 2DH exchange) of one MoE layer spread
over ``--world`` processes, prints in one run:
- bytes each rank sends per training step (forward + backward), counted by the
  communicator, and as predicted by the formulas of ``flexmoe.parallel.traffic``;
- the step time (median over repeats of the slowest rank), and its ratio to the
  same layer on one process holding all experts and the whole global batch, and to
  the default plan;
- the machine's own limit: the all-to-all bandwidth between these processes,
  measured in the same run, and the time the counted bytes need at that bandwidth.

This machine's processes share its cores, so step times show the overheads of each
plan rather than multi-node speed-ups; the byte counts are exact at any scale.

    python benchmarks/parallel.py --world 4 --experts 8
    python benchmarks/parallel.py --world 4 --experts 2   # sharded experts: r in {0, 1, 2}
"""

from __future__ import annotations

import argparse
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

from flexmoe import MoELayer, Plan
from flexmoe.parallel.comm import TRAFFIC
from flexmoe.parallel.traffic import predict_traffic
from harness import environment, write_json


def _plans(layer: MoELayer) -> list[Plan]:
    return layer.valid_plans(degrees=(1, 2, 4), exchanges=("flat", "2dh"))


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _a2a_bandwidth(numel: int, repeats: int) -> float:
    """Bytes per second one rank sends in a balanced all-to-all of ``numel`` fp32 per rank."""
    W = dist.get_world_size()
    x = torch.randn(numel // W * W)
    out = torch.empty_like(x)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(out, x)
        times.append(_max_over_ranks(time.perf_counter() - start))
    sent = x.numel() * 4 * (W - 1) / W
    return sent / statistics.median(times[1:])


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(args.seed)
        kwargs = {"load_balance_weight": 0.0, "ranks_per_node": args.ranks_per_node}
        layer = MoELayer(args.dim, args.hidden, args.experts, args.top_k, **kwargs)  # type: ignore[arg-type]
        placement = layer.placement
        assert placement is not None
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
        params = sum(p.numel() for p in layer.experts.parameters())
        rows = []
        for plan in _plans(layer):
            times, sent = [], []
            for i in range(args.repeats + 1):
                layer.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_()
                dist.barrier()
                TRAFFIC.reset()
                start = time.perf_counter()
                layer(xi, plan=plan).sum().backward()
                elapsed = time.perf_counter() - start
                if i > 0:  # the first run warms up
                    times.append(_max_over_ranks(elapsed))
                    sent.append(_mean_over_ranks(TRAFFIC.bytes_sent))
            resolved = layer.resolve_plan(plan)
            predicted = predict_traffic(placement, resolved, args.tokens, args.top_k, args.dim, params, 4)
            rows.append((resolved, statistics.median(times), statistics.median(sent), predicted.total))
        bandwidth = _a2a_bandwidth(1 << 20, 5)
        if rank == 0:
            results.put((rows, bandwidth, layer.resolve_plan(Plan())))
    finally:
        dist.destroy_process_group()


def _single_device(args: argparse.Namespace) -> float:
    """Median fwd+bwd time of the same layer on one process with the global batch."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    layer = MoELayer(args.dim, args.hidden, args.experts, args.top_k, load_balance_weight=0.0, group=False)
    x = torch.randn(args.tokens * args.world, args.dim)
    times = []
    for _ in range(args.repeats + 1):
        xi = x.clone().requires_grad_()
        start = time.perf_counter()
        layer(xi).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2, help="L for the 2DH exchange")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.world < 2:
        raise SystemExit(f"--world must be >= 2, got {args.world}")

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(rank, args.world, init_file, args, results))
            for rank in range(args.world)
        ]
        for proc in procs:
            proc.start()
        rows, bandwidth, default_plan = results.get(timeout=1800)
        for proc in procs:
            proc.join()
    single = _single_device(args)

    print(
        f"MoE layer: dim {args.dim}, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, "
        f"{args.tokens} tokens per rank, fp32; {args.world} gloo processes, {args.ranks_per_node} per 'node'"
    )
    print(
        f"machine: all-to-all bandwidth {bandwidth / 1e9:.2f} GB/s sent per rank (measured here); "
        f"single process, all experts, {args.world * args.tokens} tokens: {single * 1e3:.1f} ms per step"
    )
    default = next(t for plan, t, _, _ in rows if plan == default_plan)
    header = (
        f"{'plan':34s} {'sent MB/rank':>12s} {'predicted':>10s} {'cnt/pred':>8s} "
        f"{'at bw ms':>9s} {'step ms':>9s} {'vs 1 proc':>9s} {'vs default':>10s}"
        f"   (default plan: {default_plan})"
    )
    print(header)
    print("-" * len(header))
    for plan, t, sent, predicted in rows:
        ratio = f"{sent / predicted:8.2f}" if predicted else f"{'-':>8s}"
        print(
            f"{plan!s:34s} {sent / 1e6:12.3f} {predicted / 1e6:10.3f} {ratio} "
            f"{sent / bandwidth * 1e3:9.2f} {t * 1e3:9.1f} {single / t:8.2f}x {default / t:9.2f}x"
        )
    write_json(
        args.json,
        {
            "args": vars(args),
            "environment": environment(),
            "bandwidth_bytes_per_s": bandwidth,
            "single_process_s": single,
            "plans": [
                {"plan": str(p), "step_s": t, "sent_bytes": s, "predicted_bytes": pr} for p, t, s, pr in rows
            ],
        },
    )


if __name__ == "__main__":
    main()
