"""Run a function on ``W`` gloo processes on this machine, with a deadline and clean teardown.

Rendezvous is a file store in a fresh temporary directory (no ports to collide on);
each worker's exception (with its traceback) is re-raised in the test; a worker that
does not finish within the deadline is killed and the test fails naming it.

``run_distributed`` starts a fresh set of processes for one call. ``RankPools`` keeps a
set per world size between calls, which saves the start-up of every call after the
first (spawning, importing torch and flexmoe, joining the group: about 3 s of CPU per
rank on the 2-core CI machine); the ``rank_pools`` fixture (``conftest``) holds one.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _init_worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, init_file: str, args: tuple[Any, ...], results: Any
) -> None:
    try:
        _init_worker(rank, world_size, init_file)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, "error", traceback.format_exc()))


def _serve(rank: int, world_size: int, init_file: str, tasks: Any, results: Any) -> None:
    """A pooled rank: joins the group once, then runs ``(fn, args)`` tasks until ``None``."""
    try:
        _init_worker(rank, world_size, init_file)
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while (task := tasks.get()) is not None:
        fn, args = task
        if "torch._dynamo" in sys.modules:  # no compiled code (or recompile budget) from an earlier task
            torch._dynamo.reset()
        try:
            value = fn(rank, world_size, *args)
            # The next task needs the group: a function that ends it belongs in run_distributed.
            assert dist.is_initialized(), f"{fn.__name__} destroyed the pooled process group"
            results.put((rank, "ok", value))
        except BaseException:  # report everything, including assertion failures
            results.put((rank, "error", traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


def _collect(results: Any, world_size: int, timeout: float) -> dict[int, tuple[str, Any]]:
    """Each rank's ``(status, value)``, stopping at the first error (the others may be stuck)."""
    outcomes: dict[int, tuple[str, Any]] = {}
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
    return outcomes


def _values(outcomes: dict[int, tuple[str, Any]], world_size: int) -> list[Any]:
    """The ranks' return values, or the first failed rank's traceback as an ``AssertionError``."""
    errors = [(r, v) for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if errors:
        rank, trace = errors[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{trace}")
    return [outcomes[r][1] for r in range(world_size)]


def _stop(procs: list[Any], grace: float) -> None:
    for proc in procs:
        proc.join(timeout=grace)
        if proc.is_alive():
            proc.kill()
            proc.join()


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
            outcomes = _collect(results, world_size, timeout)
        finally:
            _stop(procs, grace=5 if len(outcomes) == world_size else 0.5)
    return _values(outcomes, world_size)


class _RankPool:
    """``world_size`` gloo processes waiting for tasks (see ``RankPools``)."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self.tmp.name, "store")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_serve, args=(rank, world_size, init_file, self.tasks[rank], self.results), daemon=True
            )
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float
    ) -> dict[int, tuple[str, Any]]:
        for tasks in self.tasks:
            tasks.put((fn, args))
        return _collect(self.results, self.world_size, timeout)

    def close(self, clean: bool) -> None:
        if clean:
            for tasks in self.tasks:
                tasks.put(None)
        _stop(self.procs, grace=5 if clean else 0)
        self.tmp.cleanup()


class RankPools:
    """``run_distributed`` on sets of processes kept between calls, one set per world size.

    Each call still runs ``fn`` on every rank of one group and checks every rank's result
    the same way. After a failed or timed-out call the set is ended (a rank may be stuck
    in a collective) and the next call starts a fresh one. Between calls each rank resets
    ``torch._dynamo``; anything else a function leaves in its process (seeds, caches) the
    next one sees, so each checking function sets up what it relies on, as it already
    must within one call.
    """

    def __init__(self) -> None:
        self.pools: dict[int, _RankPool] = {}

    def run(self, fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
        """``fn(rank, world_size, *args)`` on every rank; returns the ranks' return values."""
        if world_size not in self.pools:
            self.pools[world_size] = _RankPool(world_size)
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            outcomes = self.pools[world_size].run(fn, args, timeout)
        finally:
            if len(outcomes) < world_size or any(s == "error" for s, _ in outcomes.values()):
                self.pools.pop(world_size).close(clean=False)
        return _values(outcomes, world_size)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close(clean=True)
        self.pools.clear()
