"""Run a function on ``W`` gloo processes on this machine, with a deadline and clean teardown.

Rendezvous is a file store in a fresh temporary directory (no ports to collide on);
each worker's exception (with its traceback) is re-raised in the test; a worker that
does not finish within the deadline is killed and the test fails naming it.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, init_file: str, args: tuple[Any, ...], results: Any
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns the ranks' return values."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, init_file, args, results), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcomes) < world_size:
                try:
                    rank, status, value = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise AssertionError(
                        f"ranks {missing} did not finish within {timeout} s; "
                        f"finished: {[(r, s) for r, (s, _) in sorted(outcomes.items())]}"
                    ) from None
                outcomes[rank] = (status, value)
                if status == "error":
                    break
        finally:
            for proc in procs:
                proc.join(timeout=5 if len(outcomes) == world_size else 0.5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    errors = [(r, v) for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if errors:
        rank, trace = errors[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{trace}")
    return [outcomes[r][1] for r in range(world_size)]
