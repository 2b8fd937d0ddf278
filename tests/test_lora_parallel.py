"""LoRA adapters on distributed layers equal the single-device layer with the same adapter.

On 2 and 4 gloo processes: every valid plan (pipelined ``d``, flat and hierarchical
exchange, ``r = 0`` weight gathering, forced least-loaded rerouting and shadowing, which
move the factors with the weights), for seeded random cases (activation, bias,
capacity, uneven and empty per-rank batches, adapted subsets, targets, ranks); outputs,
input and factor gradients. Training moves placements and holds replicas between steps
(see ``lora_parallel_workers``). PEFT's adapter files of a converted ``transformers`` model
with spread experts: what it saves is the single-device model's files and loads in PEFT
with equal logits; PEFT's files load into it with PEFT's logits under every plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from flexmoe.adapters.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from .distributed import RankPools
from .lora_parallel_workers import (
    PEFT_TARGETS,
    LoRACase,
    check_lora_checkpoint_refusal,
    check_lora_equivalence,
    check_lora_inference,
    check_lora_training,
    check_peft_load,
    check_peft_save,
    lora_checkpoint_run,
    peft_input_ids,
    peft_tiny_model,
    random_cases,
)

pytestmark = pytest.mark.distributed


def test_two_ranks_every_plan_equals_single_device_lora(rank_pools):
    cases = [
        LoRACase(num_experts=4, ranks_per_node=1),
        LoRACase(num_experts=4, top_k=1, experts=[1], hot=True, seed=1),
        LoRACase(
            num_experts=2, activation="gelu", bias=True, capacity_factor=1.0, targets=("w_out",), seed=2
        ),
        *random_cases(2, 4, seed=3),
    ]
    checked = rank_pools.run(check_lora_equivalence, 2, cases, timeout=300)
    # Per case: r = 0, r = 1 with d in {1, 2} and both exchanges, least-loaded and shadowing with d in {1, 2}.
    assert checked[0] == 7 * (1 + 4 + 4)


def test_four_ranks_every_plan_equals_single_device_lora(rank_pools):
    cases = [LoRACase(num_experts=8, top_k=1, experts=[0, 5], hot=True), *random_cases(4, 3, seed=4)]
    assert rank_pools.run(check_lora_equivalence, 4, cases, timeout=400)[0] == 4 * (1 + 4 + 4)


def test_inference_unmerged_and_merged_equals_single_device_lora(rank_pools):
    assert rank_pools.run(check_lora_inference, 2, timeout=200)[0] == 2 * (1 + 4 + 4)


def test_training_moves_factors_with_placements_and_replicas(rank_pools):
    moves = [[], [1, 0, 3, 2], [], [2, 3, 0, 1]]
    losses = rank_pools.run(check_lora_training, 2, 4, moves, timeout=200)
    assert all(len(per_rank) == len(moves) for per_rank in losses)


def _peft_model(targets: tuple[str, ...], num_experts: int, silent_expert: int | None) -> torch.nn.Module:
    """PEFT's own adapter on the unconverted model, trained-looking; ``silent_expert``'s factors zero."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=PEFT_TARGETS[targets])
    model = get_peft_model(peft_tiny_model(num_experts), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
            if silent_expert is not None and "lora_A" in name:  # [E*r, in]: expert e's rows e*r ..
                p[silent_expert * 4 : silent_expert * 4 + 4] = 0.0
            if silent_expert is not None and "lora_B" in name:  # [out, r*E]: column j*E + e
                p[:, silent_expert::num_experts] = 0.0
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=peft_input_ids()).logits


def _check_saved_by_spread_model(directory: Path, num_experts: int, want: torch.Tensor) -> None:
    """The spread model's files are the single-device model's, byte for byte, and PEFT computes ``want``."""
    spread, single = directory / "spread", directory / "single"
    assert json.loads((spread / ADAPTER_CONFIG).read_text()) == json.loads(
        (single / ADAPTER_CONFIG).read_text()
    )
    ours, theirs = load_file(spread / ADAPTER_WEIGHTS), load_file(single / ADAPTER_WEIGHTS)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (spread / name).read_bytes() == (single / name).read_bytes(), name
    assert (directory / "rank0").is_dir() and not (directory / "rank1").exists()
    loaded = PeftModel.from_pretrained(peft_tiny_model(num_experts), spread).eval()
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(peft_tiny_model(num_experts)), want, atol=1e-3)  # the adapter matters


def _check_loaded_into_spread_model(
    rank_pools: RankPools,
    directory: Path,
    world: int,
    num_experts: int,
    targets: tuple[str, ...],
    silent_expert: int | None,
) -> None:
    """PEFT's files load into the spread model with PEFT's logits under every plan, and save back the same."""
    theirs = _peft_model(targets, num_experts, silent_expert)
    want = _logits(theirs)
    theirs.save_pretrained(directory)
    checked = rank_pools.run(check_peft_load, world, str(directory), num_experts, want.tolist(), timeout=300)
    assert checked == [checked[0]] * world and checked[0] >= 2
    again, first = load_file(directory / "again" / ADAPTER_WEIGHTS), load_file(directory / ADAPTER_WEIGHTS)
    assert again.keys() == first.keys()
    assert all(torch.equal(again[key], first[key]) for key in first)


def test_two_ranks_save_peft_files_that_peft_loads_with_equal_logits(
    rank_pools: RankPools, tmp_path: Path
) -> None:
    # Some experts adapted, both projections, experts moved to other ranks before saving.
    args = (str(tmp_path), 8, [1, 4, 6], ("w_in", "w_out"), True)
    want = torch.tensor(rank_pools.run(check_peft_save, 2, *args, timeout=300)[0])
    _check_saved_by_spread_model(tmp_path, 8, want)


@pytest.mark.parametrize(("targets", "silent_expert"), [(("w_in", "w_out"), None), (("w_out",), 2)])
def test_two_ranks_load_peft_files_with_peft_logits(
    rank_pools: RankPools, tmp_path: Path, targets, silent_expert
) -> None:
    _check_loaded_into_spread_model(rank_pools, tmp_path, 2, 8, targets, silent_expert)


def test_four_ranks_sharded_experts_peft_files_both_ways(rank_pools: RankPools, tmp_path: Path) -> None:
    # 2 experts over 4 ranks: each rank holds half of one expert's hidden units and factors.
    want = torch.tensor(
        rank_pools.run(
            check_peft_save, 4, str(tmp_path / "save"), 2, [1], ("w_in", "w_out"), False, timeout=400
        )[0]
    )
    _check_saved_by_spread_model(tmp_path / "save", 2, want)
    _check_loaded_into_spread_model(rank_pools, tmp_path / "load", 4, 2, ("w_in", "w_out"), None)


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        got_key, want_key = torch.tensor(got[key]), torch.tensor(want[key])
        torch.testing.assert_close(got_key, want_key, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_checkpoints_with_lora_reshard_between_one_and_two_ranks(rank_pools, tmp_path):
    """Factors and their AdamW state are stored per expert: saved on 1 rank, resumed on 2, and back."""
    single = lora_checkpoint_run(0, 1, str(tmp_path / "one"), "save")
    assert torch.tensor(single["1.experts.lora.A_in"]).shape == (2, 2, 16)  # experts 0 and 3
    resumed = rank_pools.run(lora_checkpoint_run, 2, str(tmp_path / "one"), "load", timeout=200)
    spread = rank_pools.run(lora_checkpoint_run, 2, str(tmp_path / "two"), "save", timeout=200)
    for state in (*resumed, *spread):
        _same(state, single)
    _same(lora_checkpoint_run(0, 1, str(tmp_path / "two"), "load"), single)
    refused = rank_pools.run(check_lora_checkpoint_refusal, 2, str(tmp_path / "one"), timeout=200)
    assert all("does not adapt" in message for message in refused)
    assert "does not adapt" in check_lora_checkpoint_refusal(0, 1, str(tmp_path / "two"))
