"""LoRA adapters on distributed layers equal the single-device layer with the same adapter.

On 2 and 4 gloo processes: every valid plan (pipelined ``d``, flat and hierarchical
exchange, ``r = 0`` weight gathering, forced least-loaded rerouting and shadowing, which
move the factors with the weights), for seeded random cases (activation, bias,
capacity, uneven and empty per-rank batches, adapted subsets, targets, ranks); outputs,
input and factor gradients. Training moves placements and holds replicas between steps
(see ``lora_parallel_workers``).
"""

from __future__ import annotations

import pytest
import torch

from .distributed import run_distributed
from .lora_parallel_workers import (
    LoRACase,
    check_lora_checkpoint_refusal,
    check_lora_equivalence,
    check_lora_inference,
    check_lora_refusals,
    check_lora_training,
    lora_checkpoint_run,
    random_cases,
)

pytestmark = pytest.mark.distributed


def test_two_ranks_every_plan_equals_single_device_lora():
    cases = [
        LoRACase(num_experts=4, ranks_per_node=1),
        LoRACase(num_experts=4, top_k=1, experts=[1], hot=True, seed=1),
        LoRACase(
            num_experts=2, activation="gelu", bias=True, capacity_factor=1.0, targets=("w_out",), seed=2
        ),
        *random_cases(2, 4, seed=3),
    ]
    checked = run_distributed(check_lora_equivalence, 2, cases, timeout=300)
    # Per case: r = 0, r = 1 with d in {1, 2} and both exchanges, least-loaded and shadowing with d in {1, 2}.
    assert checked[0] == 7 * (1 + 4 + 4)


def test_four_ranks_every_plan_equals_single_device_lora():
    cases = [LoRACase(num_experts=8, top_k=1, experts=[0, 5], hot=True), *random_cases(4, 3, seed=4)]
    assert run_distributed(check_lora_equivalence, 4, cases, timeout=400)[0] == 4 * (1 + 4 + 4)


def test_inference_unmerged_and_merged_equals_single_device_lora():
    assert run_distributed(check_lora_inference, 2, timeout=200)[0] == 2 * (1 + 4 + 4)


def test_training_moves_factors_with_placements_and_replicas():
    moves = [[], [1, 0, 3, 2], [], [2, 3, 0, 1]]
    losses = run_distributed(check_lora_training, 2, 4, moves, timeout=200)
    assert all(len(per_rank) == len(moves) for per_rank in losses)


def test_peft_files_of_spread_adapters_refuse(tmp_path):
    saving, loading = run_distributed(check_lora_refusals, 2, str(tmp_path), timeout=120)[0]
    assert "PEFT files of adapters on distributed layers" in saving
    assert "PEFT files into distributed blocks" in loading


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        got_key, want_key = torch.tensor(got[key]), torch.tensor(want[key])
        torch.testing.assert_close(got_key, want_key, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_checkpoints_with_lora_reshard_between_one_and_two_ranks(tmp_path):
    """Factors and their AdamW state are stored per expert: saved on 1 rank, resumed on 2, and back."""
    single = lora_checkpoint_run(0, 1, str(tmp_path / "one"), "save")
    assert torch.tensor(single["1.experts.lora.A_in"]).shape == (2, 2, 16)  # experts 0 and 3
    resumed = run_distributed(lora_checkpoint_run, 2, str(tmp_path / "one"), "load", timeout=200)
    spread = run_distributed(lora_checkpoint_run, 2, str(tmp_path / "two"), "save", timeout=200)
    for state in (*resumed, *spread):
        _same(state, single)
    _same(lora_checkpoint_run(0, 1, str(tmp_path / "two"), "load"), single)
    refused = run_distributed(check_lora_checkpoint_refusal, 2, str(tmp_path / "one"), timeout=200)
    assert all("does not adapt" in message for message in refused)
    assert "does not adapt" in check_lora_checkpoint_refusal(0, 1, str(tmp_path / "two"))
