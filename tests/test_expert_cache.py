"""flexmoe.experts.cache: the budget, each expert served once, LRU against a reference, prediction scores."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import Tensor

from flexmoe.experts.cache import ExpertCache, ExpertKey, ExpertWeights
from flexmoe.experts.int8 import SCALE_SUFFIX, Int8Weight, quantize_int8
from flexmoe.experts.packed import PackedWeight, packed_inference_supported, packed_linear
from flexmoe.experts.store import (
    WEIGHT_ALIGN,
    ExpertPieces,
    ReadBuffers,
    SafetensorsExpertStore,
    SafetensorsFile,
    TensorSlice,
    direct_read_bytes,
)

CPU = torch.device("cpu")
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


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(3, 6),
    policy=st.sampled_from(["predictive", "lru", "lfu"]),
    calls=st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 7), min_size=1, max_size=3)),
        min_size=1,
        max_size=20,
    ),
)
def test_groups_serve_what_use_serves_resident_experts_together(capacity, policy, calls):
    singles = ExpertCache(FakeStore(), 4, capacity * EXPERT_BYTES, policy=policy, prefetch=False)
    store = FakeStore()
    grouped = ExpertCache(store, 4, capacity * EXPERT_BYTES, policy=policy, prefetch=False)
    for layer, experts in calls:
        resident = {e for layer_of, e in grouped.resident() if layer_of == layer}
        lists = []
        for group in grouped.use_groups(layer, experts):
            held = {e for layer_of, e in grouped.resident() if layer_of == layer}
            assert {e for e, _ in group} <= held, "an expert of the list being used was evicted"
            assert len(grouped.resident()) * EXPERT_BYTES <= capacity * EXPERT_BYTES
            for e, (w_in, _) in group:
                assert float(w_in[0, 0]) == 100 * layer + e
            lists.append([e for e, _ in group])
        wanted = set(experts)
        if wanted & resident:
            assert set(lists[0]) == wanted & resident, "the resident experts come first, together"
            lists = lists[1:]
        assert all(len(group) == 1 for group in lists)
        assert sorted(e for (e,) in lists) == sorted(wanted - resident)
        assert sorted(serve(singles, layer, experts)) == sorted(wanted)
    assert grouped.stats == singles.stats
    assert grouped.resident() == singles.resident()


@pytest.mark.parametrize("policy", ["predictive", "lru", "lfu"])
def test_groups_hold_their_experts_while_reads_land_in_the_background(policy):
    store = FakeStore(delay=0.001)
    cache = ExpertCache(store, num_layers=3, budget_bytes=4 * EXPERT_BYTES, policy=policy, prefetch=True)
    generator = torch.Generator().manual_seed(1)
    for step in range(15):
        for layer in range(3):
            wanted = torch.randperm(8, generator=generator)[: 1 + step % 4].tolist()
            served = []
            for group in cache.use_groups(layer, wanted):
                held = cache.resident()
                assert all((layer, e) in held for e, _ in group), (
                    "an expert of the list being used was evicted"
                )
                assert len(held) * EXPERT_BYTES <= cache.budget_bytes
                for e, (w_in, _) in group:
                    assert float(w_in[0, 0]) == 100 * layer + e
                served += [e for e, _ in group]
            assert sorted(served) == sorted(wanted)
            cache.prefetch((layer + 1) % 3, torch.randperm(8, generator=generator)[:3].tolist())
    cache.close()
    check_stats(cache)
    assert any(name.startswith("flexmoe-expert-io") for name in store.threads)


def test_a_group_left_early_unpins_its_experts():
    cache = ExpertCache(FakeStore(), 1, 2 * EXPERT_BYTES, prefetch=False)
    assert serve(cache, 0, [0, 1]) == [0, 1]
    groups = cache.use_groups(0, [0, 1])
    assert [e for e, _ in next(groups)] == [0, 1]
    groups.close()
    assert serve(cache, 0, [2, 3]) == [2, 3]  # both had to be evicted: nothing stayed pinned
    assert cache.resident() == {(0, 2), (0, 3)}


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


# ---------------------------------------------------------------- reads into recycled memory
LAYERS, EXPERTS, F_, D_ = 2, 4, 3, 5  # an expert: w_in [2F, D] (gate; up), w_out [D, F]
STORE_KINDS = [
    "float",
    "cast",
    "int8",
    *(["packed"] if packed_inference_supported(CPU, torch.float32) else []),
]


def write_experts(directory: Path, kind: str) -> dict[ExpertKey, ExpertPieces]:
    """A file of random stacked experts (``cast``: bf16; ``int8``: with scales), and their pieces."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(LAYERS):
        for name, shape in (("gate", (F_, D_)), ("up", (F_, D_)), ("down", (D_, F_))):
            w = torch.randn(EXPERTS, *shape, generator=generator)
            if kind == "int8":
                tensors[f"{layer}.{name}"], tensors[f"{layer}.{name}{SCALE_SUFFIX}"] = quantize_int8(w)
            else:
                tensors[f"{layer}.{name}"] = w.to(torch.bfloat16 if kind == "cast" else torch.float32)
    path = directory / f"{kind}.safetensors"
    save_file(tensors, path)
    file = SafetensorsFile(path)

    def piece(layer: int, name: str, expert: int) -> TensorSlice:
        scale = TensorSlice(file, f"{layer}.{name}{SCALE_SUFFIX}", expert) if kind == "int8" else None
        return TensorSlice(file, f"{layer}.{name}", expert, scale)

    return {
        (layer, e): ExpertPieces((piece(layer, "gate", e), piece(layer, "up", e)), piece(layer, "down", e))
        for layer in range(LAYERS)
        for e in range(EXPERTS)
    }


def plain_read(pieces: ExpertPieces) -> tuple[Tensor, ...]:
    """The expert's weights read into new tensors and stacked: ``(w_in, w_out)``, and their scales if int8."""
    w_in = torch.cat([piece.file.read(piece.name, piece.index) for piece in pieces.w_in])
    w_out = pieces.w_out.file.read(pieces.w_out.name, pieces.w_out.index)
    if not pieces.quantized:
        return w_in.float(), w_out.float()
    scales = [s for s in (*(p.scale for p in pieces.w_in), pieces.w_out.scale) if s is not None]
    scale_in = torch.cat([s.file.read(s.name, s.index) for s in scales[:2]])
    return w_in, w_out, scale_in, scales[2].file.read(scales[2].name, scales[2].index)


def assert_served_as_read(weights: ExpertWeights, pieces: ExpertPieces) -> None:
    """The served weights hold exactly the file's values (packed ones: their products are the plain ones')."""
    expected = plain_read(pieces)
    w_in, w_out = weights
    if isinstance(w_in, Int8Weight) and isinstance(w_out, Int8Weight):
        for got, want in zip((w_in.q, w_out.q, w_in.scale, w_out.scale), expected, strict=True):
            assert torch.equal(got, want)
    elif isinstance(w_in, PackedWeight) and isinstance(w_out, PackedWeight):
        for weight, want in zip((w_in, w_out), expected, strict=True):
            x = torch.randn(3, want.shape[1], generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(packed_linear(x, weight), x @ want.T, rtol=1e-5, atol=1e-5)
    else:
        assert isinstance(w_in, Tensor) and isinstance(w_out, Tensor)
        assert w_in.dtype == w_out.dtype == torch.float32
        assert torch.equal(w_in, expected[0]) and torch.equal(w_out, expected[1])


def store_of(directory: Path, kind: str, direct: bool = True) -> SafetensorsExpertStore:
    pieces = write_experts(directory, kind)
    return SafetensorsExpertStore(pieces, torch.float32, pack=kind == "packed", direct=direct)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, SafetensorsExpertStore]:
    directory = tmp_path_factory.mktemp("experts")
    return {kind: store_of(directory, kind) for kind in STORE_KINDS}


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(STORE_KINDS),
    capacity=st.integers(1, 3),
    prefetch=st.booleans(),
    calls=st.lists(
        st.tuples(
            st.integers(0, LAYERS - 1),
            st.lists(st.integers(0, EXPERTS - 1), min_size=1, max_size=EXPERTS),
            st.lists(st.integers(0, EXPERTS - 1), max_size=2),
        ),
        min_size=1,
        max_size=15,
    ),
)
def test_reads_into_recycled_memory_return_the_files_bytes(stores, kind, capacity, prefetch, calls):
    store = stores[kind]
    cache = ExpertCache(store, LAYERS, capacity * store.nbytes((0, 0)), prefetch=prefetch)
    for layer, experts, predicted in calls:
        for expert, weights in cache.use(layer, experts):
            assert_served_as_read(weights, store.pieces[(layer, expert)])
        cache.prefetch((layer + 1) % LAYERS, predicted)
    cache.wait_for_reads()
    for layer, expert in cache.resident():  # what the cache still holds was not overwritten since
        checked(cache, store, layer, [expert])
    cache.close()


def checked(cache: ExpertCache, store: SafetensorsExpertStore, layer: int, experts: list[int]) -> None:
    """Use the experts, checking each against the file, and keep no reference to any of them."""
    for expert, weights in cache.use(layer, experts):
        assert_served_as_read(weights, store.pieces[(layer, expert)])


@pytest.mark.parametrize("kind", ["float", "cast", "int8"])
def test_an_evicted_experts_memory_is_read_into_again(tmp_path, kind):
    store = store_of(tmp_path, kind, direct=False)
    cache = ExpertCache(store, LAYERS, store.nbytes((0, 0)), prefetch=False)  # room for one expert
    for expert in range(EXPERTS):
        checked(cache, store, 0, [expert])
    reads = cache.stats.reads
    assert reads == EXPERTS and cache.stats.evictions == EXPERTS - 1
    buffers = 2 if kind != "int8" else 4  # w_in, w_out (and their scales)
    # every read after the first filled the memory of the expert it evicted
    assert (store.buffers.taken, store.buffers.reused) == (buffers * reads, buffers * (reads - 1))
    assert store.buffers.spare_bytes() == 0
    assert store.scratch_bytes() == (F_ * D_ * 2 if kind == "cast" else 0)  # a bf16 piece before its cast


@pytest.mark.parametrize("kind", ["float", "cast", "int8"])
def test_direct_reads_take_no_new_memory_once_warm(tmp_path, kind):
    store = store_of(tmp_path, kind)
    cache = ExpertCache(store, LAYERS, store.nbytes((0, 0)), prefetch=False)  # room for one expert
    for expert in range(EXPERTS):  # each buffer size met once (aligned direct reads, copies, bounces)
        checked(cache, store, 0, [expert])
    new_memory = store.buffers.taken - store.buffers.reused
    for _ in range(2):
        for expert in range(EXPERTS):
            checked(cache, store, 0, [expert])
    assert store.buffers.taken - store.buffers.reused == new_memory
    assert store.buffers.taken >= 3 * EXPERTS * 2


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_held_expert_is_never_overwritten(tmp_path, kind, prefetch):
    store = store_of(tmp_path, kind)
    cache = ExpertCache(store, LAYERS, store.nbytes((0, 0)), prefetch=prefetch)
    served = cache.use(0, [0])
    _, held = next(served)
    served.close()
    w_in, w_out = held
    # an alias of w_in's memory that does not keep w_in itself alive (a slice view would)
    alias = (
        w_in.q.detach()
        if isinstance(w_in, Int8Weight)
        else w_in.detach()
        if isinstance(w_in, Tensor)
        else None
    )
    expected_alias = None if alias is None else alias.clone()
    for step in range(3):  # each read evicts the one before: the held expert's memory must not be reused
        for layer in range(LAYERS):
            checked(cache, store, layer, [(step + layer + 1) % EXPERTS])
            cache.prefetch((layer + 1) % LAYERS, [step % EXPERTS])
    cache.wait_for_reads()
    assert (0, 0) not in cache.resident() and cache.stats.evictions >= 6
    assert_served_as_read(held, store.pieces[(0, 0)])
    del held, w_in, w_out, served  # only the alias is left now
    # reads of other experts that take every spare buffer there is
    kept = {key: store.read(key) for key in store.pieces if key != (0, 0)}
    for key, weights in kept.items():
        assert_served_as_read(weights, store.pieces[key])
    if alias is not None:
        assert torch.equal(alias, expected_alias)
    cache.close()


def test_a_released_buffer_becomes_spare_only_when_nothing_uses_it():
    buffers = ReadBuffers(max_per_size=1)
    weight = buffers.take(64).view(torch.float32)
    buffers.reuse_when_freed(weight)
    pointer = weight.data_ptr()
    alias = weight.detach()  # shares the memory, not the tensor (a slice would keep weight alive)
    del weight
    assert buffers.spare_bytes() == 0  # the alias still reads it
    assert buffers.take(64).data_ptr() != pointer
    del alias
    assert buffers.spare_bytes() == 64
    assert buffers.take(64).data_ptr() == pointer
    assert (buffers.taken, buffers.reused) == (3, 1)
    for _ in range(3):  # more released buffers of one size than it keeps: the others are freed
        released = [buffers.take(64) for _ in range(2)]
        for buffer in released:
            buffers.reuse_when_freed(buffer)
        del released, buffer
        assert buffers.spare_bytes() == 64


@pytest.mark.skipif("packed" not in STORE_KINDS, reason="no oneDNN packed fp32 matmuls on this CPU")
def test_packed_experts_stay_right_after_the_scratch_is_reused(tmp_path, monkeypatch):
    store = store_of(tmp_path, "packed", direct=False)
    packed_from = []

    def pack(weight: Tensor) -> PackedWeight:
        packed_from.append(weight.data_ptr())
        return original(weight)

    original = PackedWeight.pack
    monkeypatch.setattr(PackedWeight, "pack", pack)
    first = store.read((0, 0))
    expected = plain_read(store.pieces[(0, 0)])
    for key in store.pieces:  # the same thread: each read overwrites the scratch the first was read into
        assert_served_as_read(store.read(key), store.pieces[key])
    assert len(set(packed_from)) == 1 and len(packed_from) == 2 * (1 + len(store.pieces))
    assert store.scratch_bytes() == 2 * F_ * D_ * 4  # one buffer of the largest weight
    for weight, want in zip(first, expected, strict=True):
        x = torch.randn(4, want.shape[1])
        torch.testing.assert_close(packed_linear(x, weight), x @ want.T, rtol=1e-5, atol=1e-5)


def test_reading_into_a_buffer_of_the_wrong_size(tmp_path):
    pieces = write_experts(tmp_path, "float")
    file = pieces[(0, 0)].w_out.file
    out = torch.empty(D_ * F_ * 4, dtype=torch.uint8)
    assert file.read("0.down", 1, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out.view(torch.float32).view(D_, F_), file.read("0.down", 1))
    for bad in (
        out[:-1],
        out.view(torch.float32),
        out.view(D_, F_ * 4),
        torch.empty(2 * out.numel(), dtype=torch.uint8)[::2],
    ):
        with pytest.raises(
            ValueError, match=rf"out must be a contiguous 1-d uint8 CPU tensor of {out.numel()} bytes"
        ):
            file.read("0.down", 1, out=bad)


@pytest.mark.skipif("packed" not in STORE_KINDS, reason="no oneDNN packed fp32 matmuls on this CPU")
def test_io_threads_leave_packing_to_the_thread_that_uses_the_expert(tmp_path, monkeypatch):
    store = store_of(tmp_path, "packed")
    packed_on: list[str] = []

    def pack(weight: Tensor) -> PackedWeight:
        packed_on.append(threading.current_thread().name)
        return original(weight)

    original = PackedWeight.pack
    monkeypatch.setattr(PackedWeight, "pack", pack)
    cache = ExpertCache(store, LAYERS, 2 * store.nbytes((0, 0)), prefetch=True)
    cache.prefetch(1, [0, 1])
    cache.wait_for_reads()
    assert packed_on == [] and cache.stats.prefetch_reads == 2  # read, not packed
    checked(cache, store, 1, [1])  # a prefetched expert: packed when used
    assert packed_on == [threading.current_thread().name] * 2
    checked(cache, store, 0, [2, 3])  # misses read by the I/O threads; the unused (1, 0) is evicted unpacked
    assert packed_on == [threading.current_thread().name] * 6
    assert cache.stats.reads == 4 and cache.stats.evictions == 2
    checked(cache, store, 0, [2, 3])  # hits: packed once only
    assert len(packed_on) == 6
    cache.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_read_asks_for_all_its_pieces_at_once(tmp_path, kind, monkeypatch):
    store = store_of(tmp_path, kind, direct=False)
    advised: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length, advice))
        real(fd, offset, length, advice)

    def file_bytes(offset: int, length: int) -> bytes:
        with open(pieces.w_out.file.path, "rb") as file:
            file.seek(offset)
            return file.read(length)

    monkeypatch.setattr(os, "posix_fadvise", record)
    pieces = store.pieces[(1, 2)]
    slices = [*pieces.w_in, pieces.w_out]
    slices += [piece.scale for piece in slices if piece.scale is not None]
    reads = ExpertCache(store, LAYERS, None, prefetch=True)
    checked(reads, store, 1, [2])  # read by an I/O thread
    reads.close()
    # one hint per piece, each for exactly that piece's bytes
    assert {advice for _, _, advice in advised} == {os.POSIX_FADV_WILLNEED}
    hinted = sorted(file_bytes(offset, length) for offset, length, _ in advised)
    assert hinted == sorted(piece.read().contiguous().view(torch.uint8).numpy().tobytes() for piece in slices)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no direct reads on this platform")
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_direct_reads_ask_for_no_page_cache(tmp_path, kind, monkeypatch):
    store = store_of(tmp_path, kind)
    advised: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(length))
    checked_all = ExpertCache(store, LAYERS, None, prefetch=True)
    checked(checked_all, store, 1, [2])
    checked_all.close()
    pieces = store.pieces[(1, 2)]
    out = pieces.w_out
    assert out.file.reads_direct
    # Read past the page cache: a weight in one piece in its stored dtype (w_out here).
    # Through it, with a hint: a weight assembled from pieces (w_in's gate and up), a cast's.
    hinted = [*pieces.w_in, *([out] if kind == "cast" else [])]
    hinted += [piece.scale for piece in hinted if piece.scale is not None]
    assert sorted(advised) == sorted(piece.nbytes for piece in hinted)
    if kind in ("float", "int8"):  # kept as read: in the direct read's buffer, or copied to align it
        w_out = store.read((1, 2))[1]
        stored = w_out.q if isinstance(w_out, Int8Weight) else w_out
        aligned = out.file.offset(out.name, out.index) % WEIGHT_ALIGN == 0
        assert (stored.untyped_storage().nbytes() == direct_read_bytes(out.nbytes)) == aligned


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_weights_kept_as_stored_start_aligned(tmp_path, kind, direct):
    store = store_of(tmp_path, kind, direct)
    for key, pieces in store.pieces.items():
        weights = store.read(key)
        for weight in weights:
            for tensor in (weight.q, weight.scale) if isinstance(weight, Int8Weight) else (weight,):
                assert tensor.data_ptr() % WEIGHT_ALIGN == 0
        assert_served_as_read(weights, pieces)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.integers(1, 700), min_size=1, max_size=4),
    width=st.integers(1, 37),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
)
def test_direct_reads_equal_reads_through_the_page_cache(tmp_path_factory, rows, width, dtype):
    directory = tmp_path_factory.mktemp("direct")
    generator = torch.Generator().manual_seed(len(rows) * 1000 + width)
    # tensors of odd sizes: their bytes start and end anywhere in a block
    tensors = {
        f"t{i}": (torch.randn(n, width, generator=generator) * 50).to(dtype) for i, n in enumerate(rows)
    }
    save_file(tensors, str(directory / "w.safetensors"))
    file = SafetensorsFile(directory / "w.safetensors")
    if not file.reads_direct:
        pytest.skip("no direct reads on this platform")
    buffers = ReadBuffers()
    for name, tensor in tensors.items():
        for index in (None, 0, tensor.shape[0] - 1, tensor.shape[0] // 2):
            got = file.read_direct(name, index, buffers.take)
            assert got is not None and file.reads_direct
            want = tensor if index is None else tensor[index]
            assert got.dtype == want.dtype and torch.equal(got, want)
            assert got.untyped_storage().nbytes() == direct_read_bytes(file.nbytes(name, index))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no direct reads on this platform")
def test_a_file_system_without_direct_reads_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    store = store_of(tmp_path, "packed" if "packed" in STORE_KINDS else "float")  # packed: any offset
    cache = ExpertCache(store, LAYERS, None, prefetch=True)
    for layer in range(LAYERS):
        checked(cache, store, layer, list(range(EXPERTS)))
    cache.close()
    out = store.pieces[(0, 0)].w_out
    assert out.read_direct(ReadBuffers().take) is None
    assert not out.file.reads_direct
