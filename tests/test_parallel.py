"""Expert parallelism on several gloo processes equals the single-device layer.

Every valid plan (r, d in {1, 2, 4}, flat and 2DH exchange) for world sizes 2 and 4
(8: marked slow), with dropless, fixed, adaptive and batch-prioritised capacity,
gated and plain activations, biases and uneven per-rank batches: outputs and
gradients (input, expert slices, router) match the single-device layer holding the
same global weights on the concatenated global batch, and switching plans moves no
parameter (see ``parallel_workers``).
"""

from __future__ import annotations

import pytest
import torch

from flexmoe import MoELayer, Plan, RerouteConfig
from flexmoe.parallel import CollectiveTimeoutError
from flexmoe.parallel.comm import Communicator
from flexmoe.placement import Placement

from .distributed import run_distributed
from .parallel_workers import (
    Case,
    check_compiled_graph,
    check_ddp,
    check_eight_ranks,
    check_equivalence,
    check_exchange,
    check_failures,
    check_timeout,
    check_variable_k_mismatch,
)

pytestmark = pytest.mark.distributed


def _cases(world: int, experts: list[int]) -> list[Case]:
    two_level = {2: 1, 4: 2, 8: 2}[world]  # ranks per node for the 2DH exchange: several nodes
    cases = []
    for E in experts:
        K = min(2, E)
        cases += [
            Case(num_experts=E, top_k=K, ranks_per_node=two_level),
            Case(num_experts=E, top_k=K, activation="gelu", bias=True, capacity_factor=1.0, seed=1),
            Case(
                num_experts=E,
                top_k=K,
                bias=True,
                capacity_factor=-1.5,
                seed=2,
                tokens_per_rank=[5, 9, 0, 7, 3, 1, 8, 2][:world],
                load_balance_weight=0.0,  # the per-rank loss mean is the global one only for equal batches
                ranks_per_node=two_level,
            ),
            Case(num_experts=E, top_k=K, capacity_factor=0.75, batch_prioritized=True, seed=3),
        ]
    return cases


def test_two_ranks_every_plan_equals_single_device(rank_pools):
    # E = 4, 2: whole experts (2 and 1 per rank); E = 1: one expert in 2 hidden shards.
    bf16 = [
        Case(num_experts=E, top_k=min(2, E), dtype=torch.bfloat16, seed=4, capacity_factor=1.25)
        for E in (4, 1)
    ]
    checked = rank_pools.run(check_equivalence, 2, [*_cases(2, [4, 2, 1]), *bf16], timeout=300)
    assert checked[0] == 2 * 4 * 7 + 4 * 13 + 7 + 13  # plans per case: 1 + 6 (S=1) or 1 + 12 (S=2)


def test_four_ranks_every_plan_equals_single_device(rank_pools):
    checked = rank_pools.run(check_equivalence, 4, _cases(4, [8, 4, 2, 1]), timeout=400)
    assert checked[0] == 4 * (7 + 7 + 13 + 19)


@pytest.mark.slow
def test_eight_ranks_every_plan_equals_single_device():
    # One set of 8 processes: 2DH == flat (4x2, 2x4, 8x1, 1x8 nodes x ranks), then every plan
    # for whole experts (E=16), experts in 4 shards (E=2) and in 8 shards (E=1).
    cases = [c for i, c in enumerate(_cases(8, [16, 2, 1])) if i % 4 in (0, 2)]
    run_distributed(check_eight_ranks, 8, [2, 4, 1, 8], cases, timeout=600)


def test_hierarchical_exchange_equals_flat(rank_pools):
    rank_pools.run(check_exchange, 4, [1, 2, 4, 2])  # 4x1, 2x2, 1x4 nodes x ranks


def test_mismatched_settings_and_bad_input_raise_on_every_rank(rank_pools):
    # In one set of processes: each case raises on both ranks, and the next case starts cleanly.
    results = rank_pools.run(check_failures, 2)
    for what in ("num_experts", "dim", "plan", "top_k"):
        for messages in (results[0][what], results[1][what]):
            assert "ranks disagree on" in messages and what.split("_")[0] in messages, messages
    for what, expected in (("dim", "x must have shape [..., dim=16]"), ("nan", "non-finite")):
        rank0, rank1 = results[0][f"input {what}"], results[1][f"input {what}"]
        assert rank0.startswith("RuntimeError") and "rank(s) [1] rejected their input" in rank0, rank0
        assert rank1.startswith("ValueError") and expected in rank1, rank1


def test_collective_timeout_names_layer_and_step():
    message = run_distributed(check_timeout, 2, timeout=60)[0]
    assert "MoELayer 'blocks.3.moe' step 1" in message and "2.0 s" in message, message


def test_a_backend_timeout_is_a_collective_timeout_and_other_failures_name_the_layer():
    # gloo's own timeout (the layer's, passed to the process group) can fire before the wait's
    comm = Communicator(group=None, name="blocks.3.moe", timeout=5.0)
    comm.step = 7

    def fail(message: str) -> None:
        raise RuntimeError(message)

    try:
        with pytest.raises(CollectiveTimeoutError, match=r"step 7: all_to_all did not complete within 5.0 s"):
            comm.run(fail, "all_to_all", "[gloo/transport/tcp] Timed out waiting 2000ms for send operation")
        with pytest.raises(RuntimeError, match=r"'blocks.3.moe' step 7: all_to_all failed: connection reset"):
            comm.run(fail, "all_to_all", "connection reset")
    finally:
        comm.close()


def test_ddp_with_expert_parameters_excluded(rank_pools):
    rank_pools.run(check_ddp, 2)


def test_placement_rejects_uneven_layouts():
    with pytest.raises(ValueError, match="multiple of the world size"):
        Placement(world_size=4, rank=0, num_experts=6, hidden_dim=8, ranks_per_node=4)
    with pytest.raises(ValueError, match="multiple of num_experts"):
        Placement(world_size=6, rank=0, num_experts=4, hidden_dim=8, ranks_per_node=6)
    with pytest.raises(ValueError, match="hidden_dim=6 must be divisible"):
        Placement(world_size=4, rank=0, num_experts=1, hidden_dim=6, ranks_per_node=4)
    with pytest.raises(ValueError, match="ranks_per_node"):
        Placement(world_size=4, rank=0, num_experts=4, hidden_dim=8, ranks_per_node=3)
    placement = Placement(world_size=8, rank=5, num_experts=2, hidden_dim=8, ranks_per_node=4)
    assert placement.valid_r() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match=r"plan.r must be one of \[0, 1, 2, 4\]"):
        placement.resolve(Plan(r=3))
    assert placement.resolve(Plan()).r == 4  # default: rows move, weights never do


def test_single_device_layer_ignores_group_false():
    layer = MoELayer(8, 8, 4, 2, group=False)
    assert layer.world_size == 1


def _skew_cases(world: int) -> list[Case]:
    forced = [Plan(reroute=kind, d=d) for kind in (True, "shadow") for d in (1, 2)]
    forced += [Plan(reroute=None), Plan(reroute=False)]
    tight = RerouteConfig(max_rows_per_rank=28, max_copies_per_rank=1)  # mean: 24 rows per rank
    cases = []
    for E in (world, 2 * world):
        for skew, seed, K in (("one", 5, 1), ("zipf", 6, 2), ("never", 7, 2)):
            cases.append(
                Case(num_experts=E, top_k=K, skew=skew, seed=seed, tokens_per_rank=[24] * world, plans=forced)
            )
        cases.append(
            Case(
                num_experts=E,
                top_k=1,
                skew="one",
                seed=8,
                tokens_per_rank=[24] * world,
                rerouting=tight,
                plans=forced,
            )
        )
        cases.append(
            Case(
                num_experts=E,
                skew="zipf",
                seed=9,
                capacity_factor=1.0,
                bias=True,
                activation="gelu",
                tokens_per_rank=[30, 10, 20, 24][:world],
                load_balance_weight=0.0,
                plans=forced,
            )
        )
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_rerouting_under_extreme_skew_equals_single_device(rank_pools, world):
    # All tokens to one expert, Zipf, one expert never chosen; least-loaded and shadowing
    # forced, automatic and off; memory bounds asserted on the executed plan (see
    # parallel_workers).
    rank_pools.run(check_equivalence, world, _skew_cases(world), timeout=300)


def test_compiled_model_around_a_distributed_layer(rank_pools):
    """torch.compile of a model with a distributed layer: exact under every plan, one break per layer."""
    cases = [Case(num_experts=4, compiled=True), Case(num_experts=2, capacity_factor=1.0, compiled=True)]
    assert rank_pools.run(check_equivalence, 2, cases, timeout=300)[0] == 7 + 7
    breaks = rank_pools.run(check_compiled_graph, 2)
    assert breaks[0] == breaks[1] == ["forward: Skip inlining `torch.compiler.disable()`d function"] * 2


def _variable_k_cases(world: int) -> list[Case]:
    """Top-p routing and zero-computation experts: whole and sharded experts, every capacity
    policy, uneven batches (an empty rank), 2DH, forced rerouting under skew, the tuner."""
    two_level = {2: 1, 4: 2}[world]
    uneven = [5, 9, 0, 7][:world]
    forced: list[Plan | str] = [Plan(reroute=True), Plan(reroute="shadow", d=2), Plan(reroute=None), "auto"]
    whole = 2 * world
    return [
        Case(num_experts=whole, top_k=3, top_p=0.5, ranks_per_node=two_level, seed=10),
        Case(num_experts=whole, top_k=2, top_p=0.6, capacity_factor=1.0, bias=True, seed=11),
        Case(
            num_experts=whole,
            top_k=2,
            top_p=0.6,
            capacity_factor=-1.5,
            tokens_per_rank=uneven,
            load_balance_weight=0.0,  # the per-rank loss mean is the global one only for equal batches
            seed=12,
        ),
        Case(num_experts=whole, top_k=2, top_p=0.6, capacity_factor=0.75, batch_prioritized=True, seed=13),
        Case(
            num_experts=whole,
            top_k=2,
            zero_experts=("skip", "copy", "constant"),
            capacity_factor=1.0,
            ranks_per_node=two_level,
            seed=14,
        ),
        Case(
            num_experts=whole,
            top_k=3,
            top_p=0.7,
            zero_experts=("constant",),
            batch_prioritized=True,
            capacity_factor=0.75,
            seed=15,
        ),
        # Sharded experts (E < W): one expert in W hidden shards, a skip expert beside it.
        Case(num_experts=1, top_k=2, zero_experts=("skip", "constant"), capacity_factor=1.0, seed=16),
        # The tuner on sharded experts, with more choices per token (2) than routed experts (1).
        Case(num_experts=1, top_k=2, top_p=0.9, zero_experts=("copy",), plans=["auto", "auto"], seed=18),
        # Hot expert 0 (every token's first choice): forced rerouting, shadowing, the tuner.
        Case(
            num_experts=whole,
            top_k=2,
            top_p=0.5,
            zero_experts=("copy",),
            skew="one",
            tokens_per_rank=[24] * world,
            plans=forced,
            seed=17,
        ),
    ]


@pytest.mark.parametrize("world", [2, 4])
def test_variable_k_and_zero_experts_equal_single_device(rank_pools, world):
    """Every plan: outputs, gradients (input, router, experts, zero constants) and stats
    (experts per token, zero-expert choices, drops, capacity) of the concatenated batch."""
    checked = rank_pools.run(check_equivalence, world, _variable_k_cases(world), timeout=400)
    assert checked[0] > 8 * 4


def test_ranks_disagreeing_on_top_p_raise_on_every_rank(rank_pools):
    for messages in rank_pools.run(check_variable_k_mismatch, 2):
        assert len(messages) == 1 and "ranks disagree on top_p" in messages[0], messages
