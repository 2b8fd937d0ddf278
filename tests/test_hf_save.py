"""A converted `transformers` model saves and loads as itself: the original names, layouts and values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5.0")

import flexmoe
import flexmoe.hf as hf
from tests.hf_tiny import VOCAB, tiny_model

ATOL = 2e-5
# One family per router shape: softmax, shared expert with its gate, renormalised
# softmax, no renormalisation, top-k of logits (router named `router`), sigmoid with
# groups and a selection bias, softmax groups with a scale.
SAVED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "deepseek_v3", "deepseek_v2"]


def _ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same keys in the same order, each with the same dtype, shape and bits."""
    assert list(got) == list(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def _train_one_step(model: nn.Module, seed: int = 5) -> None:
    """One SGD step (and an aux-loss-free bias update) on ``model``: its weights move off the originals."""
    model.train()
    ids = _ids(seed=seed, batch=3)
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    flexmoe.update_expert_biases(model)
    model.eval()


@pytest.mark.parametrize("model_type", SAVED)
def test_state_dict_of_a_converted_model_is_the_original_state_dict(model_type: str) -> None:
    original = tiny_model(model_type)
    converted = copy.deepcopy(original)
    hf.convert(converted)
    assert_same_state(converted.state_dict(), original.state_dict())
    # keep_vars=True gives the model's own Parameters, as for the original model.
    kept = converted.state_dict(keep_vars=True)
    for name, param in original.named_parameters():
        assert kept[name] is param or torch.equal(kept[name], param), name
    assert not any(".moe." in key for key in converted.state_dict())


@pytest.mark.parametrize("model_type", SAVED)
def test_save_pretrained_of_a_converted_model_loads_in_plain_transformers(
    model_type: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    aux_free = {"aux_free_rate": 1e-2} if model_type == "deepseek_v3" else {}
    original = tiny_model(model_type)
    converted = copy.deepcopy(original)
    hf.convert(converted, **aux_free)
    _train_one_step(converted)  # trained while converted: the trained weights must be saved
    expected_state = hf.revert(copy.deepcopy(converted)).state_dict()
    assert any(not torch.equal(value, original.state_dict()[key]) for key, value in expected_state.items())

    converted.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key: nothing re-initialised
    assert not any(isinstance(m, hf.FlexMoEBlock) for m in loaded.modules())
    assert_same_state(loaded.state_dict(), expected_state)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, converted(ids).logits, atol=ATOL, rtol=1e-5)
    # The converted model is still converted, and still the same model.
    assert any(isinstance(m, hf.FlexMoEBlock) for m in converted.modules())


@pytest.mark.parametrize("model_type", SAVED)
def test_save_pretrained_of_an_untrained_conversion_equals_the_original(
    model_type: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    original = tiny_model(model_type)
    converted = copy.deepcopy(original)
    hf.convert(converted)
    converted.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)  # the same weights, the same code


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "granitemoe"])
def test_load_state_dict_with_the_original_names_into_a_converted_model(model_type: str) -> None:
    source = tiny_model(model_type, seed=1)  # other weights (and selection biases) than the target's
    target = tiny_model(model_type, seed=0)
    conversion = hf.convert(target)
    result = target.load_state_dict(source.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(target.state_dict(), source.state_dict())
    ids = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source(ids).logits, atol=ATOL, rtol=1e-5)
    # Loaded into the model's own tensors: flexmoe's layer computes with them.
    for path, block in conversion.blocks.items():
        original_experts = source.get_submodule(path).experts
        assert torch.equal(block.moe.experts.w_in, original_experts.gate_up_proj)
        assert torch.equal(block.moe.experts.w_out, original_experts.down_proj)
    hf.revert(target)
    assert_same_state(target.state_dict(), source.state_dict())


def test_a_state_dict_with_a_wrong_expert_shape_is_refused() -> None:
    model = tiny_model("mixtral")
    state = model.state_dict()
    hf.convert(model)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    full = state[key]
    # Too few rows, and the same numbers transposed ([E, D, 2F]): refused under the original name.
    for wrong in (full[:, :-2], full.transpose(1, 2)):
        state[key] = wrong
        with pytest.raises(
            RuntimeError, match=r"size mismatch for model\.layers\.0\.mlp\.experts\.gate_up_proj"
        ):
            model.load_state_dict(state)


def test_state_dict_after_a_dtype_conversion_is_the_reverted_models() -> None:
    original = tiny_model("deepseek_v3")
    converted = copy.deepcopy(original)
    conversion = hf.convert(converted, aux_free_rate=1e-2)
    converted.to(torch.bfloat16)  # flexmoe keeps its router and selection bias in fp32 meanwhile
    state = converted.state_dict()
    assert_same_state(state, hf.revert(copy.deepcopy(converted)).state_dict())
    expected = original.to(torch.bfloat16).state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        if "e_score_correction_bias" in key:  # the original block's dtype; bf16-rounded values
            assert torch.equal(state[key].to(value.dtype), value), key
            continue
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key

    # The selection bias trained after the cast lives in flexmoe's fp32 copy: saved from there.
    _train_one_step(converted)
    state = converted.state_dict()
    for path, block in conversion.blocks.items():
        bias = block.moe.router.expert_bias_E
        saved = state[f"{path}.gate.e_score_correction_bias"]
        assert saved.dtype == torch.float32 and torch.equal(saved, bias), path
        assert not torch.equal(saved, expected[f"{path}.gate.e_score_correction_bias"].float()), path
    assert_same_state(state, hf.revert(copy.deepcopy(converted)).state_dict())
