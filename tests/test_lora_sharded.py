"""LoRA adapters on sharded experts (``num_experts < W``) equal the single-device layer with the same adapter.

Each expert's hidden units are split over ``S = W/E`` ranks, and its adapter with them
(see ``lora_sharded_workers``). On 2 and 4 gloo processes: every valid plan (``r = 0``,
each divisor of ``S``, pipelined ``d``, flat and hierarchical exchange), outputs, the
input's and every factor's gradients; unmerged and merged inference; AdamW training;
checkpoints resharded between one and four ranks.
"""

from __future__ import annotations

import pytest
import torch

from .lora_parallel_workers import (
    LoRACase,
    check_lora_checkpoint_refusal,
    check_lora_equivalence,
    check_lora_inference,
    lora_checkpoint_run,
)
from .lora_sharded_workers import check_sharded_dropout, check_sharded_training, sharded_cases

pytestmark = pytest.mark.distributed


def test_two_ranks_one_expert_every_plan_equals_single_device_lora(rank_pools):
    cases = [
        LoRACase(num_experts=1, top_k=1),
        LoRACase(num_experts=1, top_k=1, activation="gelu", bias=True, capacity_factor=1.0, seed=1),
        *sharded_cases(2, 3, seed=2),
    ]
    # r = 0 (no pipelining), then r in {1, 2} with d in {1, 2} and both exchanges.
    assert rank_pools.run(check_lora_equivalence, 2, cases, timeout=300)[0] == 5 * (1 + 4 + 4)


def test_four_ranks_every_plan_equals_single_device_lora(rank_pools):
    cases = [
        LoRACase(num_experts=2, top_k=1, experts=[1], targets=("w_in",)),
        LoRACase(num_experts=1, top_k=1, bias=True, seed=1),  # S = 4: r in {0, 1, 2, 4}
        *sharded_cases(4, 2, seed=3),
    ]
    # Per case: r = 0, then each divisor r of S = 4/E with d in {1, 2} and both exchanges.
    divisors = {1: 3, 2: 2}  # E -> divisors of S
    expected = sum(1 + 4 * divisors[case.num_experts] for case in cases)
    assert rank_pools.run(check_lora_equivalence, 4, cases, timeout=400) == [expected] * 4


def test_inference_unmerged_and_merged_equals_single_device_lora(rank_pools):
    assert rank_pools.run(check_lora_inference, 2, 1, timeout=200)[0] == 2 * (1 + 4 + 4)


def _shards_agree(copies: list[dict], shards: list[list[int]]) -> None:
    """The ranks of each expert hold bitwise equal whole factors (``A_in``, ``B_out``) and gradients."""
    for ranks in shards:
        first = copies[ranks[0]]
        assert {"A_in", "A_in.grad", "B_out", "B_out.grad"} <= first.keys()
        for other in ranks[1:]:
            assert copies[other] == first, f"ranks {ranks[0]} and {other} hold different copies"


def test_training_equals_single_device_and_keeps_the_whole_factors_equal_on_every_shard(rank_pools):
    steps = rank_pools.run(check_sharded_training, 4, 2, 4, timeout=300)  # per rank: 4 steps, then the end
    for step in range(4):
        _shards_agree([per_rank[step] for per_rank in steps], [[0, 1], [2, 3]])
    assert steps[0][-1] == steps[1][-1] and steps[2][-1] == steps[3][-1]


def test_dropout_draws_masks_per_shard_and_still_trains(rank_pools):
    changes, copies = zip(*rank_pools.run(check_sharded_dropout, 2, 1, timeout=200), strict=True)
    assert max(changes) > 0  # dropout changed the LoRA terms
    _shards_agree(list(copies), [[0, 1]])


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        got_key, want_key = torch.tensor(got[key]), torch.tensor(want[key])
        torch.testing.assert_close(got_key, want_key, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_checkpoints_with_lora_reshard_between_one_and_four_ranks(rank_pools, tmp_path):
    """Two experts, the adapter on expert 1: saved on 1 rank, resumed sharded on 4, and back."""
    setting = (2, (1,))
    single = lora_checkpoint_run(0, 1, str(tmp_path / "one"), "save", *setting)
    assert torch.tensor(single["1.experts.lora.B_in"]).shape == (1, 16, 2)  # swiglu: H = 2F
    resumed = rank_pools.run(lora_checkpoint_run, 4, str(tmp_path / "one"), "load", *setting, timeout=300)
    spread = rank_pools.run(lora_checkpoint_run, 4, str(tmp_path / "four"), "save", *setting, timeout=300)
    for state in (*resumed, *spread):
        _same(state, single)
    _same(lora_checkpoint_run(0, 1, str(tmp_path / "four"), "load", *setting), single)
    assert "does not adapt" in check_lora_checkpoint_refusal(0, 1, str(tmp_path / "four"), 2, (0,))
    refused = rank_pools.run(check_lora_checkpoint_refusal, 4, str(tmp_path / "one"), 2, (0,), timeout=300)
    assert all("does not adapt" in message for message in refused[2:])  # the shards of expert 1
    assert all("failed on another rank" in message for message in refused[:2])
