"""flexmoe.hf on tiny whole `transformers` models: same logits, gradients, updates, generations; revert."""

from __future__ import annotations

import copy
import io

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

import flexmoe
import flexmoe.hf as hf
from flexmoe.experts import resolve_backend
from tests.hf_tiny import EXPERT_BACKENDS, MODELS, VOCAB, tiny_model

ATOL = 2e-5


def _ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _pair(
    model_type: str, backend: str = "auto", **overrides: object
) -> tuple[torch.nn.Module, torch.nn.Module, hf.Conversion]:
    original = tiny_model(model_type, **overrides)
    converted = copy.deepcopy(original)
    return original, converted, hf.convert(converted, backend=backend)


def _assert_backend_ran(conversion: hf.Conversion, backend: str) -> None:
    """Every converted block's last call ran on ``backend`` (not a fallback)."""
    expected = resolve_backend(backend, torch.device("cpu"), torch.float32)
    for path, block in conversion.blocks.items():
        stats = block.moe.stats
        assert stats is not None and stats.backend == expected, (path, stats and stats.backend)


def _assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_eval_logits_and_greedy_generation_unchanged(model_type: str, backend: str) -> None:
    original, converted, conversion = _pair(model_type, backend)
    assert conversion.blocks and not conversion.refused
    assert all(isinstance(block, hf.FlexMoEBlock) for block in conversion.blocks.values())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=ATOL, rtol=1e-5)
    _assert_backend_ran(conversion, backend)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(converted.generate(ids, **kwargs), original.generate(ids, **kwargs))
    # The round trip gives back the very weights: bit for bit, the original model.
    hf.revert(converted)
    _assert_same_state(converted.state_dict(), original.state_dict())


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_training_step_same_loss_gradients_and_update(model_type: str, backend: str) -> None:
    original, converted, conversion = _pair(model_type, backend)
    original.train()
    converted.train()
    ids = _ids(seed=2, batch=3)
    out_original = original(ids, labels=ids)
    out_converted = converted(ids, labels=ids)
    _assert_backend_ran(conversion, backend)
    torch.testing.assert_close(out_converted.logits, out_original.logits, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out_converted.loss, out_original.loss, atol=ATOL, rtol=1e-5)
    out_original.loss.backward()
    out_converted.loss.backward()
    # One optimizer step on the converted model updates the model's own Parameters.
    for model in (original, converted):
        torch.optim.SGD(model.parameters(), lr=0.5).step()

    hf.revert(converted)
    grads = dict(converted.named_parameters())
    for name, param in original.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(grads[name].grad, param.grad, atol=ATOL, rtol=1e-4, msg=name)
        torch.testing.assert_close(grads[name], param, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe"])
def test_router_logits_and_aux_loss_unchanged(model_type: str) -> None:
    original, converted, _ = _pair(model_type, router_aux_loss_coef=0.1)
    ids = _ids(seed=3)
    out_original = original(ids, labels=ids, output_router_logits=True)
    out_converted = converted(ids, labels=ids, output_router_logits=True)
    assert len(out_converted.router_logits) == len(out_original.router_logits) > 0
    for got, expected in zip(out_converted.router_logits, out_original.router_logits, strict=True):
        torch.testing.assert_close(got.to(expected.dtype), expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out_converted.aux_loss, out_original.aux_loss, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out_converted.loss, out_original.loss, atol=ATOL, rtol=1e-5)


def test_shares_parameters_and_revert_restores_the_same_modules() -> None:
    model = tiny_model("qwen2_moe")
    blocks = {name: module for name, module in model.named_modules() if name.endswith(".mlp")}
    params_before = {name: param for name, param in model.named_parameters()}
    state_before = {name: value.clone() for name, value in model.state_dict().items()}

    conversion = hf.convert(model)
    assert set(conversion.blocks) == set(blocks)
    for path, new in conversion.blocks.items():
        old = blocks[path]
        assert model.get_submodule(path) is new and new.original is old
        assert new.moe.router.weight is old.gate.weight
        assert new.moe.experts.w_in is old.experts.gate_up_proj
        assert new.moe.experts.w_out is old.experts.down_proj
        assert new.shared_expert is old.shared_expert and new.shared_expert_gate is old.shared_expert_gate
    # No parameter was copied: the converted model holds exactly the original Parameters.
    assert {id(p) for p in model.parameters()} == {id(p) for p in params_before.values()}

    assert conversion.revert() is model
    for path, old in blocks.items():
        assert model.get_submodule(path) is old
    assert all(param is params_before[name] for name, param in model.named_parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state_before[name]), name
    with pytest.raises(ValueError, match="no converted block"):
        hf.revert(model)


def test_stats_and_options_reach_the_layers() -> None:
    model = tiny_model("mixtral")
    conversion = hf.convert(model, capacity_factor=1.0, backend="loop")
    ids = _ids(batch=4, length=8)
    with torch.no_grad():
        model(ids)
    for block in conversion.blocks.values():
        stats = block.moe.stats
        assert stats is not None and stats.backend == "loop" and stats.capacity == 16
        assert int(stats.routed_per_expert.sum()) == ids.numel() * 2
        assert int(stats.tokens_per_expert.sum()) + stats.dropped == ids.numel() * 2
    assert "MixtralSparseMoeBlock -> MoELayer(4 experts, top-2, softmax)" in conversion.summary()


def test_aux_free_balancing_trains_the_models_own_bias() -> None:
    model = tiny_model("deepseek_v3")
    gates = [layer.mlp.gate for layer in model.model.layers[1:]]
    before = [gate.e_score_correction_bias.clone() for gate in gates]
    conversion = hf.convert(model, aux_free_rate=1e-2)
    model.train()
    ids = _ids(batch=4)
    model(ids, labels=ids).loss.backward()
    flexmoe.update_expert_biases(model)
    for block, gate, old in zip(conversion.blocks.values(), gates, before, strict=True):
        assert block.moe.router.expert_bias_E.data_ptr() == gate.e_score_correction_bias.data_ptr()
        assert not torch.equal(gate.e_score_correction_bias, old)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        hf.revert(model)
        torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="selection bias"):
        hf.convert(tiny_model("mixtral"), aux_free_rate=1e-3)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_bf16_and_dtype_conversions_round_trip(model_type: str) -> None:
    original = tiny_model(model_type)
    model = copy.deepcopy(original)
    hf.convert(model)
    model.to(torch.bfloat16)  # flexmoe keeps its router and selection bias in fp32 meanwhile
    original.to(torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        # bf16 rounding (and fp32 routing, against transformers' bf16 routing): loosely equal.
        torch.testing.assert_close(logits, original(ids).logits, atol=0.05, rtol=0.05)
    hf.revert(model)
    gate = model.model.layers[0 if model_type == "mixtral" else 1].mlp.gate
    assert gate.weight.dtype == torch.bfloat16  # the transformers router gets the model's dtype back
    # Every weight is the original's cast to bf16, bit for bit; the selection bias keeps
    # its dtype (flexmoe held it in fp32) with the bf16-rounded value.
    state, expected = model.state_dict(), original.state_dict()
    assert list(state) == list(expected)
    for name, value in expected.items():
        if "e_score_correction_bias" in name:
            assert torch.equal(state[name].to(value.dtype), value), name
            continue
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=0, rtol=0)


def test_refused_model_is_left_untouched() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("phimoe", vocab_size=VOCAB, hidden_size=32, intermediate_size=24)
    config.update({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    config.update({"num_local_experts": 4, "num_experts_per_tok": 2})
    phimoe = AutoModelForCausalLM.from_config(config)
    before = list(phimoe.modules())
    with pytest.raises(
        hf.UnsupportedMoEError, match=r"PhimoeSparseMoeBlock at 'model\.layers\.0\.mlp'"
    ) as info:
        hf.convert(phimoe)
    assert info.value.block_class == "PhimoeSparseMoeBlock" and "SparseMixer" in info.value.reason
    assert list(phimoe.modules()) == before
    conversion = hf.convert(phimoe, strict=False)
    assert not conversion.blocks and [e.path for e in conversion.refused] == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    with pytest.raises(ValueError, match="no sparse-MoE block"):
        hf.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_configuration_flexmoe_does_not_reproduce_is_refused() -> None:
    with pytest.raises(hf.UnsupportedMoEError, match="router_jitter_noise"):
        hf.convert(tiny_model("mixtral", router_jitter_noise=0.1))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_renormalised_top_1_gives_weight_1_as_transformers_does(model_type: str) -> None:
    original, converted, conversion = _pair(model_type, num_experts_per_tok=1)
    assert all(b.moe.config.router.normalize_single for b in conversion.blocks.values())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=ATOL, rtol=1e-5)


def _phimoe_and_gpt_oss(experts_implementation: str) -> list[torch.nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 24, "num_local_experts": 4}
    common.update({"num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    models = []
    for model_type, extra in (
        ("phimoe", {}),  # routing that convert refuses (SparseMixer)
        ("gpt_oss", {"head_dim": 8, "layer_types": ["full_attention", "sliding_attention"]}),  # fallback
    ):
        config = AutoConfig.for_model(model_type, num_hidden_layers=2, **common, **extra)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, experts_implementation=experts_implementation)
        models.append(model.eval())
    return models


def test_flexmoe_experts_implementation() -> None:
    assert hf.register_experts_implementation() == "flexmoe"
    ids = _ids(seed=4)
    for model_type in ("mixtral", "qwen2_moe"):
        original = tiny_model(model_type, experts_implementation="eager")
        on_flexmoe = copy.deepcopy(original)
        on_flexmoe.set_experts_implementation("flexmoe")
        assert on_flexmoe.config._experts_implementation == "flexmoe"
        out_original, out_flexmoe = original(ids, labels=ids), on_flexmoe(ids, labels=ids)
        torch.testing.assert_close(out_flexmoe.logits, out_original.logits, atol=ATOL, rtol=1e-5)
        out_original.loss.backward()
        out_flexmoe.loss.backward()
        for (name, p), q in zip(original.named_parameters(), on_flexmoe.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-4, msg=name)
    # Blocks that convert() refuses keep their own routing on flexmoe's experts, and
    # expert layouts flexmoe does not compute fall back to transformers' grouped_mm.
    pairs = zip(_phimoe_and_gpt_oss("eager"), _phimoe_and_gpt_oss("flexmoe"), strict=True)
    for original, on_flexmoe in pairs:
        with torch.no_grad():
            torch.testing.assert_close(on_flexmoe(ids).logits, original(ids).logits, atol=ATOL, rtol=1e-5)


def test_converted_model_deepcopies_and_pickles() -> None:
    model = tiny_model("deepseek_v3")
    hf.convert(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        hf.revert(copied)  # restores the copy's own original blocks, not the source model's
        assert type(copied.model.layers[1].mlp).__name__ == "DeepseekV3MoE"
        assert isinstance(model.model.layers[1].mlp, hf.FlexMoEBlock)
        with torch.no_grad():
            torch.testing.assert_close(copied(ids).logits, expected, atol=ATOL, rtol=1e-5)


def test_bad_arguments_raise_before_anything_changes() -> None:
    model = tiny_model("mixtral")
    block = model.model.layers[0].mlp
    with pytest.raises(ValueError, match="itself is a sparse-MoE block"):
        hf.convert(block)
    with pytest.raises(ValueError, match="backend"):
        hf.convert(model, backend="bogus")
    with pytest.raises(ValueError, match="capacity_factor"):
        hf.convert(model, capacity_factor=float("nan"))
    assert model.model.layers[0].mlp is block
