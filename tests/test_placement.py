"""Expert placement: the planners (balance, affinity, advice) and applying a placement.

Applied on 2 and 4 gloo processes, a placement changes where experts are computed,
never what: outputs, gradients, drops and stats equal the single-device layer for
several plans (rerouting and its memory bounds included); a training run that moves
experts mid-way (weights, gradients and AdamW moments) equals one that does not, and
the single device; checkpoints saved under one placement load under any other and any
world size.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexmoe
from flexmoe import Plan, RerouteConfig
from flexmoe.checkpoint import load_checkpoint, save_checkpoint
from flexmoe.placement import check_placement, experts_by_rank, identity_placement, moved_experts, rank_loads
from flexmoe.planner.placement import (
    LoadTracker,
    advise_placement,
    affinity_placement,
    balanced_placement,
    coactivation_counts,
    same_rank_fraction,
)
from flexmoe.tools.rebalance import CoactivationRecorder

from .parallel_workers import (
    Case,
    check_placement_suite,
    check_rebalancer,
    check_replicas,
    checkpoint_model,
    checkpoint_train_step,
)


# ------------------------------------------------------------------ planners (pure)
def _best_max_load(loads: list[float], W: int) -> float:
    """Brute force: the smallest busiest-rank load over all placements (tiny cases)."""
    E = len(loads)
    El = E // W
    best = float("inf")
    for perm in itertools.permutations(range(E)):
        best = min(best, max(sum(loads[e] for e in perm[p * El : (p + 1) * El]) for p in range(W)))
    return best


def _lpt_max_load(loads: list[float], W: int) -> float:
    """Longest processing time first, E/W experts per rank: each expert to the lightest rank with room."""
    El = len(loads) // W
    totals, sizes = [0.0] * W, [0] * W
    for load in sorted(loads, reverse=True):
        p = min((q for q in range(W) if sizes[q] < El), key=lambda q: (totals[q], q))
        totals[p] += load
        sizes[p] += 1
    return max(totals)


@settings(max_examples=60, deadline=None)
@given(
    W=st.sampled_from([1, 2, 3, 4]),
    El=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["uniform", "zipf", "hot", "zero"]),
)
def test_balanced_placement_is_a_valid_balanced_permutation(W, El, seed, kind):
    E = W * El
    rng = random.Random(seed)
    loads = {
        "uniform": [rng.randint(0, 50) for _ in range(E)],
        "zipf": [1000 / (i + 1) ** 1.2 for i in rng.sample(range(E), E)],
        "hot": [0.0] * (E - 1) + [500.0],
        "zero": [0.0] * E,
    }[kind]
    current = list(range(E))
    rng.shuffle(current)
    placement = balanced_placement(loads, W, current)
    assert check_placement(placement, E, W) == placement  # a permutation
    by_rank = experts_by_rank(placement, W)
    assert all(len(r) == El and -1 not in r for r in by_rank)
    after = rank_loads(loads, placement, W)
    assert sum(after) == pytest.approx(sum(loads))
    # Never worse than the current placement, and within LPT's 4/3 of the optimum on every
    # case small enough to brute-force.
    assert max(after) <= max(rank_loads(loads, current, W)) + 1e-9
    if E <= 6:
        assert max(after) <= _best_max_load(loads, W) * 4 / 3 + 1e-9
    # Swaps only improve on LPT packing: never worse than LPT itself.
    assert max(after) <= _lpt_max_load(loads, W) + 1e-9
    assert balanced_placement(loads, W, current) == placement  # deterministic
    if kind == "zero":  # nothing to gain: nothing moves
        assert moved_experts(current, placement, W) == []


def test_balanced_placement_packs_the_heaviest_onto_the_lightest_rank():
    # Packing each expert onto the busiest rank with room, then swapping, ends at 76 here;
    # LPT packing reaches 74 and the swaps keep it there.
    loads = [0, 39, 31, 21, 15, 46, 20, 45, 4, 12, 36, 14]
    placement = balanced_placement(loads, 4)
    assert max(rank_loads(loads, placement, 4)) <= _lpt_max_load(loads, 4) == 74


def test_balanced_placement_keeps_experts_where_they_are():
    loads = [10, 1, 1, 10, 5, 5, 5, 5]  # 22 and 20 rows on 2 ranks of 4 experts
    placement = balanced_placement(loads, 2)
    assert rank_loads(loads, placement, 2) == [21.0, 21.0]
    # Two experts each way (no single swap evens 22/20); rank 0 keeps its 10 and a 1.
    assert len(moved_experts(identity_placement(8), placement, 2)) == 4
    assert sum(1 for e in (0, 1, 2, 3) if placement[e] < 4) == 2
    # Already balanced: the same placement back, nothing moves.
    assert balanced_placement(loads, 2, placement) == placement
    assert balanced_placement([5.0] * 4, 1) == identity_placement(4)  # one rank: slots follow ids


def test_coactivation_counts_and_affinity_placement_recover_planted_chains():
    # Planted affinity: a token on expert e in layer 0 goes to expert (3e + 1) % 8 in layer 1,
    # and on to (3f + 1) % 8 in layer 2. Loads are uniform, so any balanced placement is fine.
    E, W, T = 8, 2, 400
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, E, (T, 1), generator=g)
    second = (3 * first + 1) % E
    third = (3 * second + 1) % E
    c01, c12 = coactivation_counts(first, second, E), coactivation_counts(second, third, E)
    assert c01.shape == (E, E) and int(c01.sum()) == T and int(c01[2, 7]) == int((first == 2).sum())
    loads = [torch.bincount(ids.flatten(), minlength=E).tolist() for ids in (first, second, third)]
    placements = affinity_placement(loads, [c01, c12], W, tolerance=0.25)
    assert len(placements) == 3
    for layer_loads, placement in zip(loads, placements, strict=True):
        check_placement(placement, E, W)
        best = max(rank_loads(layer_loads, balanced_placement(layer_loads, W), W))
        assert max(rank_loads(layer_loads, placement, W)) <= best * 1.25 + 1e-9
    for c, a, b in ((c01, placements[0], placements[1]), (c12, placements[1], placements[2])):
        assert same_rank_fraction(c, a, b, W) == 1.0  # every hop stays on its rank
        naive = same_rank_fraction(c, identity_placement(E), identity_placement(E), W)
        assert naive < 0.6
    with pytest.raises(ValueError, match="same tokens"):
        coactivation_counts(first, second[:3], E)


def test_advice_pays_only_when_the_gain_outweighs_the_move():
    loads = [100.0, 100.0, 1.0, 1.0]  # both hot experts on rank 0 of 2
    args = {"bytes_per_expert": 1e6, "link_bytes_per_s": 1e9, "link_latency_s": 1e-5, "min_gain": 0.05}
    advice = advise_placement(
        loads, identity_placement(4), 2, seconds_per_row=1e-5, horizon_steps=100, **args
    )
    assert advice.pays and advice.experts_moved == 2
    assert advice.rows_per_rank_before == [200.0, 2.0] and advice.rows_per_rank_after == [101.0, 101.0]
    assert advice.step_seconds_saved == pytest.approx(99 * 1e-5)
    assert advice.move_seconds == pytest.approx(1e6 / 1e9 + 8e-5)  # one expert each way per rank
    short = advise_placement(loads, identity_placement(4), 2, seconds_per_row=1e-5, horizon_steps=1, **args)
    assert not short.pays  # one step cannot pay back 1 MB
    balanced = advise_placement(loads, advice.placement, 2, seconds_per_row=1e-5, horizon_steps=100, **args)
    assert not balanced.pays and balanced.experts_moved == 0


def test_advice_with_a_cost_model_sees_rows_in_slot_order():
    from flexmoe import MoEConfig
    from flexmoe.planner import load_cluster
    from flexmoe.planner.layer_cost import CostModel

    loads = [4000.0, 4000.0, 10.0, 10.0]  # both hot experts on rank 0 of 2
    seen: list[list[float]] = []
    cost = CostModel(
        load_cluster("a100-80gb-hdr200"), MoEConfig(dim=1024, hidden_dim=4096, num_experts=4), 2, 2
    )

    def step_seconds(rows: list[float]) -> float:
        seen.append(rows)
        return cost.predict(Plan(r=1, reroute=False), rows, 4010, 2, 0.0, True, torch.bfloat16)

    args = {"bytes_per_expert": 1e6, "link_bytes_per_s": 1e9, "link_latency_s": 1e-5, "horizon_steps": 100}
    advice = advise_placement(loads, identity_placement(4), 2, step_seconds=step_seconds, **args)
    assert seen[0] == loads and sorted(seen[1][:2]) == [10.0, 4000.0]  # the proposal splits them
    assert advice.pays and advice.step_seconds_saved > 0
    assert advice.step_seconds_saved == pytest.approx(step_seconds(loads) - step_seconds(seen[1]))
    with pytest.raises(ValueError, match="step_seconds"):
        advise_placement(loads, identity_placement(4), 2, **args)


def test_bad_placements_are_refused():
    with pytest.raises(ValueError, match="permutation of range"):
        check_placement([0, 0, 1, 2], 4, 2)
    with pytest.raises(ValueError, match="multiple of the world size"):
        check_placement([0, 1, 2], 3, 2)
    layer = flexmoe.MoELayer(8, 8, 4, 2, group=False)
    assert layer.apply_placement([0, 1, 2, 3]).experts_moved == 0
    with pytest.raises(ValueError, match="only the identity placement exists on one device"):
        layer.apply_placement([1, 0, 2, 3])
    with pytest.raises(ValueError, match="permutation"):
        layer.apply_placement([0, 1, 2])
    assert layer.expert_placement == [0, 1, 2, 3] and layer.stored_experts == [0, 1, 2, 3]


def test_load_tracker_and_coactivation_recorder():
    tracker = LoadTracker(3, decay=0.5)
    assert tracker.loads == [0.0, 0.0, 0.0]
    tracker.update([4, 0, 2])
    assert tracker.loads == [4.0, 0.0, 2.0]  # bias-corrected: the first step is the average
    tracker.update(torch.tensor([0, 6, 2]))
    assert tracker.loads == pytest.approx([4 / 3, 4.0, 2.0])  # (0.5 * c1 + c2) / 1.5
    with pytest.raises(ValueError, match="shape"):
        tracker.update([1, 2])

    torch.manual_seed(0)
    blocks = [flexmoe.MoELayer(8, 8, 4, 2, group=False) for _ in range(3)]
    recorder = CoactivationRecorder(blocks, group=False)
    x = torch.randn(10, 8)
    ids = []
    for block in blocks:
        ids.append(block.router(x, 2).expert_ids_TK)
        x = block(x)
    counts = recorder.counts()
    assert len(counts) == 2 and all(int(c.sum()) == 10 * 2 * 2 for c in counts)
    assert torch.equal(counts[0], coactivation_counts(ids[0], ids[1], 4))
    recorder.reset()
    recorder.remove()
    blocks[0](x)
    assert all(int(c.sum()) == 0 for c in recorder.counts())


# ------------------------------------------------------------------ applied (gloo)
def _shuffled(E: int, seed: int) -> list[int]:
    """A random placement: most experts change rank, some only their slot."""
    rng = random.Random(seed)
    slots = list(range(E))
    rng.shuffle(slots)
    return slots


def _placed_cases(W: int) -> list[tuple[Case, list[int], bool]]:
    E = 2 * W
    plans = [Plan(r=1), Plan(r=1, d=2, exchange="2dh"), Plan(r=0), Plan(reroute=True), Plan(reroute=False)]
    tight = RerouteConfig(max_rows_per_rank=16, max_copies_per_rank=1)  # mean: 12 rows per rank (top-2)
    zipf = [1.0 / (e + 1) ** 1.2 for e in range(E)]
    return [
        # Drop decisions: fixed capacity, default order; then batch-prioritised.
        (
            Case(num_experts=E, capacity_factor=1.0, bias=True, plans=plans, ranks_per_node=1),
            _shuffled(E, 1),
            False,
        ),
        (
            Case(num_experts=E, capacity_factor=0.75, batch_prioritized=True, seed=3, plans=plans[:3]),
            _shuffled(E, 2),
            True,
        ),
        # Skewed routing: balanced by the planner, rerouting (with hard bounds) on top.
        (
            Case(num_experts=E, skew="zipf", seed=6, tokens_per_rank=[6] * W, rerouting=tight, plans=plans),
            balanced_placement(zipf, W),
            False,
        ),
        # A per-token number of experts: top-p routing and a copy expert, capacity drops.
        (
            Case(num_experts=E, top_k=3, top_p=0.6, zero_experts=("copy",), capacity_factor=1.0, plans=plans),
            _shuffled(E, 4),
            False,
        ),
    ]


def _train_reference(tmp_path):
    """A single-device checkpoint and the loss of one step after it (the oracle)."""
    torch.manual_seed(0)
    reference, reference_opt = checkpoint_model(num_experts=4, bias=True)

    def step(seed: int) -> float:
        return checkpoint_train_step(reference, reference_opt, seed)

    step(9)  # non-zero AdamW state to carry over
    save_checkpoint(tmp_path / "w1", reference, reference_opt, step=0)
    loss = step(10)
    return reference, reference_opt, loss


def _check_reloaded(tmp_path, reference, reference_opt):
    final, final_opt = checkpoint_model(num_experts=4, bias=True)
    load_checkpoint(tmp_path / "wn", final, final_opt)
    for (name, a), b in zip(reference.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for p_ref, p_new in zip(reference.parameters(), final.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(final_opt.state[p_new][key], reference_opt.state[p_ref][key])


@pytest.mark.distributed
def test_two_ranks_placed_layer_training_and_checkpoints(rank_pools, tmp_path):
    # One set of 2 processes:
    # 1. placed layers (4 experts; shuffled and planner placements) equal the single device;
    # 2. training with cross-rank moves at steps 1 and 3 (weights, gradients, AdamW
    #    moments) equals training without them and the single device;
    # 3. a single-device checkpoint loads under a placement, trains a step, is saved under
    #    another placement and loads back on one device: the single device's step.
    reference, reference_opt, loss = _train_reference(tmp_path)
    checkpoint = (str(tmp_path / "w1"), str(tmp_path / "wn"), 10, [3, 0, 2, 1], [1, 2, 3, 0])
    training = (4, {1: [2, 1, 0, 3], 3: [1, 3, 2, 0]})
    results = rank_pools.run(check_placement_suite, 2, _placed_cases(2), training, checkpoint, timeout=300)
    checked, reports, got_loss = results[0]
    assert checked == 5 + 3 + 5 + 5
    first = reports[0]
    assert first["experts_moved"] == 2 and first["bytes_sent"] > 0
    assert first["bytes_sent"] == first["bytes_received"]
    # Per parameter (w_in, w_out, b_in, b_out): itself, its gradient, both AdamW moments.
    assert first["tensors"] == 4 * 4
    # One tensor's moved rows at a time: at most 2 experts' w_in out and 2 in (fp32).
    assert 0 < first["peak_buffer_bytes"] <= 4 * (2 * 8 * 16) * 4
    assert got_loss == pytest.approx(loss, rel=1e-5)
    _check_reloaded(tmp_path, reference, reference_opt)


@pytest.mark.distributed
def test_four_ranks_placed_layer_training_and_checkpoints(rank_pools, tmp_path):
    # The same on 4 processes (8 experts; 4 for the checkpoint, one per rank).
    reference, reference_opt, loss = _train_reference(tmp_path)
    checkpoint = (str(tmp_path / "w1"), str(tmp_path / "wn"), 10, [2, 3, 0, 1], [3, 1, 0, 2])
    training = (8, {2: _shuffled(8, 7)})
    results = rank_pools.run(check_placement_suite, 4, _placed_cases(4), training, checkpoint, timeout=300)
    checked, _, got_loss = results[0]
    assert checked == 5 + 3 + 5 + 5
    assert got_loss == pytest.approx(loss, rel=1e-5)
    _check_reloaded(tmp_path, reference, reference_opt)


@pytest.mark.distributed
def test_rebalancer_separates_hot_experts_while_training(rank_pools):
    placements = rank_pools.run(check_rebalancer, 2, timeout=120)[0]
    assert placements[0] == [0, 1, 2, 3]  # before the first re-plan
    El = 2
    assert placements[-1][0] // El != placements[-1][1] // El  # the hot pair now on two ranks


def test_replica_placement_copies_the_hot_experts():
    from flexmoe.planner.placement import replica_placement

    loads = [400.0, 10.0, 10.0, 10.0, 300.0, 10.0, 10.0, 10.0]  # hot: 0 (rank 0), 4 (rank 2) of 4
    replicas = replica_placement(loads, identity_placement(8), 4, per_rank=1)
    assert sum(len(r) for r in replicas) >= 2 and all(len(r) <= 1 for r in replicas)
    held = {e for r in replicas for e in r}
    assert 0 in held and held <= {0, 4, 5}  # rank 2 (experts 4, 5) is over the mean too
    assert all(e not in replicas[e // 2] for e in held)  # never a replica of its own expert
    swapped = [2, 1, 0, 3, 4, 5, 6, 7]  # experts 0 and 2 trade slots: ids stay logical
    moved = replica_placement(loads, swapped, 4, per_rank=1)
    assert 0 in {e for r in moved for e in r} and all(0 not in r for r in moved[1:2])
    with pytest.raises(ValueError, match="per_rank"):
        replica_placement(loads, identity_placement(8), 4, per_rank=-1)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_replicas_serve_inference_without_transfers_and_stay_exact(rank_pools, world):
    log = rank_pools.run(check_replicas, world, timeout=120)[0]
    (fill, fill_hits), (serve, hits), (train, _), (refresh, refresh_hits), (again, again_hits) = log
    assert fill > 0 and fill_hits == 0  # first use: the copies travel and are kept
    assert serve == 0 and hits >= world - 1  # unchanged weights: no transfer at all
    assert train > 0  # a training step sends (gradients go back to the owner)
    assert refresh > 0 and refresh_hits == 0  # the optimizer changed the owner's weights
    assert again == 0 and again_hits >= world - 1
