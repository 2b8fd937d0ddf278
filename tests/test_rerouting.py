"""The least-loaded rerouting plan: exact coverage, hard memory bounds, never worse than plain EP."""

from __future__ import annotations

import math
from itertools import accumulate

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexmoe import RerouteConfig
from flexmoe.parallel.routes import build_chunks, reroute_pieces
from flexmoe.planner.rerouting import decide_rerouting, plan_rerouting

from .reference import reference_rerouting


@st.composite
def loads_and_world(draw: st.DrawFn) -> tuple[list[int], int]:
    W = draw(st.sampled_from([2, 3, 4, 8]))
    El = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["uniform", "hot", "zipf", "empty"]))
    E = W * El
    if kind == "uniform":
        loads = draw(st.lists(st.integers(0, 60), min_size=E, max_size=E))
    elif kind == "hot":
        loads = [0] * E
        loads[draw(st.integers(0, E - 1))] = draw(st.integers(1, 2000))
    elif kind == "zipf":
        s = draw(st.floats(0.5, 2.0))
        scale = draw(st.integers(10, 2000))
        loads = [int(scale / (i + 1) ** s) for i in range(E)]
    else:
        loads = [0] * E
    return loads, W


def _check_exact_cover(plan, loads: list[int], W: int) -> None:
    El = len(loads) // W
    assigned = [0] * W
    for e, pieces in enumerate(plan.intervals):
        position = 0
        for rank, start, stop in pieces:
            assert start == position and stop >= start, (e, pieces)  # contiguous, in order
            assigned[rank] += stop - start
            if rank != e // El and stop > start:
                assert e in plan.copies[rank], (e, rank)  # computed away => a copy was sent
            position = stop
        assert position == loads[e], (e, pieces)  # covers exactly [0, load)
        # The pieces' order (the owner's kept share first, its take-backs later) is
        # compared with the reference in test_plan_equals_the_reference.
    assert assigned == plan.rows_per_rank
    assert sum(assigned) == sum(loads)
    for rank, copies in enumerate(plan.copies):
        assert all(e // El != rank for e in copies)  # never a copy of one's own expert
    assert sorted(plan.transfers) == sorted((e, p) for p in range(W) for e in plan.copies[p])


@given(
    loads_and_world(),
    st.floats(1.0, 1.5),
    st.sampled_from([1, 8]),
    st.sampled_from([None, 0, 1, 2]),
    st.sampled_from([None, 1.0, 1.5]),
    st.data(),
)
def test_plan_equals_the_reference(case, alpha, min_chunk, max_copies, rows_factor, data):
    loads, W = case
    E, El = len(loads), len(loads) // W
    max_rows = None if rows_factor is None else math.ceil(rows_factor * sum(loads) / W)
    held = None
    if data.draw(st.booleans(), label="replicas"):  # persistent replicas of other ranks' experts
        held = [
            sorted(data.draw(st.sets(st.sampled_from([e for e in range(E) if e // El != p]), max_size=2)))
            for p in range(W)
        ]
    kwargs = {
        "alpha": alpha,
        "min_chunk": min_chunk,
        "max_copies_per_rank": max_copies,
        "max_rows_per_rank": max_rows,
        "held": held,
    }
    try:
        intervals, rows, transfers = reference_rerouting(loads, W, **kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            plan_rerouting(loads, W, **kwargs)
        return
    plan = plan_rerouting(loads, W, **kwargs)
    assert plan.intervals == intervals
    assert plan.rows_per_rank == rows
    assert plan.transfers == transfers
    if held is not None:
        assert not any(e in held[p] for e, p in plan.transfers)  # a replica is never sent


def test_replicas_save_the_transfer_and_count_towards_the_copy_bound():
    loads = [1000, 0, 0, 0]  # everything on expert 0 (rank 0 of 4)
    fresh = plan_rerouting(loads, 4)
    assert sorted(fresh.transfers) == [(0, 1), (0, 2), (0, 3)]
    held = plan_rerouting(loads, 4, held=[[], [0], [0], []])
    assert held.rows_per_rank == fresh.rows_per_rank and held.transfers == [(0, 3)]
    assert held.copies == fresh.copies  # the same pieces: rank 3 gets a copy sent
    full = plan_rerouting(loads, 4, held=[[], [0], [0], [1]], max_copies_per_rank=1)
    assert full.copies[3] == [] and full.transfers == []  # rank 3's slot is taken by its replica


@given(loads_and_world(), st.floats(1.0, 1.5))
def test_plan_covers_every_row_exactly_once(case, alpha):
    loads, W = case
    plan = plan_rerouting(loads, W, alpha=alpha)
    _check_exact_cover(plan, loads, W)
    assert max(plan.rows_per_rank) <= max(plan.native_rows_per_rank)  # never worse than plain EP


@given(loads_and_world(), st.integers(0, 3), st.floats(1.0, 2.0))
def test_hard_bounds_hold_or_the_plan_refuses(case, max_copies, slack):
    loads, W = case
    max_rows = int(slack * -(-sum(loads) // W)) + 1
    try:
        plan = plan_rerouting(loads, W, max_rows_per_rank=max_rows, max_copies_per_rank=max_copies)
    except ValueError as error:
        assert "max_rows_per_rank" in str(error)
        with pytest.raises(ValueError):  # refused only where the reference finds the bounds infeasible
            reference_rerouting(loads, W, max_rows_per_rank=max_rows, max_copies_per_rank=max_copies)
        return
    _check_exact_cover(plan, loads, W)
    assert max(plan.rows_per_rank) <= max_rows
    assert all(len(c) <= max_copies for c in plan.copies)


def test_balanced_load_moves_nothing():
    plan = plan_rerouting([10, 10, 10, 10, 10, 10, 10, 10], 4)
    assert plan.transfers == [] and plan.moved_rows == 0
    assert plan.rows_per_rank == plan.native_rows_per_rank == [20, 20, 20, 20]


def test_one_hot_expert_is_spread_evenly():
    plan = plan_rerouting([1000, 0, 0, 0], 4)
    assert plan.rows_per_rank == [250, 250, 250, 250]
    assert plan.intervals[0] == [(0, 0, 250), (1, 250, 500), (2, 500, 750), (3, 750, 1000)]
    assert sorted(plan.transfers) == [(0, 1), (0, 2), (0, 3)]
    assert plan.imbalance_before == 4.0 and plan.imbalance_after == 1.0


def test_min_chunk_avoids_small_gemm_pieces():
    # 3 ranks, target 84 rows each: expert 0's 66 extra rows fit as 36 + 30 on ranks 1 and 2,
    # but with min_chunk=40 neither piece qualifies and the whole remainder goes to rank 1.
    loads = [150, 48, 52]
    assert plan_rerouting(loads, 3, min_chunk=1).intervals[0] == [(0, 0, 84), (1, 84, 120), (2, 120, 150)]
    assert plan_rerouting(loads, 3, min_chunk=40).intervals[0] == [(0, 0, 84), (1, 84, 150)]


def test_infeasible_bounds_name_the_argument():
    with pytest.raises(ValueError, match="max_rows_per_rank=10 cannot hold this step's 100 rows on 4 ranks"):
        plan_rerouting([100, 0, 0, 0], 4, max_rows_per_rank=10)
    with pytest.raises(ValueError, match="max_copies_per_rank=0"):
        plan_rerouting([100, 0, 0, 0], 4, max_rows_per_rank=30, max_copies_per_rank=0)


@given(loads_and_world(), st.integers(1, 3), st.data())
def test_routes_send_every_row_to_the_rank_the_plan_says(case, d, data):
    loads, W = case
    E = len(loads)
    El = E // W
    # Split each expert's rows among the sources at random.
    kept = [[0] * E for _ in range(W)]
    for e, load in enumerate(loads):
        cuts = sorted(data.draw(st.lists(st.integers(0, load), min_size=W - 1, max_size=W - 1)))
        bounds = [0, *cuts, load]
        for q in range(W):
            kept[q][e] = bounds[q + 1] - bounds[q]
    plan = plan_rerouting(loads, W)
    pieces = reroute_pieces(kept, plan, El)
    for e in range(E):
        share = [sum(b - a for p, a, b in plan.intervals[e] if p == rank) for rank in range(W)]
        for q in range(W):
            cut = pieces(q, e)
            # Source q's rows are covered once, in order, and each rank gets its share ...
            assert [start for _, _, start, _ in cut] == list(accumulate([0] + [n for *_, n in cut]))[:-1]
            assert sum(n for *_, n in cut) == kept[q][e]
            # ... computing as many of its own rows as its share holds (they do not travel).
            assert sum(n for p, _, _, n in cut if p == q) == min(share[q], kept[q][e])
        for rank in range(W):
            assert sum(n for q in range(W) for p, _, _, n in pieces(q, e) if p == rank) == share[rank]
    totals = [0] * W
    for rank in range(W):
        units = El + len(plan.copies[rank])
        chunks = build_chunks(W, rank, kept, pieces, units, d, torch.device("cpu"))
        totals[rank] = sum(sum(c.unit_counts) for c in chunks)
        for chunk in chunks:
            assert sum(chunk.send_splits) == len(chunk.send_index)
            assert sum(chunk.recv_splits) == sum(chunk.unit_counts)
        # Every row of this rank is sent exactly once.
        sent = torch.cat([c.send_index for c in chunks]).sort().values
        assert torch.equal(sent, torch.arange(sum(kept[rank])))
    assert totals == plan.rows_per_rank


def _split_among_sources(loads: list[int], W: int, data: st.DataObject) -> list[list[int]]:
    """Each expert's rows cut among the ``W`` sources at random: ``kept[q][e]``."""
    kept = [[0] * len(loads) for _ in range(W)]
    for e, load in enumerate(loads):
        cuts = sorted(data.draw(st.lists(st.integers(0, load), min_size=W - 1, max_size=W - 1)))
        bounds = [0, *cuts, load]
        for q in range(W):
            kept[q][e] = bounds[q + 1] - bounds[q]
    return kept


@given(loads_and_world(), st.sampled_from([None, 0, 1, 2]), st.sampled_from([None, 1.0, 1.5]), st.data())
def test_shadowing_moves_no_rows_of_shadowed_experts(case, max_copies, slack, data):
    loads, W = case
    El = len(loads) // W
    kept = _split_among_sources(loads, W, data)
    rows_bound = None if slack is None else math.ceil(slack * sum(loads) / W)
    try:
        plan = plan_rerouting(
            loads, W, sources=kept, max_copies_per_rank=max_copies, max_rows_per_rank=rows_bound
        )
    except ValueError as error:
        assert "max_" in str(error)  # only the bounds may refuse a step ...
        try:  # ... where least-loaded rerouting cannot hold them either, or shadowing spent the copies
            reference_rerouting(loads, W, max_rows_per_rank=rows_bound, max_copies_per_rank=max_copies)
        except ValueError:
            return
        assert max_copies is not None, f"shadowing refused a step least-loaded rerouting holds: {error}"
        return
    _check_exact_cover(plan, loads, W)
    assert max(plan.rows_per_rank) <= max(plan.native_rows_per_rank)  # never worse than plain EP
    if max_copies is not None:
        assert all(len(c) <= max_copies for c in plan.copies)
    if rows_bound is not None:
        assert max(plan.rows_per_rank) <= rows_bound
    pieces = reroute_pieces(kept, plan, El)
    for e, takes in plan.shadowed.items():
        for q, rows in takes:
            # A shadowing rank computes (at least) the rows it took of its own: none travel.
            assert q != e // El and 0 < rows <= kept[q][e]
            assert sum(n for p, _, _, n in pieces(q, e) if p == q) >= rows, (e, q, pieces(q, e))
    assert plan.kind == ("shadow" if plan.shadowed else "lla")


def test_shadowing_the_extreme_skew_keeps_every_row_home():
    # 2 ranks, 4 experts each; every token of both ranks chooses experts 0 and 1 (rank 0).
    loads = [4096, 4096] + [0] * 6
    kept = [[2048, 2048] + [0] * 6, [2048, 2048] + [0] * 6]
    plan = plan_rerouting(loads, 2, sources=kept)
    assert plan.shadowed == {0: [(1, 2048)], 1: [(1, 2048)]} and plan.copies == [[], [0, 1]]
    assert plan.rows_per_rank == [4096, 4096]
    pieces = reroute_pieces(kept, plan, 4)
    assert all(p == q for q in range(2) for e in range(2) for p, *_ in pieces(q, e))
    # Least-loaded rerouting balances it with one copy, but half the rows travel.
    lla = plan_rerouting(loads, 2)
    assert lla.copies == [[], [0]] and not lla.shadowed
    lla_pieces = reroute_pieces(kept, lla, 4)
    assert sum(n for q in range(2) for e in range(2) for p, _, _, n in lla_pieces(q, e) if p != q) == 4096


def test_shadowing_needs_sources_of_every_rank_and_expert():
    with pytest.raises(ValueError, match="sources must be 2 lists of 4 row counts"):
        plan_rerouting([10, 0, 0, 0], 2, sources=[[10, 0, 0, 0]])
    with pytest.raises(ValueError, match="sources of expert 0 sum to 9, not its load 10"):
        plan_rerouting([10, 0, 0, 0], 2, sources=[[5, 0, 0, 0], [4, 0, 0, 0]])


def _never_pays(plan):
    """A cost model under which rerouting never pays (plain expert parallelism is free)."""
    return 0.0 if plan is None else 1.0


def _decide(loads, config, forced=None):
    """The layer's decision on 4 ranks; rank 0 is the source of every expert's rows but an even share."""
    sources = [[x // 4 + (x % 4 if q == 0 else 0) for x in loads] for q in range(4)]
    return decide_rerouting(loads, 4, config, forced, sources=sources, held=None, predict=_never_pays)


def test_the_row_bound_is_honoured_even_when_rerouting_does_not_pay():
    loads = [600, 0, 0, 0, 100, 100, 100, 100]  # plain EP: 600 rows on rank 0 of 4
    plan = _decide(loads, RerouteConfig(max_rows_per_rank=300))
    assert plan is not None and max(plan.rows_per_rank) <= 300
    assert _decide(loads, RerouteConfig()) is None  # without the bound: plain EP (it is free here)


def test_the_row_bound_is_honoured_below_the_threshold():
    loads = [130, 0, 100, 0, 100, 0, 100, 0]  # imbalance 1.21 < threshold 1.3
    plan = _decide(loads, RerouteConfig(max_rows_per_rank=120))
    assert plan is not None and max(plan.rows_per_rank) <= 120


def test_an_unreachable_row_bound_is_reported_not_ignored():
    loads = [600, 0, 0, 0, 100, 100, 100, 100]
    no_copies = RerouteConfig(max_rows_per_rank=300, max_copies_per_rank=0)  # no copy may travel
    with pytest.raises(ValueError, match=r"max_rows_per_rank=300 \(plain expert parallelism puts 600 rows"):
        _decide(loads, no_copies)
    # Within the bound, infeasible rerouting quietly keeps plain expert parallelism.
    assert _decide(loads, RerouteConfig(max_rows_per_rank=700, max_copies_per_rank=0)) is None


def test_a_forced_kind_runs_as_forced_or_raises():
    loads = [600, 0, 0, 0, 100, 100, 100, 100]
    lla = _decide(loads, RerouteConfig(), "lla")
    assert lla is not None and lla.moved_rows and not lla.shadowed
    shadow = _decide(loads, RerouteConfig(), "shadow")
    assert shadow is not None and shadow.kind == "shadow"
    with pytest.raises(ValueError, match="max_copies_per_rank=0"):
        _decide(loads, RerouteConfig(max_rows_per_rank=300, max_copies_per_rank=0), "shadow")
