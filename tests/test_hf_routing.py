"""flexmoe.hf.set_routing: experts per token changed at run time, against transformers built that way."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flexmoe.hf
from flexmoe import MoELayer
from flexmoe.hf import load_offloaded, offload_stats, routing_settings, set_routing
from flexmoe.hf.routing import moe_layers
from tests.hf_tiny import MODELS, VOCAB, tiny_model

FAMILIES = sorted(MODELS)


def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def generate(model: nn.Module, ids: torch.Tensor, tokens: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )


def converted(family: str, **overrides) -> nn.Module:
    model = tiny_model(family, **overrides)
    flexmoe.hf.convert(model)
    return model


def other_top_ks(model: nn.Module) -> list[int]:
    """Top-k values below and above the model's, top-1 included (weight 1 when renormalised)."""
    layer = moe_layers(model)[0][1]
    config = layer.config
    reachable = config.router.topk_groups * (config.num_experts // config.router.num_groups)
    return [k for k in range(1, reachable + 1) if k != config.top_k]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_changed_top_k_computes_what_transformers_built_with_it_computes(family):
    model = converted(family)
    ids = prompt()
    original = logits(model, ids)
    for top_k in other_top_ks(model):
        with set_routing(model, top_k=top_k) as override:
            assert [r.top_k for r in override.current] == [top_k] * len(override.current)
            expected = logits(tiny_model(family, num_experts_per_tok=top_k), ids)
            torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits(model, ids), original), (family, top_k)  # restored exactly


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_top_p_at_its_limits_equals_top_1_and_the_unchanged_model(family):
    model = converted(family)
    ids = prompt()
    original = logits(model, ids)
    with set_routing(model, top_k=1):
        top_1 = logits(model, ids)
    with set_routing(model, top_p=1e-6):  # every token keeps its best expert only
        torch.testing.assert_close(logits(model, ids), top_1, rtol=1e-6, atol=1e-6)
        assert all(layer.stats.experts_per_token[1] == ids.numel() for _, layer in moe_layers(model))
    top_k = routing_settings(model)[0].top_k
    with set_routing(model, top_p=1e-6, min_k=top_k):  # min_k = top_k keeps every expert
        torch.testing.assert_close(logits(model, ids), original, rtol=1e-6, atol=1e-6)
    with set_routing(model, top_p=0.3):
        logits(model, ids)
        mean = [layer.stats.mean_experts_per_token for _, layer in moe_layers(model)]
        assert all(1.0 <= m <= top_k for m in mean)
    assert all(r.top_p is None for r in routing_settings(model))


def test_layers_changes_only_the_listed_layers_and_restore_puts_them_back():
    model = converted("qwen3_moe")
    before = routing_settings(model)
    override = set_routing(model, top_k=1, top_p=0.5, layers=[1])
    after = routing_settings(model)
    assert after[0] == before[0]
    assert (after[1].top_k, after[1].top_p, after[1].min_k) == (1, 0.5, 1)
    assert override.previous == [before[1]] and override.current == [after[1]]
    override.restore()
    override.restore()  # a second restore does nothing
    assert routing_settings(model) == before


def test_a_with_block_restores_even_when_it_raises():
    model = converted("olmoe")
    before = routing_settings(model)
    with pytest.raises(RuntimeError, match="inside"), set_routing(model, top_k=1):
        assert routing_settings(model)[0].top_k == 1
        raise RuntimeError("inside")
    assert routing_settings(model) == before


def test_min_k_follows_a_lower_top_k_unless_given():
    layer = MoELayer(8, 16, 6, 4, router=flexmoe.RouterConfig(top_p=0.5, min_k=3))
    model = nn.Sequential(layer)
    set_routing(model, top_k=2)
    assert (layer.config.top_k, layer.config.router.min_k) == (2, 2)
    with pytest.raises(ValueError, match=r"^0: router\.min_k must be an int in \[1, top_k=2\], got 3"):
        set_routing(model, min_k=3)


def test_bad_values_are_refused_with_the_argument_named():
    model = converted("mixtral")  # 4 experts, top-2
    before = routing_settings(model)
    refusals = [
        ({"top_k": 0}, r"^top_k must be an int >= 1 or None, got 0"),
        ({"top_k": True}, r"^top_k must be an int >= 1 or None"),
        ({"top_k": 1.5}, r"^top_k must be an int >= 1 or None"),
        ({"top_k": 5}, r"^model\.layers\.0\.mlp\.moe: top_k must be an int in \[1, num_experts=4\], got 5"),
        ({"top_p": 0.0}, r"^top_p must be a float in \(0, 1\], got 0\.0"),
        ({"top_p": 1.5}, r"^top_p must be a float in \(0, 1\]"),
        ({"min_k": 0}, r"^min_k must be an int >= 1 or None"),
        ({"min_k": 3}, r"^model\.layers\.0\.mlp\.moe: router\.min_k must be an int in \[1, top_k=2\], got 3"),
        (
            {"top_k": 1, "layers": [2]},
            r"^layers must be indices of the model's 2 MoE layers \(0 to 1\), got \[2\]",
        ),
        ({"top_k": 1, "layers": []}, r"^layers must be indices of the model's 2 MoE layers"),
        ({"top_k": 1, "layers": [True]}, r"^layers must be indices"),
        ({"top_k": 1, "layers": "0"}, r"^layers must be a sequence of indices"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message):
            set_routing(model, **kwargs)
        assert routing_settings(model) == before, kwargs
    with pytest.raises(ValueError, match=r"has no flexmoe MoE layer: convert it with flexmoe\.hf\.convert"):
        set_routing(tiny_model("mixtral"), top_k=1)


def test_a_refusal_by_one_layer_leaves_every_layer_unchanged():
    model = nn.Sequential(MoELayer(8, 16, 8, 2), MoELayer(8, 16, 4, 2))
    before = routing_settings(model)
    with pytest.raises(ValueError, match=r"^1: top_k must be an int in \[1, num_experts=4\], got 6"):
        set_routing(model, top_k=6)
    assert routing_settings(model) == before
    set_routing(model, top_k=6, layers=[0])
    assert [r.top_k for r in routing_settings(model)] == [6, 2]


@given(
    changes=st.lists(
        st.tuples(
            st.none() | st.integers(0, 9),  # top_k
            st.sampled_from(["keep", None, 0.3, 0.9]),  # top_p
            st.none() | st.integers(1, 5),  # min_k
            st.none() | st.lists(st.integers(0, 2), min_size=1, max_size=3),  # layers
        ),
        min_size=1,
        max_size=6,
    )
)
def test_changes_apply_to_the_chosen_layers_or_not_at_all_and_undo_in_reverse(changes):
    model = nn.Sequential(MoELayer(8, 16, 8, 3), MoELayer(8, 16, 6, 2), MoELayer(8, 16, 4, 4))
    history = [routing_settings(model)]
    overrides = []
    for top_k, top_p, min_k, layers in changes:
        before = routing_settings(model)
        kwargs = {"top_k": top_k, "min_k": min_k, "layers": layers}
        if top_p != "keep":
            kwargs["top_p"] = top_p
        try:
            override = set_routing(model, **kwargs)
        except ValueError:
            assert routing_settings(model) == before
            continue
        after = routing_settings(model)
        chosen = set(range(3) if layers is None else layers)
        for index, (old, new) in enumerate(zip(before, after, strict=True)):
            if index not in chosen:
                assert new == old
                continue
            assert new.top_k == (old.top_k if top_k is None else top_k)
            assert new.top_p == (old.top_p if top_p == "keep" else top_p)
            assert new.min_k == (min(old.min_k, new.top_k) if min_k is None else min_k)
        overrides.append(override)
        history.append(after)
    for override in reversed(overrides):
        history.pop()
        override.restore()
        assert routing_settings(model) == history[-1]
    assert routing_settings(model) == history[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_moe")
    tiny_model("qwen3_moe").save_pretrained(directory)
    return directory


def expert_bytes(model: nn.Module) -> int:
    w_in, w_out = moe_layers(model)[0][1].experts.w_in, moe_layers(model)[0][1].experts.w_out
    return (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()


@pytest.mark.parametrize("routing", [{"top_k": 1}, {"top_k": 2}, {"top_p": 0.3}])
def test_an_offloaded_model_generates_what_the_in_memory_model_does_under_the_same_routing(saved, routing):
    reference = converted("qwen3_moe")
    each = expert_bytes(reference)
    ids = prompt()
    set_routing(reference, **routing)
    expected = generate(reference, ids)
    model = load_offloaded(saved, expert_budget=4 * each)
    set_routing(model, **routing)
    assert torch.equal(generate(model, ids), expected)
    top_k = routing_settings(model)[0].top_k
    for _, layer in moe_layers(model):
        layer.strategy.confidence = layer.strategy.min_precision = 0.0  # predict the whole top-k
    before = offload_stats(model)
    with torch.no_grad():
        model(ids[:1, :1])  # one token: layer 1 is predicted with its top-k, as it now is
    assert offload_stats(model).predicted - before.predicted == top_k


def test_an_offloaded_model_refuses_a_top_k_its_budget_cannot_hold_at_once(saved):
    each = expert_bytes(converted("qwen3_moe"))
    model = load_offloaded(saved, expert_budget=3 * each)  # top-3: exactly one token's experts
    before = routing_settings(model)
    with pytest.raises(
        ValueError, match=r"^model\.layers\.0\.mlp\.moe: expert_budget of \d+ bytes is too small"
    ):
        set_routing(model, top_k=4)
    assert routing_settings(model) == before
    for _, layer in moe_layers(model):
        layer.strategy.confidence = layer.strategy.min_precision = 0.0  # predict the whole top-k
    assert predicted_by_one_token(model) == 3  # layer 1's top-3
    with set_routing(model, top_k=1):
        assert predicted_by_one_token(model) == 1
    assert predicted_by_one_token(model) == 3


def predicted_by_one_token(model: nn.Module) -> int:
    """Experts predicted (for every layer but the first) in a forward of one token."""
    before = offload_stats(model).predicted
    with torch.no_grad():
        model(prompt()[:1, :1])
    return offload_stats(model).predicted - before


@pytest.mark.parametrize("routing", [{"top_k": 1}, {"top_p": 1e-6, "min_k": 1}])
def test_the_prediction_reads_the_next_layers_routing_as_it_is_at_each_call(saved, routing):
    each = expert_bytes(converted("qwen3_moe"))
    model = load_offloaded(saved, expert_budget=4 * each)
    layers = [layer for _, layer in moe_layers(model)]
    layers[1].set_routing(**routing)  # on the layer itself, not through flexmoe.hf.set_routing
    layers[1].strategy.confidence = layers[1].strategy.min_precision = 0.0  # the whole top-k
    before = offload_stats(model)
    with torch.no_grad():
        model(prompt()[:1, :1])  # one token: layer 1 takes one expert, so one is predicted
    assert offload_stats(model).predicted - before.predicted == 1
