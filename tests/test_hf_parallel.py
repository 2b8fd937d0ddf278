"""A converted ``transformers`` model with its experts spread over 2 gloo processes equals the original."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _expert_parallel_worker(rank: int, world_size: int, model_types: list[str]) -> list[int]:
    return [_check_expert_parallel(rank, world_size, model_type) for model_type in model_types]


def _check_expert_parallel(rank: int, world_size: int, model_type: str) -> int:
    import flexmoe.hf as hf
    from tests.hf_tiny import VOCAB, tiny_model

    model = tiny_model(model_type)  # the same weights on every rank (same seed)
    reference = copy.deepcopy(model)
    reference.train()
    model.train()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(100 + rank))
    expected = reference(ids, labels=ids)
    expected.loss.backward()
    originals = {path: module for path, module in model.named_modules() if path.endswith(".mlp")}

    conversion = hf.convert(model, group=None)  # the default group: both ranks
    for path, block in conversion.blocks.items():
        layer = block.moe
        assert layer.world_size == world_size and layer.name == f"{path}.moe"
        num_experts = layer.config.num_experts
        assert layer.experts.w_in.shape[0] == num_experts // world_size  # only this rank's experts
        assert originals[path].experts.gate_up_proj.numel() == 0  # the full tensors were released
        assert layer.router.weight is originals[path].gate.weight

    out = model(ids, labels=ids)  # this rank's tokens; experts computed where they live
    torch.testing.assert_close(out.logits, expected.logits, atol=2e-5, rtol=1e-5)
    out.loss.backward()

    model.eval()
    reference.eval()
    kwargs = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))

    hf.revert(model)  # a collective: gathers every rank's experts back
    for path, module in originals.items():
        assert model.get_submodule(path) is module
        expected_block = reference.get_submodule(path)
        assert torch.equal(module.experts.gate_up_proj, expected_block.experts.gate_up_proj)
        assert torch.equal(module.experts.down_proj, expected_block.experts.down_proj)
    # Router, attention and embedding gradients come from this rank's tokens only: equal.
    # (The experts' gradients stayed on this rank's slices, summed over both ranks' tokens.)
    reference_params = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if ".experts." in name:
            continue
        torch.testing.assert_close(param.grad, reference_params[name].grad, atol=2e-5, rtol=1e-4, msg=name)
        checked += 1
    return checked


def test_converted_models_with_expert_parallelism_over_two_ranks() -> None:
    # Mixtral (4 experts, 2 per rank) and Qwen2-MoE (8 experts, a gated shared expert).
    checked = run_distributed(_expert_parallel_worker, 2, ["mixtral", "qwen2_moe"])
    assert checked[0] == checked[1] and all(n > 0 for n in checked[0])
