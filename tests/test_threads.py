"""flexmoe.threads: background threads run PyTorch ops on one thread without changing anyone else's count."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from flexmoe.experts import kernels, segments
from flexmoe.experts.cache import ExpertCache, ExpertKey, ExpertWeights
from flexmoe.experts.segments import for_each_segment, segments_of
from flexmoe.parallel.comm import Communicator
from flexmoe.threads import one_thread_worker, set_thread_intraop_threads

T = TypeVar("T")
OPENMP = "OpenMP" in torch.__config__.parallel_info()


def in_new_thread(fn: Callable[[], T]) -> T:
    """``fn()`` run on a thread started for it."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def set_then_count() -> int:
    one_thread_worker()
    return torch.get_num_threads()


def test_sets_the_calling_thread_only(two_threads):
    assert in_new_thread(set_then_count) == 1
    assert torch.get_num_threads() == 2
    if OPENMP:  # what new threads start with is untouched (with OpenMP: a per-thread value)
        assert in_new_thread(torch.get_num_threads) == 2


def test_restores_a_larger_count(two_threads):
    def down_and_up() -> tuple[int, int]:
        set_thread_intraop_threads(1)
        one = torch.get_num_threads()
        set_thread_intraop_threads(2)
        return one, torch.get_num_threads()

    assert in_new_thread(down_and_up) == (1, 2)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "1"])
def test_bad_thread_counts_are_refused(threads):
    with pytest.raises(ValueError, match=r"threads must be an int >= 1, got"):
        set_thread_intraop_threads(threads)


class CountingStore:
    """One expert of 48 bytes per key; notes the thread count each read ran with."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def nbytes(self, key: ExpertKey) -> int:
        return 48

    def read(self, key: ExpertKey) -> ExpertWeights:
        self.counts.append(torch.get_num_threads())
        return torch.zeros(4, 2), torch.zeros(2, 2)


def test_expert_cache_reads_on_one_thread(two_threads):
    store = CountingStore()
    cache = ExpertCache(store, 2, None, prefetch=True)
    cache.prefetch(0, [0, 1])
    for _ in cache.use(0, [0, 1]):  # waits for the reads
        pass
    cache.close()
    assert store.counts == [1, 1]
    assert torch.get_num_threads() == 2


def test_communicator_thread_runs_on_one_thread(two_threads):
    communicator = Communicator(None, "layer", timeout=10.0)
    try:
        assert communicator.run(torch.get_num_threads, "count") == 1
    finally:
        communicator.close()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("team", [True, False], ids=["openmp-team", "python-pool"])
def test_segment_workers_run_on_one_thread(two_threads, team, monkeypatch):
    if team and not (kernels.available() and OPENMP):
        pytest.skip("no kernel library or no OpenMP here: the Python pool is the only path")
    if not team:
        monkeypatch.setattr(segments, "on_team", lambda work, threads: False)
    counts: dict[int, set[int]] = {}
    names = set()
    lock = threading.Lock()
    both = threading.Event()  # each thread's first segment waits for the other thread to arrive

    def work(expert: int, start: int, end: int) -> None:
        with lock:
            counts.setdefault(threading.get_ident(), set()).add(torch.get_num_threads())
            names.add(threading.current_thread().name)
            if len(counts) == 2:
                both.set()
        both.wait(timeout=10)

    for_each_segment(segments_of([5] * 16), work, torch.device("cpu"))
    assert len(counts) == 2 and both.is_set()  # two threads took part
    assert any(name.startswith("flexmoe-experts") for name in names) is not team  # the pool only without
    assert all(seen == {1} for seen in counts.values())
    assert torch.get_num_threads() == 2
    if OPENMP:
        assert in_new_thread(torch.get_num_threads) == 2


needs_team = pytest.mark.skipif(
    not (kernels.available() and OPENMP), reason="no kernel library or no OpenMP here"
)


@needs_team
def test_team_calls_work_once_per_thread(two_threads):
    seen: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        with lock:
            seen.append(threading.get_ident())

    assert kernels.on_team(work, 2)
    assert len(seen) == 2 and len(set(seen)) == 2 and threading.get_ident() in seen
    assert kernels.on_team(work, 1) and len(seen) == 3 and seen[-1] == threading.get_ident()


@needs_team
def test_team_raises_what_work_raised(two_threads):
    calls = []

    def work() -> None:
        calls.append(1)
        raise KeyError("from a team thread")

    with pytest.raises(KeyError, match="from a team thread"):
        kernels.on_team(work, 2)
    assert len(calls) == 2  # every thread ran before the error came back


@needs_team
def test_segment_errors_come_back_from_the_team(two_threads):
    def work(expert: int, start: int, end: int) -> None:
        if expert == 3:
            raise RuntimeError("expert 3 failed")

    with pytest.raises(RuntimeError, match="expert 3 failed"):
        for_each_segment(segments_of([5] * 16), work, torch.device("cpu"))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads", [0, -2, True, 1.0])
def test_team_refuses_bad_thread_counts(threads):
    with pytest.raises(ValueError, match=r"threads must be an int >= 1, got"):
        kernels.on_team(lambda: None, threads)
