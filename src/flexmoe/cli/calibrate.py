"""``flexmoe calibrate``: measure this machine for the planner and store it.

flexmoe calibrate                 # 2 local gloo processes, stored in the user cache
flexmoe plan --cluster this-machine --devices 4 --dim 256 --hidden 512 --experts 8 ...
"""

from __future__ import annotations

import argparse
import time

from flexmoe.cli.options import int_in
from flexmoe.cli.train_config import MAX_WORKERS
from flexmoe.planner.cluster import default_calibration_path
from flexmoe.tools.calibrate import DEFAULT_LAYER, calibrate

__all__ = ["add_calibrate_arguments", "run_calibrate"]


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the calibrate command's options."""
    parser.add_argument(
        "--workers", type=int_in(2, MAX_WORKERS), default=2, help="local processes measuring at once"
    )
    parser.add_argument(
        "--rounds", type=int_in(1), default=5, help="repeats of every probe (medians are kept)"
    )
    parser.add_argument(
        "--dim", type=int_in(1), default=DEFAULT_LAYER[0], help="width of the small layer fitted"
    )
    parser.add_argument(
        "--hidden", type=int_in(1), default=DEFAULT_LAYER[1], help="expert hidden dim of that layer"
    )
    parser.add_argument("--tokens", type=int_in(1), default=128, help="tokens per process of that layer")
    parser.add_argument(
        "--output", default=None, help=f"where to write (default {default_calibration_path()})"
    )


def run_calibrate(args: argparse.Namespace) -> None:
    """Measure, store and summarise."""
    started = time.perf_counter()
    path = args.output or default_calibration_path()
    cluster = calibrate(
        args.workers, path, rounds=args.rounds, layer=(args.dim, args.hidden), tokens=args.tokens
    )
    d, link = cluster.device, cluster.intra_node
    print(f"measured on {args.workers} processes in {time.perf_counter() - started:.1f} s: {d.name}")
    print(
        f"  GEMM fp32 {d.flops['fp32'] / 1e9:.1f} GFLOP/s per core (bf16 {d.flops['bf16'] / 1e9:.2f}), "
        f"half rate at {d.gemm_half_rows:.0f} rows, {d.gemm_efficiency:.0%} of it inside a layer, "
        f"x{d.solo_speedup:.2f} alone; "
        f"memory {d.memory_bandwidth / 1e9:.1f} GB/s; SiLU {(d.elementwise_rate or 0) / 1e9:.2f} Gelem/s"
    )
    print(
        f"  all-to-all: {link.latency * 1e6:.0f} us per message, {link.bandwidth / 1e9:.2f} GB/s per rank; "
        f"{cluster.compute_slots_per_node} cores"
    )
    print(
        f"  runtime: {cluster.collective_overhead * 1e3:.2f} ms per collective, "
        f"{cluster.step_overhead * 1e3:.2f} ms "
        f"per step, {cluster.chunk_overhead * 1e3:.2f} ms per chunk, {d.op_overhead * 1e6:.1f} us per op; "
        f"overlap efficiency {cluster.overlap_efficiency:.2f}"
    )
    print(f"wrote {path}")
