"""Running per-expert work over the segments of an expert-major buffer.

Legend: a segment is ``(expert, start_row, end_row)``.

On a multi-core CPU, many small GEMMs run faster as whole GEMMs on separate cores
(each single-threaded) than one after another with every GEMM split across the
cores: no per-GEMM synchronisation, and each core streams its own weights (on a
2-core CPU, 64 experts of 256 rows: 113 -> 134 GFLOP/s; decode-sized segments of about
4 rows: 8 -> 12 GB/s of weights; ``benchmarks/layer.py``). With few or very uneven
segments the per-GEMM parallelism of the BLAS library is better, so the runner only
spreads work over threads when the segments balance well.

The threads are PyTorch's own OpenMP threads (``flexmoe.experts.kernels.on_team``) where
the kernel library runs. Threads of our own would share the cores with the OpenMP
workers, which keep spinning after each parallel op. Measured paired on a 2-core CPU,
against a pool of Python threads: an fp32 decode step of a small MoE model (many short
ops) 40 % faster, its prefill 10-15 % faster; bf16 training steps (``benchmarks/layer.py``
A and B) 4-7 % and 19 % faster, spread rather than one GEMM at a time over both
cores; a bf16 forward of B on oneDNN-packed weights 32 % faster. Where the team cannot
run, the pool of Python threads does the work; in bf16 and fp16 it leaves segments
averaging ``serial_16bit_rows`` rows or more to run one after another on both cores,
which is faster there than sharing the cores with the spinning workers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from flexmoe.experts.kernels import on_team
from flexmoe.threads import set_thread_intraop_threads

__all__ = ["SERIAL_16BIT_ROWS", "for_each_segment", "segments_of"]

Segment = tuple[int, int, int]

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_BALANCE_SLACK = 1.15  # accept a makespan at most 15 % above the ideal even split


def segments_of(counts: list[int]) -> list[Segment]:
    """``(expert, start, end)`` of every non-empty segment, in order."""
    segments = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            segments.append((e, start, start + n))
            start += n
    return segments


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexmoe-experts")
        return _pool


def _balances(segments: list[Segment], threads: int) -> bool:
    """Whether a largest-first greedy split over ``threads`` is close to an even split."""
    loads = [0] * threads
    for _, s, t in sorted(segments, key=lambda seg: seg[1] - seg[2]):
        loads[loads.index(min(loads))] += t - s
    return max(loads) <= _BALANCE_SLACK * sum(loads) / threads


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
SERIAL_16BIT_ROWS = 16  # without the OpenMP team only: see the module docstring


def for_each_segment(
    segments: list[Segment],
    work: Callable[[int, int, int], object],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    serial_16bit_rows: int = SERIAL_16BIT_ROWS,
) -> None:
    """Call ``work(expert, start, end)`` for every segment; in parallel where it pays.

    ``work`` must only write rows ``[start, end)`` or expert ``e``'s own outputs, so
    that segments are independent. ``dtype``: what its GEMMs compute in;
    ``serial_16bit_rows``: where the work cannot run on PyTorch's OpenMP team, 16-bit
    segments averaging this many rows or more run one after another.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(segments) < 2 * threads or not _balances(segments, threads):
        for segment in segments:
            work(*segment)
        return
    queue = iter(sorted(segments, key=lambda seg: seg[1] - seg[2]))  # largest first
    queue_lock = threading.Lock()
    # Grad and inference modes are thread-local: carry the caller's over.
    grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drain() -> None:
        set_thread_intraop_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
            while True:
                with queue_lock:
                    segment = next(queue, None)
                if segment is None:
                    return
                work(*segment)

    try:
        if on_team(drain, threads):
            return
        rows = sum(t - s for _, s, t in segments)
        if dtype in _SIXTEEN_BIT and rows >= serial_16bit_rows * len(segments):
            for segment in segments:
                work(*segment)
            return
        helpers = [_executor(threads - 1).submit(drain) for _ in range(threads - 1)]
        try:
            drain()
        finally:
            for helper in helpers:
                helper.result()
    finally:
        set_thread_intraop_threads(threads)
