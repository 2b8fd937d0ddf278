"""ExpertWeave on a model from ``load_offloaded``: the outputs and ``generate`` of the in-memory model.

The reference is the same weave (the same LoRA and ESFT adapters) on the checkpoint
loaded in memory and converted; the offloaded model reads its base experts through its
budgeted cache, and the statistics show that it did.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

import flexmoe.hf
from flexmoe.adapters import ESFTAdapter, ESFTExperts, ExpertWeave, add_lora, esft_prepare, lora_adapters, use
from flexmoe.experts.cache import ExpertCache, ExpertKey, ExpertWeights
from flexmoe.experts.int8 import quantize_int8
from flexmoe.experts.store import Int8MemoryStore
from flexmoe.hf import load_offloaded, offload_stats
from flexmoe.layer.local import LocalExperts
from flexmoe.layer.offloaded import offload_experts
from tests.hf_tiny import VOCAB, save_tiny_models
from tests.test_weave import Case, build, cases, weave

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]


def expert_bytes(model, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one routed expert in ``dtype``, top-k) of a converted model."""
    layer = next(m for m in model.modules() if isinstance(m, flexmoe.MoELayer))
    _, H, D = layer.experts.w_in.shape
    F = layer.experts.w_out.shape[2]
    return (H * D + D * F) * dtype.itemsize, layer.config.top_k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, FAMILIES)


def in_memory(directory, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    flexmoe.hf.convert(model)
    return model


def make_adapters(reference, seed: int = 1) -> list[object]:
    """Two LoRA adapters (every expert, both projections; some experts, w_out only) and an ESFT adapter."""
    generator = torch.Generator().manual_seed(seed)
    adapters: list[object] = []
    for rank, experts, targets in ((4, None, ("w_in", "w_out")), (2, [0, 2, 3], ("w_out",))):
        model = copy.deepcopy(reference)
        add_lora(model, rank=rank, alpha=2.0 * rank, experts=experts, targets=targets)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora." in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        adapters.append(lora_adapters(model))
    layers = {}
    for path, module in reference.named_modules():
        if isinstance(module, flexmoe.MoELayer):
            w_in, w_out = module.experts.w_in, module.experts.w_out
            ids = (1, 3)
            layers[f"{path}.experts"] = ESFTExperts(
                ids,
                0.3 * torch.randn(len(ids), *w_in.shape[1:], generator=generator).to(w_in.dtype),
                0.3 * torch.randn(len(ids), *w_out.shape[1:], generator=generator).to(w_out.dtype),
            )
    adapters.append(ESFTAdapter(layers))
    return adapters


def run(
    model, ids: torch.Tensor, adapter_ids: list[int], tokens: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy generation) of ``ids`` with one adapter per sequence."""
    with torch.no_grad(), use(model, adapter_ids):
        logits = model(ids).logits
        generated = model.generate(
            ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    return logits, generated


MIX = [0, -1, 2, 1, 2]  # LoRA, base, ESFT, LoRA (some experts), ESFT


@pytest.mark.parametrize("budget_experts", [None, 4], ids=["unlimited", "4-experts"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_and_generate_equal_the_in_memory_weave(saved, family, budget_experts):
    reference = in_memory(saved[family])
    each, top_k = expert_bytes(reference, torch.float32)
    adapters = make_adapters(reference)
    weave(reference, adapters)
    ids = torch.randint(1, VOCAB, (len(MIX), 7), generator=torch.Generator().manual_seed(0))
    expected_logits, expected = run(reference, ids, MIX)

    budget = None if budget_experts is None else max(budget_experts, top_k) * each
    # every predicted expert read ahead, however flat the tiny random routers are
    model = load_offloaded(saved[family], expert_budget=budget, dtype=torch.float32, prefetch_confidence=0)
    woven = weave(model, adapters)
    logits, generated = run(model, ids, MIX)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generated, expected)
    # the base experts came from the cache, never materialised; the adapters sit beside it
    stats = offload_stats(model)
    assert stats.lookups > 0 and stats.hits + stats.misses == stats.lookups
    assert stats.reads > 0 and stats.bytes_read == stats.reads * each
    assert stats.predicted > 0 and stats.predicted_used > 0  # each block's experts were predicted
    assert stats.prefetch_reads > 0  # ... and read ahead
    if budget is not None:
        assert stats.peak_resident_bytes <= budget
        assert stats.evictions > 0
    assert not any(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    assert woven.adapter_bytes() > 0


def test_the_adapters_own_experts_are_not_read(saved):
    # An ESFT adapter replacing every expert: its sequences never need a base expert.
    reference = in_memory(saved["qwen3_moe"])
    each, top_k = expert_bytes(reference, torch.float32)
    generator = torch.Generator().manual_seed(5)
    layers = {
        f"{path}.experts": ESFTExperts(
            tuple(range(m.config.num_experts)),
            torch.randn(m.experts.w_in.shape, generator=generator),
            torch.randn(m.experts.w_out.shape, generator=generator),
        )
        for path, m in reference.named_modules()
        if isinstance(m, flexmoe.MoELayer)
    }
    weave(reference, [ESFTAdapter(layers)])
    ids = torch.randint(1, VOCAB, (2, 5), generator=generator)
    with torch.no_grad(), use(reference, [0, 0]):
        expected = reference(ids).logits
    model = load_offloaded(saved["qwen3_moe"], expert_budget=top_k * each, prefetch=False)
    weave(model, [ESFTAdapter(layers)])
    with torch.no_grad(), use(model, [0, 0]):
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    stats = offload_stats(model)
    assert stats.reads == stats.lookups == 0
    with torch.no_grad(), use(model, [0, -1]):  # the base sequence's experts are read
        model(ids)
    assert offload_stats(model).reads > 0


@pytest.fixture(scope="module")
def served_pair(saved):
    """(in-memory weave model, offloaded weave model with a 4-expert budget) on Qwen3-MoE."""
    reference = in_memory(saved["qwen3_moe"])
    each, _ = expert_bytes(reference, torch.float32)
    adapters = make_adapters(reference, seed=7)
    weave(reference, adapters)
    model = load_offloaded(saved["qwen3_moe"], expert_budget=4 * each, dtype=torch.float32)
    weave(model, adapters)
    return reference, model


@given(
    adapter_ids=st.lists(st.integers(-1, 2), min_size=1, max_size=4),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_random_adapter_mixes(served_pair, adapter_ids, length, seed):
    reference, model = served_pair
    ids = torch.randint(1, VOCAB, (len(adapter_ids), length), generator=torch.Generator().manual_seed(seed))
    reads = offload_stats(model).reads
    with torch.no_grad():
        with use(reference, adapter_ids):
            expected = reference(ids).logits
        with use(model, adapter_ids):
            logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert offload_stats(model).reads > reads  # 4 experts of 2 x 8 held: every call reads some


def test_int8_experts(saved, tmp_path):
    # The reference: the in-memory model with each expert rounded to its int8 values.
    copy_dir = tmp_path / "int8"
    flexmoe.hf.quantize_experts(saved["qwen3_moe"], copy_dir)
    reference = in_memory(saved["qwen3_moe"])
    each, top_k = expert_bytes(reference, torch.float32)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, flexmoe.MoELayer):
                for w in (m.experts.w_in, m.experts.w_out):
                    q, scale = quantize_int8(w)
                    w.copy_(q.float() * scale[..., None])
    adapters = make_adapters(reference)
    weave(reference, adapters)
    ids = torch.randint(1, VOCAB, (len(MIX), 7), generator=torch.Generator().manual_seed(2))
    expected_logits, expected = run(reference, ids, MIX)
    model = load_offloaded(copy_dir, expert_budget=top_k * each, dtype=torch.float32)
    weave(model, adapters)
    logits, generated = run(model, ids, MIX)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, expected)
    stats = offload_stats(model)
    assert stats.reads > 0 and stats.bytes_read / stats.reads < 0.3 * each  # int8 reads: a quarter of fp32


def test_bf16(saved):
    reference = in_memory(saved["mixtral"], torch.bfloat16)
    each, top_k = expert_bytes(reference, torch.bfloat16)
    adapters = make_adapters(reference)
    weave(reference, adapters)
    ids = torch.randint(1, VOCAB, (len(MIX), 7), generator=torch.Generator().manual_seed(4))
    expected_logits, expected = run(reference, ids, MIX)
    model = load_offloaded(saved["mixtral"], expert_budget=(top_k + 1) * each, dtype=torch.bfloat16)
    weave(model, adapters)
    logits, generated = run(model, ids, MIX)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected_logits, rtol=2e-2, atol=2e-2)
    assert torch.equal(generated, expected)


def test_budgets_too_small(saved):
    reference = in_memory(saved["qwen3_moe"])
    each, top_k = expert_bytes(reference, torch.float32)
    with pytest.raises(ValueError, match=rf"too small.*top-{top_k} experts"):
        load_offloaded(saved["qwen3_moe"], expert_budget=top_k * each - 1, dtype=torch.float32)
    # a top-k override beyond the budget, in a call with adapters
    model = load_offloaded(saved["qwen3_moe"], expert_budget=top_k * each, dtype=torch.float32)
    weave(model, make_adapters(reference))
    layer = next(m for m in model.modules() if isinstance(m, flexmoe.MoELayer))
    x = torch.randn(4, model.config.hidden_size)
    with torch.no_grad(), use(model, [0, 2]):
        assert layer(x).shape == x.shape
        with pytest.raises(ValueError, match=rf"top-{top_k + 1} experts in memory at once"):
            layer(x, top_k=top_k + 1)


class SpreadExperts(LocalExperts):
    """Stands in for an expert-parallel strategy: experts spread over two ranks."""

    world_size = 2


class OtherExperts(LocalExperts):
    """Stands in for a strategy the weave does not know."""


@pytest.mark.parametrize(
    ("strategy", "message"),
    [(SpreadExperts, "spread over ranks is not supported"), (OtherExperts, "this layer runs OtherExperts")],
)
def test_other_strategies_are_refused(strategy, message):
    layer = flexmoe.MoELayer(8, 8, 4, 2)
    layer.strategy = strategy(layer.experts, 4, False)
    with pytest.raises(NotImplementedError, match=message):
        ExpertWeave(layer)


class MemoryStore:
    """One layer's float experts handed out by the cache as they are (an ``ExpertStore``)."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        self.w_in, self.w_out = w_in.detach().clone(), w_out.detach().clone()

    def nbytes(self, key: ExpertKey) -> int:
        return (self.w_in[0].numel() + self.w_out[0].numel()) * self.w_in.element_size()

    def read(self, key: ExpertKey) -> ExpertWeights:
        return self.w_in[key[1]], self.w_out[key[1]]


@given(
    case=cases().filter(lambda case: not case.bias),  # offloaded experts have no biases
    int8=st.booleans(),
    spare=st.integers(0, 3),
    prefetch=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_offloaded_layer_equals_the_in_memory_layer(
    case: Case, int8: bool, spare: int, prefetch: bool
) -> None:
    """A layer's weave with its experts in a budgeted cache: outputs and input and router gradients."""
    base, adapters, _ = build(case)
    offloaded = copy.deepcopy(base)
    w_in, w_out = base.experts.w_in, base.experts.w_out
    store: MemoryStore | Int8MemoryStore = MemoryStore(w_in, w_out)
    if int8:  # the reference computes from the same int8 values, dequantized
        store = Int8MemoryStore([(w_in.detach(), w_out.detach())])
        with torch.no_grad():
            for w in (w_in, w_out):
                q, scale = quantize_int8(w)
                w.copy_(q.float() * scale[..., None])
    budget = (case.top_k + spare) * store.nbytes((0, 0))
    offload_experts(offloaded, ExpertCache(store, 1, budget, prefetch=prefetch), 0, store.nbytes((0, 0)))
    weave(base, adapters)
    weave(offloaded, adapters)
    grad_y = torch.randn(len(case.ids), case.S, case.D)
    grads = not int8  # torch's int8 kernel has no backward (offloaded experts are for inference)
    for _step in range(2):  # the second call finds some experts resident: another serving order
        x = torch.randn(len(case.ids), case.S, case.D, requires_grad=grads)
        x_ref = x.detach().clone().requires_grad_(grads)
        with use(offloaded, case.ids):
            y = offloaded(x)
        with use(base, case.ids):
            y_ref = base(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        if grads:
            (y * grad_y).sum().backward()
            (y_ref * grad_y).sum().backward()
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    if grads:
        torch.testing.assert_close(
            offloaded.router.weight.grad, base.router.weight.grad, rtol=1e-4, atol=1e-5
        )
    assert offloaded.strategy.cache.stats.peak_resident_bytes <= budget


def test_fine_tuning_offloaded_experts_is_refused(saved):
    model = load_offloaded(saved["qwen3_moe"], expert_budget=None)
    with pytest.raises(
        ValueError, match=r"add_lora: the experts of model\.layers\.0\.mlp\.moe\.experts are offloaded"
    ):
        add_lora(model, rank=2)
    with pytest.raises(ValueError, match=r"esft_prepare: the experts of .* are offloaded"):
        esft_prepare(model, {"model.layers.1.mlp.moe.experts": [2]})
    assert all(layer.experts.lora is None for layer in model.modules() if isinstance(layer, flexmoe.MoELayer))
