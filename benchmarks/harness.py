"""The one timing harness every benchmark uses: warm-up, repeated runs, median/min/max.

Also measures the machine's own limits in the same process (dense-GEMM throughput,
memory read bandwidth), so that every script can print ratios taken in one run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Timing:
    median: float
    min: float
    max: float
    repeats: int
    samples: list[float] = field(default_factory=list)  # per round, in round order

    def paired_speedup(self, other: Timing) -> float:
        """Median over rounds of ``other / self`` (rounds interleaved: drift cancels per pair)."""
        return statistics.median(o / s for o, s in zip(other.samples, self.samples, strict=True))

    def __str__(self) -> str:
        spread = f"min {self.min * 1e3:.2f}, max {self.max * 1e3:.2f}"
        return f"{self.median * 1e3:9.2f} ms ({spread}, n={self.repeats})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 7, device: torch.device | None = None
) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | None = None,
) -> dict[str, Timing]:
    """Time several candidates round-robin, so that clock-speed drift hits all alike."""
    device = device or torch.device("cpu")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), max(t), len(t), t) for name, t in samples.items()}


@dataclass
class MachineLimits:
    gemm_flops: float  # dense fp32 GEMM FLOP/s (square, size below)
    gemm_size: int
    read_bandwidth: float  # bytes/s, streaming reduction over a buffer far larger than cache
    dtype: str = "fp32"  # of the GEMM

    def describe(self) -> str:
        return (
            f"dense GEMM {self.gemm_flops / 1e9:.1f} GFLOP/s ({self.dtype} {self.gemm_size}^3), "
            f"read bandwidth {self.read_bandwidth / 1e9:.1f} GB/s"
        )


def machine_limits(
    device: torch.device | None = None, dtype: torch.dtype = torch.float32, size: int = 2048
) -> MachineLimits:
    """Measure the dense-GEMM throughput and read bandwidth of this machine, now."""
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    gemm = measure(lambda: torch.mm(a, b, out=out), warmup=3, repeats=9, device=device)
    buffer = torch.ones(64 * 1024 * 1024, device=device, dtype=torch.float32)  # 256 MiB
    read = measure(lambda: buffer.sum(), warmup=2, repeats=9, device=device)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return MachineLimits(2 * size**3 / gemm.median, size, buffer.numel() * 4 / read.median, name)


def environment() -> dict[str, Any]:
    """Hardware and versions, to print next to every result."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(
            json.dumps(
                payload,
                indent=2,
                default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o),
            )
        )
        print(f"wrote {path}")
