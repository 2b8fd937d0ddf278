"""Run a function on ``W`` local worker processes joined in a gloo group, with a deadline.

The planner's measurements (``flexmoe calibrate``, measured plan times) need a few
processes on this machine. Workers are forked from a fork server (fresh, single-threaded,
with torch and flexmoe imported once) through ``torch.multiprocessing``, join
the default process group through ``flexmoe.parallel.init_distributed`` (the same
environment ``torchrun`` sets, on a free local port), run ``fn(rank, world, *args)``
with one compute thread, and report their result or their traceback. A worker that
dies or misses the deadline makes the call raise, naming it; the others are killed.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from flexmoe.parallel import init_distributed, shutdown

__all__ = ["WorkerError", "run_local"]


class WorkerError(RuntimeError):
    """A local worker failed or did not finish in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...], results: Any
) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    try:
        init_distributed(timeout_s=120)
        try:
            value = fn(rank, world, *args)
        finally:
            shutdown()
        results.put((rank, "ok", value))
    except BaseException:  # report everything to the parent, which raises
        results.put((rank, "error", traceback.format_exc()))


def run_local(fn: Callable[..., Any], workers: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, workers, *args)`` on ``workers`` local processes; the ranks' return values.

    ``fn`` must be a module-level function (it is pickled into spawned processes), and
    a script calling this must guard its entry point with ``if __name__ == "__main__"``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    # A fork server imports torch and flexmoe once and forks the workers from it: starting
    # four fresh interpreters that each import torch takes ~15 s on a busy 2-core machine.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["flexmoe.tools.local"])
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, workers, port, args, results), daemon=True)
        for rank in range(workers)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < workers:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None]
                if dead:
                    raise WorkerError(f"local workers {dead} exited without a result") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(workers)) - set(outcomes))
                    raise WorkerError(f"local workers {missing} did not finish within {timeout} s") from None
                continue
            outcomes[rank] = (status, value)
            if status == "error":
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outcomes) == workers else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [(r, v) for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if errors:
        rank, trace = errors[0]
        raise WorkerError(f"local worker {rank} of {workers} failed:\n{trace}")
    return [outcomes[r][1] for r in range(workers)]
