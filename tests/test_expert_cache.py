"""flexmoe.experts.cache: the budget, each expert served once, LRU against a reference, prediction scores."""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe.experts.cache import ExpertCache, ExpertKey, ExpertWeights

H, D = 4, 2  # each fake expert: w_in [4, 2] and w_out [2, 2] fp32 = 48 bytes
EXPERT_BYTES = (H * D + D * D) * 4


class FakeStore:
    """Experts whose weights encode their key; counts reads and notes the threads that read."""

    def __init__(self, delay: float = 0.0, fail: set[ExpertKey] | None = None) -> None:
        self.reads: Counter[ExpertKey] = Counter()
        self.threads: set[str] = set()
        self.delay = delay
        self.fail = fail or set()
        self.lock = threading.Lock()

    def nbytes(self, key: ExpertKey) -> int:
        return EXPERT_BYTES

    def read(self, key: ExpertKey) -> ExpertWeights:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.reads[key] += 1
            self.threads.add(threading.current_thread().name)
        if key in self.fail:
            raise OSError(f"cannot read {key}")
        value = float(100 * key[0] + key[1])
        return torch.full((H, D), value), torch.full((D, D), value)


def check_stats(cache: ExpertCache) -> None:
    stats = cache.stats
    assert stats.hits + stats.misses == stats.lookups
    assert 0.0 <= stats.prefetch_precision <= 1.0
    assert 0.0 <= stats.prefetch_recall <= 1.0
    assert 0.0 <= stats.hit_rate <= 1.0
    assert stats.prefetch_used <= stats.prefetch_reads <= stats.reads
    if cache.budget_bytes is not None:
        assert stats.peak_resident_bytes <= cache.budget_bytes
    assert stats.resident_bytes == len(cache.resident()) * EXPERT_BYTES


def serve(cache: ExpertCache, layer: int, experts: list[int]) -> list[int]:
    """Use the experts as a layer does; check each one's weights and the budget while it is held."""
    served = []
    for expert, (w_in, w_out) in cache.use(layer, experts):
        assert w_in.shape == (H, D) and w_out.shape == (D, D)
        assert float(w_in[0, 0]) == 100 * layer + expert
        if cache.budget_bytes is not None:
            assert len(cache.resident()) * EXPERT_BYTES <= cache.budget_bytes
        served.append(expert)
    return served


@pytest.mark.parametrize("policy", ["predictive", "lru", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_each_expert_once_within_budget(policy, prefetch):
    store = FakeStore(delay=0.001 if prefetch else 0.0)
    cache = ExpertCache(store, num_layers=3, budget_bytes=3 * EXPERT_BYTES, policy=policy, prefetch=prefetch)
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        for layer in range(3):
            wanted = torch.randperm(8, generator=generator)[: 1 + step % 6].tolist()
            before = Counter(store.reads)
            assert sorted(serve(cache, layer, wanted)) == sorted(wanted)
            demand = {key: n for key, n in (store.reads - before).items() if key[0] == layer}
            assert all(n == 1 for n in demand.values()), "a layer read one of its experts twice"
            if layer < 2:
                cache.prefetch(layer + 1, torch.randperm(8, generator=generator)[:2].tolist())
    cache.close()
    check_stats(cache)
    stats = cache.stats
    assert stats.lookups == sum(1 + step % 6 for step in range(12)) * 3
    assert stats.reads == sum(store.reads.values())
    if prefetch:
        assert any(name.startswith("flexmoe-expert-io") for name in store.threads)


def lru_reference(requests: list[tuple[int, list[int]]], capacity: int) -> tuple[int, list[set[ExpertKey]]]:
    """Hits of an LRU cache of ``capacity`` experts where each call touches its resident experts first."""
    held: OrderedDict[ExpertKey, None] = OrderedDict()
    hits = 0
    contents = []
    for layer, experts in requests:
        keys = [(layer, e) for e in dict.fromkeys(experts)]
        resident = [k for k in keys if k in held]
        hits += len(resident)
        for key in resident + [k for k in keys if k not in held]:
            if key in held:
                held.move_to_end(key)
                continue
            if len(held) == capacity:
                held.popitem(last=False)
            held[key] = None
        contents.append(set(held))
    return hits, contents


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 5),
    requests=st.lists(
        st.tuples(st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1, max_size=6)),
        min_size=1,
        max_size=25,
    ),
)
def test_lru_matches_reference(capacity, requests):
    store = FakeStore()
    cache = ExpertCache(store, 3, capacity * EXPERT_BYTES, policy="lru", prefetch=False)
    hits, contents = lru_reference(requests, capacity)
    for (layer, experts), expected in zip(requests, contents, strict=True):
        assert sorted(serve(cache, layer, experts)) == sorted(set(experts))
        assert cache.resident() == expected
    stats = cache.stats
    assert stats.hits == hits
    assert stats.reads == stats.misses == stats.lookups - hits  # a miss is one read, never two
    check_stats(cache)


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(1, 6),
    policy=st.sampled_from(["predictive", "lru", "lfu"]),
    calls=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.lists(st.integers(0, 7), min_size=1, max_size=8),
            st.lists(st.integers(0, 7), max_size=4),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_budget_and_stats_hold_with_prefetching(capacity, policy, calls):
    store = FakeStore()
    cache = ExpertCache(store, 4, capacity * EXPERT_BYTES, policy=policy, prefetch=True)
    for layer, experts, predicted in calls:
        before = Counter(store.reads)
        assert sorted(serve(cache, layer, experts)) == sorted(set(experts))
        read = store.reads - before
        assert all(read[(layer, e)] <= 1 for e in experts), "an expert the layer needed was evicted"
        cache.wait_for_reads()
        kept = {((layer + 1) % 4, e) for e in predicted} & cache.resident()
        cache.prefetch((layer + 1) % 4, predicted)
        cache.wait_for_reads()
        assert kept <= cache.resident(), "a prefetch evicted a predicted expert"
    cache.close()
    check_stats(cache)
    stats = cache.stats
    assert stats.reads == stats.evictions + len(cache.resident())  # every read expert is held or was evicted


def predictive_reference(
    calls: list[tuple[int, list[int], list[int]]], capacity: int
) -> tuple[int, list[set[ExpertKey]]]:
    """Hits and contents of the predictive policy without background reads, written out plainly.

    Each call ``(layer, experts, predicted)`` uses ``experts`` of ``layer`` (its prediction,
    if any, is then spent), then predicts ``predicted`` for the next layer. A call takes
    its resident experts first, then reads each miss in turn; a read evicts, while the
    budget is full, the expert first in the order: of a layer whose prediction left it
    out, of a layer without a prediction, predicted; least recently used first within
    each. Experts of the call not served yet are never evicted.
    """
    last_use: dict[ExpertKey, int] = {}  # the resident experts
    predictions: dict[int, set[int]] = {}
    tick = hits = 0
    contents = []

    def rank(key: ExpertKey) -> int:
        predicted = predictions.get(key[0])
        return 1 if predicted is None else 2 if key[1] in predicted else 0

    for layer, experts, predicted in calls:
        keys = [(layer, e) for e in dict.fromkeys(experts)]
        predictions.pop(layer, None)
        resident = [k for k in keys if k in last_use]
        hits += len(resident)
        waiting = set(keys)
        for key in resident + [k for k in keys if k not in last_use]:
            if key not in last_use:
                while len(last_use) == capacity:
                    candidates = [k for k in last_use if k not in waiting]
                    victim = min(candidates, key=lambda k: (rank(k), last_use[k]))
                    del last_use[victim]
            tick += 1
            last_use[key] = tick
            waiting.discard(key)
        predictions[(layer + 1) % 3] = set(predicted)
        contents.append(set(last_use))
    return hits, contents


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 5),
    calls=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.lists(st.integers(0, 4), min_size=1, max_size=4),
            st.lists(st.integers(0, 4), max_size=2),
        ),
        min_size=1,
        max_size=25,
    ),
)
def test_predictive_matches_reference(capacity, calls):
    cache = ExpertCache(FakeStore(), 3, capacity * EXPERT_BYTES, policy="predictive", prefetch=False)
    hits, contents = predictive_reference(calls, capacity)
    for (layer, experts, predicted), expected in zip(calls, contents, strict=True):
        assert sorted(serve(cache, layer, experts)) == sorted(set(experts))
        cache.prefetch((layer + 1) % 3, predicted)  # prefetch=False: recorded and scored, not read
        assert cache.resident() == expected
    assert cache.stats.hits == hits
    check_stats(cache)


def test_a_prefetch_takes_the_room_of_what_the_prediction_left_out():
    # 3 layers, room for 4 experts. Layer 1's expert 0 is more recent than layer 0's, but
    # layer 1's prediction leaves it out: the predictive policy evicts it for the prefetch,
    # LRU evicts layer 0's expert 0 (the least recent).
    evicted = {}
    for policy in ("predictive", "lru"):
        cache = ExpertCache(FakeStore(), 3, 4 * EXPERT_BYTES, policy=policy, prefetch=True)
        for layer, experts in ((0, [0, 1]), (1, [0]), (2, [0])):
            serve(cache, layer, experts)
        before = cache.resident()
        cache.prefetch(1, [3])
        cache.wait_for_reads()
        assert (1, 3) in cache.resident()
        (evicted[policy],) = before - cache.resident()
        cache.close()
    assert evicted == {"predictive": (1, 0), "lru": (0, 0)}


def test_predicted_experts_are_evicted_last_and_never_by_a_prefetch():
    store = FakeStore()
    cache = ExpertCache(store, 3, 3 * EXPERT_BYTES, policy="predictive", prefetch=True)
    cache.prefetch(2, [5])  # predicted for layer 2, read ahead
    cache.wait_for_reads()
    serve(cache, 0, [0, 1])  # fills the budget
    serve(cache, 1, [0, 1])  # evicts layer 0's experts, not the predicted (2, 5)
    assert cache.resident() == {(1, 0), (1, 1), (2, 5)}
    cache.prefetch(0, [7])  # room among the unpredicted: (1, 0), the least recent
    cache.prefetch(2, [5, 6])  # replaces layer 2's prediction; room only at (1, 1), not (0, 7)
    cache.wait_for_reads()
    assert cache.resident() == {(2, 5), (2, 6), (0, 7)}
    serve(cache, 2, [5, 6])
    assert (cache.stats.hits, cache.stats.prefetch_used) == (2, 2)
    cache.close()
    check_stats(cache)


def test_prediction_scores():
    cache = ExpertCache(FakeStore(), 2, None, prefetch=False)
    cache.prefetch(1, [0, 1])
    serve(cache, 0, [3])
    serve(cache, 1, [1, 2])
    stats = cache.stats
    assert (stats.predicted, stats.predicted_used, stats.used_after_prediction) == (2, 1, 2)
    assert stats.prefetch_precision == stats.prefetch_recall == 0.5
    assert stats.prefetch_reads == 0  # prefetch=False: predictions are scored, not read


def test_prefetched_experts_are_hits():
    store = FakeStore()
    cache = ExpertCache(store, 2, None, prefetch=True)
    cache.prefetch(1, [2, 3])
    cache.wait_for_reads()
    serve(cache, 1, [2, 3])
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.prefetch_reads, stats.prefetch_used) == (2, 0, 2, 2)


def test_read_errors_reach_the_layer_and_free_the_room():
    store = FakeStore(fail={(0, 1)})
    cache = ExpertCache(store, 1, 2 * EXPERT_BYTES, prefetch=True)
    with pytest.raises(OSError, match=r"cannot read \(0, 1\)"):
        serve(cache, 0, [0, 1])
    assert (0, 1) not in cache.resident()
    store.fail.clear()
    assert serve(cache, 0, [1]) == [1]
    cache.close()
    check_stats(cache)


def test_an_expert_larger_than_the_budget():
    cache = ExpertCache(FakeStore(), 1, EXPERT_BYTES - 1, prefetch=False)
    with pytest.raises(RuntimeError, match="more than the whole expert budget"):
        serve(cache, 0, [0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "fifo"}, "policy"),
        ({"num_layers": 0}, "num_layers"),
        ({"budget_bytes": 0}, "budget_bytes"),
        ({"io_threads": 0}, "io_threads must be an int >= 1"),
        ({"io_threads": 2.0}, "io_threads must be an int >= 1"),
    ],
)
def test_invalid_arguments(kwargs, message):
    arguments = {"num_layers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        ExpertCache(FakeStore(), **arguments)
