"""Skewed routing on 2 worker processes: plain expert parallelism vs least-loaded rerouting vs automatic.

Routing is forced to a skew with the router's selection bias (it changes which experts
are chosen, never the weights): ``uniform``, ``zipf1.2`` (log-weights ``-1.2 log(e+1)``
added to the scores: expert ``e`` preferred roughly like ``(e+1)^-1.2``) and ``extreme``
(every token chooses experts 0 and 1, both on rank 0). For
each skew and each mode (``Plan(reroute=False)``, ``True``, ``None`` = the layer
decides), prints in one run: the median training-step time (slowest rank), the rows
the busiest rank computed, the copies sent, each rank's peak resident memory during
those steps (Linux VmHWM, reset before each mode), and the speed-up over plain EP.

    python benchmarks/skew.py                # 2 processes, one per core
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

from flexmoe import MoELayer, Plan, RouterConfig
from harness import environment, write_json

MODES = {"plain EP": False, "rerouting": True, "auto": None}


def _skew_bias(name: str, num_experts: int) -> torch.Tensor:
    if name == "uniform":
        return torch.zeros(num_experts)
    if name == "extreme":  # every token chooses experts 0 and 1: all rows on rank 0 (with >= 2 per rank)
        return torch.tensor([100.0, 100.0] + [0.0] * (num_experts - 2))
    s = float(name.removeprefix("zipf"))
    # Log-weights added to the sigmoid scores: expert e is preferred roughly like (e+1)^-s.
    return -s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))


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


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(args.seed)
        router = RouterConfig(kind="sigmoid", selection_bias=True)
        layer = MoELayer(
            args.dim, args.hidden, args.experts, args.top_k, router=router, load_balance_weight=0.0
        )
        x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
        rows = []
        for skew in args.skews:
            with torch.no_grad():
                layer.router.expert_bias_E.copy_(_skew_bias(skew, args.experts))
            for mode, reroute in MODES.items():
                plan = Plan(reroute=reroute)
                times = []
                _reset_peak()
                for i in range(args.repeats + 1):
                    layer.zero_grad(set_to_none=True)
                    xi = x.clone().requires_grad_()
                    dist.barrier()
                    start = time.perf_counter()
                    layer(xi, plan=plan).sum().backward()
                    elapsed = _max_over_ranks(time.perf_counter() - start)
                    if i > 0:
                        times.append(elapsed)
                stats = layer.stats
                assert stats is not None and stats.rows_per_rank is not None
                peaks = [0.0] * world
                peaks[rank] = _peak_mib()
                table = torch.tensor(peaks, dtype=torch.float64)
                dist.all_reduce(table)
                rows.append(
                    {
                        "skew": skew,
                        "mode": mode,
                        "step_s": statistics.median(times),
                        "max_rows": max(stats.rows_per_rank),
                        "native_max_rows": max(stats.native_rows_per_rank or stats.rows_per_rank),
                        "copies": stats.expert_copies,
                        "rerouted": bool(stats.plan.reroute),
                        "peak_mib": table.tolist(),
                    }
                )
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

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
        f"{'skew':9s} {'mode':10s} {'step ms':>9s} {'vs plain':>8s} {'max rows':>9s} {'(plain)':>8s} "
        f"{'copies':>6s} {'rerouted':>8s}  peak MiB per rank"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        plain = next(r for r in rows if r["skew"] == row["skew"] and r["mode"] == "plain EP")
        peaks = " ".join(f"{p:7.0f}" for p in row["peak_mib"])
        print(
            f"{row['skew']:9s} {row['mode']:10s} {row['step_s'] * 1e3:9.1f} "
            f"{plain['step_s'] / row['step_s']:7.2f}x {row['max_rows']:9d} {row['native_max_rows']:8d} "
            f"{row['copies']:6d} {row['rerouted']!s:>8s}  {peaks}"
        )
    write_json(args.json, {"args": vars(args), "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
