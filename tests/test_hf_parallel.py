"""A converted ``transformers`` model with its experts spread over 2 gloo processes equals the original."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

from tests.distributed import RankPools

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


def test_converted_models_with_expert_parallelism_over_two_ranks(rank_pools: RankPools) -> None:
    # Mixtral (4 experts, 2 per rank) and Qwen2-MoE (8 experts, a gated shared expert).
    checked = rank_pools.run(_expert_parallel_worker, 2, ["mixtral", "qwen2_moe"])
    assert checked[0] == checked[1] and all(n > 0 for n in checked[0])


def _saving_worker(rank: int, world_size: int, directory: str) -> None:
    import flexmoe.hf as hf
    from tests.hf_tiny import VOCAB, tiny_model
    from tests.test_hf_save import assert_same_state

    for model_type in ("mixtral", "deepseek_v3"):
        model = tiny_model(model_type)  # the same weights on every rank (same seed)
        expected = model.state_dict()
        expected = {key: value.clone() for key, value in expected.items()}
        conversion = hf.convert(model, group=None)
        layers = [block.moe for block in conversion.blocks.values()]
        assert all(layer.world_size == world_size for layer in layers)
        # state_dict() gathers every expert (a collective): each rank gets the whole model.
        assert_same_state(model.state_dict(), expected)
        if model_type == "mixtral":  # experts moved between ranks are still saved in logical order
            for layer in layers:
                layer.apply_placement([2, 3, 0, 1])
                assert layer.stored_experts == [[2, 3], [0, 1]][rank]
            assert_same_state(model.state_dict(), expected)
        # save_pretrained on every rank (it calls state_dict()); only rank 0 writes.
        model.save_pretrained(Path(directory) / model_type, is_main_process=rank == 0)

        # load_state_dict with the original names: each rank keeps its experts' slices.
        source = tiny_model(model_type, seed=1)
        result = model.load_state_dict(source.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        for path, block in conversion.blocks.items():
            layer, full = block.moe, source.get_submodule(path).experts.gate_up_proj
            assert torch.equal(layer.experts.w_in, full[layer.stored_experts])
        ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(100 + rank))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=2e-5, rtol=1e-5)
        assert_same_state(model.state_dict(), source.state_dict())


def test_a_converted_expert_parallel_model_saves_every_expert(rank_pools: RankPools, tmp_path: Path) -> None:
    # Mixtral (4 experts, then moved between the ranks) and DeepSeek-V3 (a selection bias).
    from transformers import AutoModelForCausalLM

    from tests.hf_tiny import VOCAB, tiny_model

    rank_pools.run(_saving_worker, 2, str(tmp_path))
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    for model_type in ("mixtral", "deepseek_v3"):
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / model_type, output_loading_info=True)
        assert not any(info.values()), info
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, tiny_model(model_type)(ids).logits)


def _checkpoint_worker(rank: int, world_size: int, directory: str) -> None:
    import flexmoe.hf as hf
    from flexmoe.checkpoint import load_checkpoint, save_checkpoint
    from tests.hf_tiny import VOCAB, tiny_model

    model = tiny_model("mixtral")
    hf.convert(model, group=None)
    save_checkpoint(directory, model, step=1)  # state_dict() is a collective here: no hang
    other = tiny_model("mixtral", seed=1)
    hf.convert(other, group=None)
    load_checkpoint(directory, other)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_converted_expert_parallel_model_round_trips_through_a_checkpoint(
    rank_pools: RankPools, tmp_path: Path
) -> None:
    rank_pools.run(_checkpoint_worker, 2, str(tmp_path), timeout=120)
