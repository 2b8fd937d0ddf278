"""``torch.compile`` of layers with unmerged LoRA adapters equals the eager layer.

The compiled layer runs the experts as the ``flexmoe::routed_experts`` operator, which
adds the adapters' terms on its segments and returns their gradients: outputs and
gradients (input, factors, and the base where it trains) equal eager over many random
layers (hypothesis), in one graph (``fullgraph=True``), with drops, biases, adapted
subsets and single targets; without autograd too; under Inductor as well.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer
from flexmoe.adapters import add_lora, merge_lora

from .test_compile import forward_backward


def lora_layer(
    seed: int,
    experts: list[int] | None = None,
    targets: tuple[str, ...] = ("w_in", "w_out"),
    freeze_base: bool = True,
    **kwargs: object,
) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(16, 24, num_experts=8, top_k=2, **kwargs)
    add_lora(layer, rank=4, alpha=8, experts=experts, targets=targets, freeze_base=freeze_base)
    with torch.no_grad():
        for p in layer.experts.lora.parameters():
            p.normal_(0.0, 0.3)  # B starts at zero: stand in for a trained adapter
    return layer


@st.composite
def layers(draw) -> tuple[MoELayer, torch.Tensor]:
    subset = draw(st.one_of(st.none(), st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True)))
    layer = lora_layer(
        draw(st.integers(0, 2**16)),
        experts=subset,
        targets=draw(st.sampled_from([("w_in", "w_out"), ("w_in",), ("w_out",)])),
        freeze_base=draw(st.booleans()),
        activation=draw(st.sampled_from(["swiglu", "gelu"])),
        bias=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([0.0, 0.75, 1.25])),
    )
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 9)), 16)
    return layer, x


@settings(max_examples=12, deadline=None)
@given(case=layers())
def test_compiled_lora_equals_eager(case: tuple[MoELayer, torch.Tensor]) -> None:
    eager, x = case
    layer = copy.deepcopy(eager)
    torch._dynamo.reset()  # a new layer per example: no recompile limit across them
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_eager, grads_eager = forward_backward(eager, eager, x)
    y, grads = forward_backward(compiled, layer, x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_eager.keys()
    assert any(".lora." in key for key in grads)
    for key, grad in grads_eager.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compiled_lora_is_one_graph_and_inductor_equals_eager() -> None:
    eager = lora_layer(0, experts=[1, 4, 6], capacity_factor=0.75, bias=True)
    explained = torch._dynamo.explain(copy.deepcopy(eager))(torch.randn(10, 16))
    assert explained.graph_count == 1 and not explained.break_reasons
    layer = copy.deepcopy(eager)
    x = torch.randn(2, 12, 16)
    torch._dynamo.reset()
    y, grads = forward_backward(torch.compile(layer, fullgraph=True), layer, x)
    y_eager, grads_eager = forward_backward(eager, eager, x)
    assert layer.stats.dropped == eager.stats.dropped > 0
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for key, grad in grads_eager.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)


def test_compiled_lora_dropout_refused_merged_runs_base() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 24, num_experts=8, top_k=2)
    add_lora(layer, rank=4, dropout=0.1)
    x = torch.randn(6, 16)
    # fullgraph: dynamo reports the refusal; otherwise the layer breaks the graph and runs eagerly.
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"LoRA dropout under torch\.compile"):
        torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    layer.eval()  # dropout applies in training only
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), layer(x))
    merge_lora(layer)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), layer(x))
