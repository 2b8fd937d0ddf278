"""flexmoe.layer.offloaded: the experts predicted with confidence, and where load_offloaded predicts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import flexmoe.hf
from flexmoe import MoELayer
from flexmoe.experts.cache import ExpertCache
from flexmoe.hf import load_offloaded, offload_stats
from flexmoe.layer.offloaded import offload_experts, offloaded_cache, predicted_experts, prefetch_experts
from tests.hf_tiny import VOCAB, tiny_model

E, D = 8, 16


def reference_prediction(layer: MoELayer, h_TD: torch.Tensor, confidence: float) -> list[int]:
    """Each token's top-k experts by its softmax probabilities, kept where >= confidence / E."""
    with torch.no_grad():
        probs_TE = layer.router.logits(h_TD.float()).softmax(-1)
    kept = set()
    for probs in probs_TE.tolist():
        ranked = sorted(range(E), key=lambda e: -probs[e])[: layer.config.top_k]
        kept |= {e for e in ranked if probs[e] >= confidence / E}
    return sorted(kept)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(1, 6),
    top_k=st.integers(1, 4),
    confidence=st.sampled_from([0.0, 0.5, 1.0, 1.2, 2.0, 4.0]),
    scale=st.sampled_from([0.1, 1.0, 5.0]),  # unsure to sure routers
)
def test_predicted_experts_match_the_reference(seed, tokens, top_k, confidence, scale):
    torch.manual_seed(seed)
    layer = MoELayer(D, 8, E, top_k)
    h_TD = torch.randn(tokens, D) * scale
    assert predicted_experts(layer, h_TD, confidence) == reference_prediction(layer, h_TD, confidence)
    assert predicted_experts(layer, h_TD.view(1, tokens, D), confidence) == predicted_experts(
        layer, h_TD, confidence
    )  # any leading shape


def test_the_prediction_leaves_out_unused_top_p_slots_and_bad_confidences():
    torch.manual_seed(0)
    layer = MoELayer(D, 8, E, 4)
    h_TD = torch.randn(1, D)
    assert len(predicted_experts(layer, h_TD, 0.0)) == 4
    layer.set_routing(top_p=1e-6, min_k=1)  # one expert per token
    assert len(predicted_experts(layer, h_TD, 0.0)) == 1
    assert predicted_experts(layer, h_TD, 1e9) == []  # nothing that sure
    for confidence in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="confidence must be a number >= 0"):
            predicted_experts(layer, h_TD, confidence)


class Store:
    def __init__(self, layer: MoELayer) -> None:
        self.w_in, self.w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()

    def nbytes(self, key):
        return (self.w_in[0].numel() + self.w_out[0].numel()) * 4

    def read(self, key):
        return self.w_in[key[1]].clone(), self.w_out[key[1]].clone()


def test_prefetch_experts_reads_the_prediction_ahead_and_the_layer_is_unchanged():
    torch.manual_seed(0)
    layer = MoELayer(D, 8, E, 2).eval()
    x_TD = torch.randn(3, D)
    with torch.no_grad():
        expected = layer(x_TD)
    with pytest.raises(ValueError, match="prefetch_experts needs an offloaded layer"):
        prefetch_experts(layer, x_TD)
    store = Store(layer)
    cache = ExpertCache(store, 1, None, prefetch=True)
    strategy = offload_experts(layer, cache, 0)
    strategy.confidence = 0.0
    predicted = prefetch_experts(layer, x_TD)
    assert predicted == predicted_experts(layer, x_TD, 0.0)
    cache.wait_for_reads()
    assert cache.resident() == {(0, e) for e in predicted}
    with torch.no_grad():
        torch.testing.assert_close(layer(x_TD), expected)
    stats = cache.stats
    assert stats.prefetch_precision == stats.prefetch_recall == 1.0  # predicted from the layer's own input
    assert stats.hits == stats.lookups == stats.prefetch_used == len(predicted)
    cache.close()


def test_an_expert_whose_predictions_go_unused_is_left_out_until_it_is_right_again():
    torch.manual_seed(0)
    layer = MoELayer(D, 8, E, 1).eval()  # top-1
    candidates = torch.randn(64, D)
    top_1 = layer.router(candidates, 1).expert_ids_TK[:, 0]
    h, x = candidates[0:1], candidates[int((top_1 != top_1[0]).nonzero()[0, 0])].view(1, D)
    a = int(top_1[0])  # h picks a, x picks another expert
    cache = ExpertCache(Store(layer), 1, None, prefetch=False)
    strategy = offload_experts(layer, cache, 0)
    strategy.confidence = 0.0  # min_precision: the default 0.5
    steps = [  # (real input, expected prediction, a's record after the call)
        (x, [a], 1 / 3),  # trusted at first (1 right, 1 wrong to start), then wrong
        (x, [], 1 / 4),  # left out, still scored
        (h, [], 2 / 5),  # right, not yet trusted
        (h, [], 3 / 6),
        (h, [a], 4 / 7),  # trusted again
    ]
    for real, expected, record in steps:
        assert prefetch_experts(layer, h) == expected
        with torch.no_grad():
            layer(real)
        assert strategy.prediction_precision(a) == pytest.approx(record)
    stats = cache.stats
    assert (stats.predicted, stats.predicted_used, stats.used_after_prediction) == (2, 1, 5)


@pytest.mark.parametrize(
    ("family", "confidence"),
    [("qwen3_moe", 0.0), ("qwen3_moe", 1.2), ("deepseek_v3", 0.0)],  # deepseek_v3: layer 0 dense
)
def test_load_offloaded_predicts_each_block_from_its_decoder_layers_input(tmp_path, family, confidence):
    overrides = {"num_hidden_layers": 3} if family == "qwen3_moe" else {}
    family_model = tiny_model(family, seed=2, **overrides)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms that differ (initialised, every one is all ones)
        for module in family_model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.1, 3.0, generator=generator)
    family_model.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    flexmoe.hf.convert(reference)
    decoders = reference.model.layers
    inputs: list[torch.Tensor] = []
    hooks = [
        decoder.register_forward_pre_hook(
            lambda _, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for decoder in decoders
    ]
    ids = torch.randint(1, VOCAB, (1, 2), generator=torch.Generator().manual_seed(0))
    moe_decoders = [i for i, d in enumerate(decoders) if isinstance(d.mlp, flexmoe.hf.FlexMoEBlock)]
    with torch.no_grad():
        reference(ids)
        expected = [  # (the block's cache layer, its prediction); not in the first decoder layer
            (
                moe_decoders.index(i),
                predicted_experts(decoders[i].mlp.moe, decoders[i].post_attention_layernorm(x), confidence),
            )
            for i, x in enumerate(inputs)
            if i in moe_decoders and i > 0
        ]
    for hook in hooks:
        hook.remove()
    assert len(expected) == 2

    model = load_offloaded(
        tmp_path, expert_budget=None, prefetch_confidence=confidence, prefetch_min_precision=0
    )
    cache = offloaded_cache(model)
    calls: list[tuple[int, list[int]]] = []
    prefetch = cache.prefetch

    def recording(layer: int, experts: list[int]) -> None:
        calls.append((layer, list(experts)))
        prefetch(layer, experts)

    cache.prefetch = recording
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert calls == expected
    assert any(len(experts) < 8 for _, experts in expected)  # a choice, not every expert
    stats = offload_stats(model)
    assert stats.predicted == sum(len(experts) for _, experts in expected)


def test_the_predictions_add_nothing_to_the_router_logits_a_model_returns(tmp_path):
    tiny_model("qwen3_moe", seed=3, num_hidden_layers=3).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    flexmoe.hf.convert(reference)
    model = load_offloaded(tmp_path, expert_budget=None, prefetch_confidence=0.0, prefetch_min_precision=0)
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids, labels=ids, output_router_logits=True)
        got = model(ids, labels=ids, output_router_logits=True)
    assert offload_stats(model).predicted > 0  # the layers did predict
    assert len(got.router_logits) == len(expected.router_logits) == 3
    for mine, theirs in zip(got.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)


def test_load_offloaded_refuses_bad_prefetch_settings(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="prefetch_confidence must be a number >= 0, got -1"):
        load_offloaded(tmp_path, prefetch_confidence=-1)
    with pytest.raises(ValueError, match=r"prefetch_min_precision must be a number in \[0, 1\], got 1.5"):
        load_offloaded(tmp_path, prefetch_min_precision=1.5)
