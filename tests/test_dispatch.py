"""Dispatch layout, capacity policy, permute and combine.

Legend: T tokens, D model dim, E experts, K top-k, slot s = t*K + k.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer, RouterConfig
from flexmoe.dispatch import combine, compute_capacity, make_layout, permute
from flexmoe.dispatch import layout as layout_module
from flexmoe.dispatch.permute import sums_in_place
from tests.reference import kept_assignments

CAPACITY_FACTORS = [0.0, 0.25, 0.5, 1.0, 1.25, 2.0, -0.25, -0.5, -1.0, -2.0]


@st.composite
def routings(draw, min_tokens: int = 0):
    """Random routings: ``expert_ids [T, K]`` with distinct experts per row, weights, policy."""
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(min_tokens, 12))
    rows = [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    # Few distinct weight values, so batch priority meets exact ties too.
    weights = [[draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9])) for _ in range(K)] for _ in range(T)]
    cf = draw(st.sampled_from(CAPACITY_FACTORS))
    return E, K, rows, weights, cf, draw(st.booleans())


def as_tensors(
    K: int, rows: list[list[int]], weights: list[list[float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), K)
    w = torch.tensor(weights, dtype=torch.float32).reshape(len(rows), K)
    return ids, w


def dropped_of(layout, T: int, K: int) -> set[tuple[int, int]]:
    kept = {(s // K, s % K) for s in layout.slot_ids_N.tolist()}
    return {(t, k) for t in range(T) for k in range(K)} - kept


# ------------------------------------------------------------------------ properties
@settings(max_examples=150)
@given(routing=routings())
def test_layout_properties(routing) -> None:
    E, K, rows, weights, cf, batch_prioritized = routing
    T = len(rows)
    ids, w = as_tensors(K, rows, weights)
    layout = make_layout(ids, w, E, cf, batch_prioritized)

    routed = torch.bincount(ids.reshape(-1), minlength=E)
    assert layout.routed_per_expert_E.tolist() == routed.tolist()
    # Token counts are conserved: kept + dropped == T*K.
    assert int(layout.tokens_per_expert_E.sum()) + layout.num_dropped == T * K
    assert layout.counts == layout.tokens_per_expert_E.tolist()
    assert len(layout.slot_ids_N) == sum(layout.counts)
    # Capacity respected, and nothing dropped from an expert below it.
    if layout.capacity is not None:
        assert all(c <= layout.capacity for c in layout.counts)
    for kept, load in zip(layout.counts, routed.tolist(), strict=True):
        assert kept == (load if layout.capacity is None else min(load, layout.capacity))
    # Slots are distinct, valid, expert-major, and token ids match them.
    slots = layout.slot_ids_N.tolist()
    assert len(set(slots)) == len(slots)
    assert all(0 <= s < T * K for s in slots)
    experts_N = [rows[s // K][s % K] for s in slots]
    assert experts_N == sorted(experts_N)
    assert layout.token_ids_N.tolist() == [s // K for s in slots]
    # Exactly the reference's kept assignments.
    expected_kept, expected_capacity, _ = kept_assignments(rows, weights, E, cf, batch_prioritized)
    assert layout.capacity == expected_capacity
    assert dropped_of(layout, T, K) == {(t, k) for t in range(T) for k in range(K)} - expected_kept


@settings(max_examples=200)
@given(routing=routings(), valid=st.none() | st.lists(st.booleans(), min_size=72, max_size=72))
def test_the_host_layout_equals_the_tensor_layout(routing, valid) -> None:
    # make_layout builds small layouts with numpy: field for field what the tensor ops give
    E, K, rows, weights, cf, _ = routing
    T = len(rows)
    ids, w = as_tensors(K, rows, weights)
    valid_TK = None if valid is None else torch.tensor(valid[: T * K], dtype=torch.bool).reshape(T, K)
    assert layout_module.takes_host_layout(ids, batch_prioritized=False)
    host = make_layout(ids, w, E, cf, False, valid_TK)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout_module, "HOST_LAYOUT_SLOTS", -1)
        assert not layout_module.takes_host_layout(ids, batch_prioritized=False)
        tensors = make_layout(ids, w, E, cf, False, valid_TK)
    for field in ("slot_ids_N", "token_ids_N", "tokens_per_expert_E", "routed_per_expert_E", "inverse_S"):
        a, b = getattr(host, field), getattr(tensors, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    for field in ("counts", "capacity", "num_tokens", "top_k", "num_unused", "num_dropped"):
        assert getattr(host, field) == getattr(tensors, field), field


def test_the_host_layout_is_for_few_slots_in_the_default_order_on_the_cpu() -> None:
    ids = torch.zeros(4, 2, dtype=torch.int64)
    assert layout_module.takes_host_layout(ids, batch_prioritized=False)
    assert not layout_module.takes_host_layout(ids, batch_prioritized=True)
    many = torch.zeros(layout_module.HOST_LAYOUT_SLOTS + 1, 1, dtype=torch.int64)
    assert not layout_module.takes_host_layout(many, batch_prioritized=False)
    assert not layout_module.takes_host_layout(ids.to("meta"), batch_prioritized=False)


@settings(max_examples=100)
@given(routing=routings(min_tokens=1), D=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_permute_combine_round_trip(routing, D: int, seed: int) -> None:
    E, K, rows, weights, cf, batch_prioritized = routing
    T = len(rows)
    ids, w = as_tensors(K, rows, weights)
    layout = make_layout(ids, w, E, cf, batch_prioritized)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    x_ND = permute(x, layout)
    assert x_ND.shape == (len(layout.slot_ids_N), D)
    for n, t in enumerate(layout.token_ids_N.tolist()):
        assert torch.equal(x_ND[n], x[t])
    # combine(permute(x)) counts each token once per kept slot; weighting the rows
    # first gives each token the sum of its kept weights.
    kept = {(s // K, s % K) for s in layout.slot_ids_N.tolist()}
    kept_count = torch.tensor([sum((t, k) in kept for k in range(K)) for t in range(T)], dtype=torch.float64)
    kept_weight = torch.tensor(
        [sum(weights[t][k] for k in range(K) if (t, k) in kept) for t in range(T)], dtype=torch.float64
    )
    torch.testing.assert_close(combine(x_ND, layout), x * kept_count[:, None])
    w_N = w.double().reshape(-1)[layout.slot_ids_N]
    torch.testing.assert_close(combine(x_ND * w_N[:, None], layout), x * kept_weight[:, None])
    # Both have hand-written backwards: check them numerically.
    x_leaf = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: combine(permute(v, layout) * w_N[:, None], layout), (x_leaf,))


@settings(max_examples=40)
@given(
    routing=routings(min_tokens=1),
    D=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_combine_is_the_sum_over_each_tokens_kept_slots(routing, D: int, dtype, seed: int) -> None:
    # Bitwise what a sum over k in the rows' dtype gives (one rounding for k = 2, as sum(1)),
    # but for a gather-sum in bf16: the fp32 total rounded with ties away from zero.
    E, K, rows, weights, cf, batch_prioritized = routing
    T = len(rows)
    ids, w = as_tensors(K, rows, weights)
    layout = make_layout(ids, w, E, cf, batch_prioritized)
    y_ND = torch.randn(len(layout.slot_ids_N), D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y_SD = torch.zeros(T * K, D, dtype=dtype).index_copy_(0, layout.slot_ids_N, y_ND)
    expected = y_SD.view(T, K, D).sum(1)
    if dtype == torch.bfloat16 and layout.inverse_S is not None and sums_in_place(y_ND, K):
        expected = bf16_ties_away(y_SD.view(T, K, D).float().sum(1))
    assert torch.equal(combine(y_ND, layout), expected)


def bf16_ties_away(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16, to nearest with ties away from zero (finite values)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the fp32 bit pattern, unsigned
    rounded = (bits + 0x8000) & 0xFFFF0000  # half an ulp added to the magnitude, then cut
    signed = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return signed.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def test_bf16_ties_away_rounds_half_ulps_up_in_magnitude() -> None:
    x = torch.tensor([1.0 + 2**-8, -(1.0 + 2**-8), 1.0 + 3 * 2**-8, 1.0 + 2**-9])
    expected = [1.0 + 2**-7, -(1.0 + 2**-7), 1.0 + 2**-6, 1.0]
    assert bf16_ties_away(x).tolist() == expected
    assert x.to(torch.bfloat16).tolist() == [1.0, -1.0, 1.0 + 2**-6, 1.0]  # to even


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_permute_combine_zero_tokens(K: int, capacity_factor: float) -> None:
    layout = make_layout(torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K), 3, capacity_factor)
    assert layout.num_dropped == 0 and layout.counts == [0, 0, 0]
    x = torch.randn(0, 4, requires_grad=True)
    y = combine(permute(x, layout), layout)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 4)


@settings(max_examples=40)
@given(
    E=st.integers(1, 8),
    T=st.integers(1, 9),
    kind=st.sampled_from(["softmax", "sigmoid", "cosine"]),
    data=st.data(),
)
def test_router_gives_exactly_k_distinct_routes_per_token(E: int, T: int, kind: str, data) -> None:
    groups = data.draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
    topk_groups = data.draw(st.integers(1, groups))
    K = data.draw(st.integers(1, topk_groups * (E // groups)))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    router = RouterConfig(kind=kind, num_groups=groups, topk_groups=topk_groups, cosine_dim=4)
    layer = MoELayer(4, 3, E, K, router=router, capacity_factor=0.0)
    out = layer.router(torch.randn(T, 4), K)
    assert out.expert_ids_TK.shape == (T, K)
    assert out.weights_TK.shape == (T, K)
    for row in out.expert_ids_TK.tolist():
        assert len(set(row)) == K
        assert all(0 <= e < E for e in row)
        assert len({e // (E // groups) for e in row}) <= topk_groups
    # Dropless: every token appears in exactly K kept slots.
    layout = make_layout(out.expert_ids_TK, out.weights_TK, E, 0.0)
    assert torch.bincount(layout.token_ids_N, minlength=T).tolist() == [K] * T


# ----------------------------------------------------------------- exact drops by hand
# T=4, K=2, E=3. (t, k) -> expert (weight):
#   token 0: (0,0)->e0 (0.60)  (0,1)->e1 (0.40)
#   token 1: (1,0)->e0 (0.70)  (1,1)->e2 (0.30)
#   token 2: (2,0)->e1 (0.35)  (2,1)->e0 (0.65)
#   token 3: (3,0)->e0 (0.90)  (3,1)->e1 (0.10)
# Loads: e0 = 4, e1 = 3, e2 = 1 (max 4). Even share T*K/E = 8/3.
# Default priority per expert (first choices, earlier tokens first, then second choices):
#   e0: (0,0) (1,0) (3,0) (2,1)     e1: (2,0) (0,1) (3,1)     e2: (1,1)
# Batch priority per expert (higher weight first):
#   e0: (3,0) .9  (1,0) .7  (2,1) .65  (0,0) .6     e1: (0,1) .4  (2,0) .35  (3,1) .1
HAND_IDS = [[0, 1], [0, 2], [1, 0], [0, 1]]
HAND_WEIGHTS = [[0.6, 0.4], [0.7, 0.3], [0.35, 0.65], [0.9, 0.1]]


@pytest.mark.parametrize(
    ("capacity_factor", "batch_prioritized", "capacity", "dropped"),
    [
        # cf=0.75: capacity ceil(0.75 * 8/3) = 2.
        (0.75, False, 2, {(3, 0), (2, 1), (3, 1)}),
        (0.75, True, 2, {(2, 1), (0, 0), (3, 1)}),
        # cf=-1: capacity min(max load 4, ceil(8/3) = 3) = 3: only e0 overflows, by one.
        (-1.0, False, 3, {(2, 1)}),
        (-1.0, True, 3, {(0, 0)}),
        # cf=-0.75: min(4, ceil(2)) = 2, the same drops as cf=0.75.
        (-0.75, False, 2, {(3, 0), (2, 1), (3, 1)}),
        # cf=-2: min(max load 4, ceil(16/3) = 6) = 4: the real maximum, nothing dropped.
        (-2.0, False, 4, set()),
        (-2.0, True, 4, set()),
        # cf=2: ceil(16/3) = 6 >= every load: nothing dropped.
        (2.0, False, 6, set()),
        # cf=0: dropless.
        (0.0, False, None, set()),
        (0.0, True, None, set()),
    ],
)
def test_hand_made_drops(capacity_factor, batch_prioritized, capacity, dropped) -> None:
    ids, w = as_tensors(2, HAND_IDS, HAND_WEIGHTS)
    layout = make_layout(ids, w, 3, capacity_factor, batch_prioritized)
    assert layout.capacity == capacity
    assert dropped_of(layout, 4, 2) == dropped
    assert layout.num_dropped == len(dropped)
    assert layout.routed_per_expert_E.tolist() == [4, 3, 1]


def test_hand_made_kept_order_is_expert_major_in_priority_order() -> None:
    ids, w = as_tensors(2, HAND_IDS, HAND_WEIGHTS)
    # cf=0.75, default: e0 keeps slots (0,0)=0, (1,0)=2; e1 keeps (2,0)=4, (0,1)=1; e2 keeps (1,1)=3.
    assert make_layout(ids, w, 3, 0.75).slot_ids_N.tolist() == [0, 2, 4, 1, 3]
    # batch priority: e0 keeps (3,0)=6, (1,0)=2; e1 keeps (0,1)=1, (2,0)=4; e2 keeps (1,1)=3.
    assert make_layout(ids, w, 3, 0.75, batch_prioritized=True).slot_ids_N.tolist() == [6, 2, 1, 4, 3]
    assert make_layout(ids, w, 3, 0.75).counts == [2, 2, 1]


def test_first_choices_outrank_earlier_tokens_second_choices() -> None:
    # T=2, K=2, E=2: token 0 -> (e0, e1), token 1 -> (e1, e0); all weights equal.
    # cf=0.5: capacity ceil(0.5 * 4/2) = 1. Each expert keeps its first choice, so both
    # second choices are dropped, although (0,1) belongs to the earlier token. Equal
    # weights make batch priority fall back to the same order.
    ids = torch.tensor([[0, 1], [1, 0]])
    w = torch.full((2, 2), 0.5)
    for batch_prioritized in (False, True):
        layout = make_layout(ids, w, 2, 0.5, batch_prioritized)
        assert layout.capacity == 1
        assert dropped_of(layout, 2, 2) == {(0, 1), (1, 1)}


def test_batch_priority_ties_keep_earlier_tokens() -> None:
    # T=3, K=1, E=1, equal weights; cf=0.5: capacity ceil(1.5) = 2 -> token 2 dropped.
    ids = torch.zeros(3, 1, dtype=torch.int64)
    w = torch.full((3, 1), 0.5)
    assert dropped_of(make_layout(ids, w, 1, 0.5, batch_prioritized=True), 3, 1) == {(2, 0)}
    # With a higher weight, the last token outranks the first two.
    w = torch.tensor([[0.5], [0.4], [0.9]])
    assert dropped_of(make_layout(ids, w, 1, 0.5, batch_prioritized=True), 3, 1) == {(1, 0)}


@pytest.mark.parametrize(
    ("capacity_factor", "T", "K", "E", "max_load", "expected"),
    [
        (1.0, 10, 2, 4, 9, 5),  # ceil(20/4)
        (1.25, 10, 2, 4, 9, 7),  # ceil(6.25)
        (0.25, 3, 1, 4, 3, 1),  # ceil(0.1875)
        (-1.0, 10, 2, 4, 9, 5),  # min(9, 5)
        (-2.0, 10, 2, 4, 9, 9),  # min(9, 10)
        (-1.0, 10, 2, 4, 3, 3),  # min(3, 5)
        (0.0, 10, 2, 4, 9, None),
    ],
)
def test_compute_capacity(capacity_factor, T, K, E, max_load, expected) -> None:
    assert compute_capacity(capacity_factor, T, K, E, max_load) == expected
