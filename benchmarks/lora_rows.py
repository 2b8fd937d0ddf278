"""The LoRA terms of a multi-adapter batch on CPU: the C kernel against the ``embedding_bag`` form.

One LoRA stack of ``--slots`` (adapter, expert) slots at rank ``--rank`` (Poisson rows per
slot around each ``--rows-per-slot``), for the first projection (``dim -> 2 hidden``, into a
``[2, N, hidden]`` pre-activation) and the second (``hidden -> dim``), in fp32 and bf16.
Contestants, in interleaved rounds: ``flexmoe.experts.lora_rows.lora_add`` (each slot's factors
read once for its rows, summed into the output in place) and ``bagged_lora`` plus the
``index_add_`` that puts its terms back (the form used under autograd). Printed: median
ms, the kernel's GFLOP/s, and the paired speedup.

    python benchmarks/lora_rows.py
    python benchmarks/lora_rows.py --rank 64 --rows-per-slot 8 --json lora.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexmoe.adapters.woven import Groups, bag_layout, bagged_lora
from flexmoe.experts.kernels import available
from flexmoe.experts.lora_rows import lora_add
from harness import environment, measure_interleaved, write_json


def one_case(slots: int, per_slot: float, rank: int, width_in: int, blocks: int, width: int, dtype) -> dict:
    """Time both forms on one stack; returns the medians and the paired speedup."""
    generator = np.random.default_rng(0)
    counts = generator.poisson(per_slot, slots).astype(np.int64)
    n = int(counts.sum())
    N = 2 * n + 1
    rows_n = torch.sort(torch.randperm(N)[:n]).values
    A, B = bag_layout(
        torch.randn(slots, rank, width_in).to(dtype), torch.randn(slots, blocks * width, rank).to(dtype)
    )
    x = torch.randn(N, width_in).to(dtype)
    out = torch.zeros(blocks, N, width, dtype=dtype)
    groups = Groups(counts, torch.from_numpy(counts))

    def kernel() -> None:
        lora_add(x, rows_n, counts, A, B, out)

    def bagged() -> None:
        delta = bagged_lora(x, rows_n, A, B, groups)
        out.index_add_(1, rows_n, delta.view(-1, blocks, width).transpose(0, 1))

    timings = measure_interleaved({"kernel": kernel, "bagged": bagged}, warmup=2, repeats=21)
    flops = 2 * n * rank * (width_in + blocks * width)
    speedup = timings["kernel"].paired_speedup(timings["bagged"])
    name = f"{str(dtype).removeprefix('torch.')} {width_in} -> {blocks * width}, {n} rows over {slots} slots"
    print(
        f"{name}: kernel {timings['kernel'].median * 1e3:.3f} ms "
        f"({flops / timings['kernel'].median / 1e9:.1f} GFLOP/s), "
        f"bagged {timings['bagged'].median * 1e3:.3f} ms, kernel {speedup:.2f}x faster (paired)"
    )
    return {"case": name, "kernel": timings["kernel"], "bagged": timings["bagged"], "speedup": speedup}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, default=640, help="10 adapters x 64 experts")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--rows-per-slot", type=float, nargs="+", default=[8.0, 1.0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not available():
        raise SystemExit("the CPU kernels are not available here (AVX512-BF16 and a C compiler needed)")
    print(environment())
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for per_slot in args.rows_per_slot:
            results.append(one_case(args.slots, per_slot, args.rank, args.dim, 2, args.hidden, dtype))
            results.append(one_case(args.slots, per_slot, args.rank, args.hidden, 1, args.dim, dtype))
    write_json(args.json, {"environment": environment(), "lora_rows": results})


if __name__ == "__main__":
    main()
