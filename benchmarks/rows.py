"""How fast a few bf16 rows multiply a weight larger than the caches, per kernel and row count.

For each row count, in interleaved rounds over ``--weights`` weights of ``--shape``
(together far larger than the caches, so every product streams its weight from memory):
PyTorch's sum over the same bytes (how fast PyTorch streams them: the reference; a
kernel that prefetches ahead can read faster), flexmoe's row kernels on AMX tiles and on
the vector units (``flexmoe.experts.rows``; the vector kernels take up to 2 rows),
oneDNN's matmul on packed weights (``prepare_for_inference``) and ``F.linear`` on the
plain weights. Printed: GB/s of weight read (median over rounds) and each kernel's
rate as a share of the sum's.

    python benchmarks/rows.py
    python benchmarks/rows.py --rows 1 4 16 --shape 1536 2048 --json rows.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexmoe.experts.kernels import available, bf16_max_rows, set_tile_kernels, tile_kernels
from flexmoe.experts.packed import PackedWeight, packed_inference_supported, packed_linear
from flexmoe.experts.rows import rows_bf16
from harness import environment, measure_interleaved, write_json

VECTOR_ROWS = 2  # the most rows the vector kernels take

Product = Callable[[torch.Tensor, int], Any]  # rows, the weight's index -> the product


def on_tiles(tiles: bool, weights: list[torch.Tensor]) -> Product:
    """``rows_bf16`` with the tile kernels switched on or off for the call."""

    def run(x: torch.Tensor, index: int) -> torch.Tensor:
        before = tile_kernels()
        set_tile_kernels(tiles)
        try:
            return rows_bf16(x, weights[index])
        finally:
            set_tile_kernels(before)

    return run


def contestants(
    rows: int, weights: list[torch.Tensor], packed: list[PackedWeight] | None
) -> dict[str, Product]:
    """The products that take ``rows`` rows here, by name (``sum`` first: the reference)."""
    products: dict[str, Product] = {"sum": lambda x, i: weights[i].view(torch.float32).sum()}
    if tile_kernels():
        products["tiles"] = on_tiles(True, weights)
    if rows <= VECTOR_ROWS:
        products["vector"] = on_tiles(False, weights)
    if packed is not None:
        products["packed"] = lambda x, i: packed_linear(x, packed[i])
    products["linear"] = lambda x, i: F.linear(x, weights[i])
    return products


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32])
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 2048], help="O I of each weight")
    parser.add_argument("--weights", type=int, default=40, help="weights per round (far beyond the caches)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not available():
        raise SystemExit("the row kernels need a Linux CPU with AVX512-BF16 and a C compiler")
    set_tile_kernels(True)
    if any(r < 1 or r > bf16_max_rows() for r in args.rows):
        raise SystemExit(f"--rows must lie in 1..{bf16_max_rows()} here, got {args.rows}")
    torch.manual_seed(0)
    outputs, inputs = args.shape
    weights = [torch.randn(outputs, inputs).to(torch.bfloat16) for _ in range(args.weights)]
    can_pack = packed_inference_supported(torch.device("cpu"), torch.bfloat16)
    packed = [PackedWeight.pack(w) for w in weights] if can_pack else None
    gigabytes = args.weights * outputs * inputs * 2 / 1e9
    print(environment())
    print(f"{args.weights} weights [{outputs}, {inputs}] bf16, {gigabytes:.2f} GB a round")
    print(f"AMX tile kernels: {tile_kernels()}")
    results: dict[str, dict[str, float]] = {}
    for rows in args.rows:
        x = torch.randn(rows, inputs).to(torch.bfloat16)
        rounds = {
            name: (lambda product=product, x=x: [product(x, i) for i in range(len(weights))])
            for name, product in contestants(rows, weights, packed).items()
        }
        timings = measure_interleaved(rounds, repeats=args.repeats)
        rates = {name: gigabytes / timing.median for name, timing in timings.items()}
        results[str(rows)] = rates
        reference = rates["sum"]
        shares = "  ".join(f"{name} {rate:5.1f} ({rate / reference:4.0%})" for name, rate in rates.items())
        print(f"rows {rows:2d}, GB/s (share of the sum's): {shares}", flush=True)
    write_json(args.json, {"environment": environment(), "shape": args.shape, "rates_gb_s": results})


if __name__ == "__main__":
    main()
