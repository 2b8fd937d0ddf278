"""The kept process groups of ``RankPools`` fail a test the way ``run_distributed`` does.

A rank's assertion reaches the test with that rank's traceback, a rank that never
answers fails the test after the deadline, and the next call after either runs on fresh
processes (a rank may have been stuck in a collective).
"""

from __future__ import annotations

import os
import time

import pytest

from .distributed import RankPools
from .parallel_workers import check_exchange

pytestmark = pytest.mark.distributed


def _exchange_pid(rank: int, world: int) -> int:
    """The group works (the flat and 2DH exchanges agree); this rank's process id."""
    check_exchange(rank, world, [1])
    return os.getpid()


def _fail_on_rank_one(rank: int, world: int) -> None:
    assert rank != 1, "rank 1 disagrees"


def _hang_on_rank_zero(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(60)


def test_a_failed_or_hung_call_fails_and_the_next_starts_fresh_processes():
    pools = RankPools()
    try:
        first = pools.run(_exchange_pid, 2)
        assert pools.run(_exchange_pid, 2) == first  # kept: the same processes
        with pytest.raises(AssertionError, match=r"(?s)rank 1 of 2 failed:.*rank 1 disagrees"):
            pools.run(_fail_on_rank_one, 2)
        after_failure = pools.run(_exchange_pid, 2)
        assert set(after_failure).isdisjoint(first)
        with pytest.raises(AssertionError, match=r"ranks \[0\] did not finish within 2 s"):
            pools.run(_hang_on_rank_zero, 2, timeout=2)
        assert set(pools.run(_exchange_pid, 2)).isdisjoint(after_failure)
    finally:
        pools.close()
