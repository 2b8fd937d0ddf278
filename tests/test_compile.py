"""``torch.compile``: the single-device layer is one graph (``fullgraph=True``) forward and backward.

Compiled calls run the static-shape dispatch (``flexmoe.dispatch.static``) and the expert
custom operators (``flexmoe.experts.ops``); they are checked against the plain reference
(hypothesis), against the eager layer, and for graph breaks with ``torch._dynamo.explain``.
Most tests compile with ``backend="aot_eager"`` (Dynamo + AOT autograd, the parts that
must capture the graph); one runs Inductor's generated code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from torch import nn

from flexmoe import MoELayer, RouterConfig
from flexmoe.experts import grouped_mm_available
from flexmoe.hf import convert
from tests.hf_tiny import VOCAB, tiny_model
from tests.test_layer_reference import Case, cases, check_against_reference

GROUPED_MM = grouped_mm_available(torch.device("cpu"), torch.float32)

LAYERS = {
    "dropless": {},
    "capacity": {"capacity_factor": 0.5},
    "capped max load": {"capacity_factor": -1.0},
    "batch priority": {"capacity_factor": 0.5, "batch_prioritized": True},
    "sigmoid groups": {
        "router": RouterConfig(kind="sigmoid", num_groups=4, topk_groups=2, selection_bias=True)
    },
    "shared, bias, relu": {
        "num_shared_experts": 1,
        "shared_expert_gate": True,
        "bias": True,
        "activation": "relu",
    },
    "losses, aux-free": {"load_balance_weight": 0.01, "z_loss_weight": 1e-3, "aux_free_rate": 1e-3},
}


def make_layer(seed: int = 0, **kwargs: object) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(16, 24, num_experts=8, top_k=2, **kwargs)


def forward_backward(module: nn.Module, layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(layer.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    return y, grads


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_is_one_graph(name: str) -> None:
    layer = make_layer(**LAYERS[name]).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(3, 10, 16))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_equals_eager(name: str) -> None:
    """Forward, backward, aux loss, stats and the aux-free load counts, with fullgraph=True."""
    eager = make_layer(**LAYERS[name]).train()
    layer = copy.deepcopy(eager)
    x = torch.randn(3, 10, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call reuses the compiled graph
        y_eager, grads_eager = forward_backward(eager, eager, x)
        y, grads = forward_backward(compiled, layer, x)
        torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
        assert grads.keys() == grads_eager.keys()
        for key, grad in grads_eager.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(layer.aux_loss, eager.aux_loss)
        for field in ("routed_per_expert", "tokens_per_expert"):
            assert getattr(layer.stats, field).tolist() == getattr(eager.stats, field).tolist()
        for field in ("capacity", "dropped", "load_max_over_mean", "backend", "num_tokens", "plan"):
            assert getattr(layer.stats, field) == getattr(eager.stats, field), field
        assert layer._pending_counts_E.tolist() == eager._pending_counts_E.tolist()
        eager.zero_grad()
        layer.zero_grad()


@settings(max_examples=12, deadline=None)
@given(case=cases())
def test_compiled_fp32_matches_reference(case: Case) -> None:
    check_against_reference(case, torch.float32, rel=2e-5, floor=1e-5, compiled=True)


@settings(max_examples=5, deadline=None)
@given(case=cases())
def test_compiled_bf16_and_autocast_match_reference(case: Case) -> None:
    check_against_reference(case, torch.bfloat16, rel=4e-2, floor=1e-2, compiled=True)
    check_against_reference(case, torch.float32, rel=4e-2, floor=1e-2, autocast=True, compiled=True)


@pytest.mark.skipif(not GROUPED_MM, reason="this PyTorch has no torch._grouped_mm on CPU")
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_compiled_grouped_mm_backend_equals_eager(capacity_factor: float) -> None:
    """bf16 runs the traced ``torch._grouped_mm`` path (fp32 the fused operator: the compiler's
    shape function for ``_grouped_mm`` takes bf16 only)."""
    eager = make_layer(backend="grouped_mm", bias=True, capacity_factor=capacity_factor).to(torch.bfloat16)
    layer = copy.deepcopy(eager)
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_eager, grads_eager = forward_backward(eager, eager, x)
    y, grads = forward_backward(compiled, layer, x)
    assert layer.stats.backend == eager.stats.backend == "grouped_mm"
    torch.testing.assert_close(y, y_eager, rtol=2e-2, atol=2e-2)
    for key, grad in grads_eager.items():
        torch.testing.assert_close(grads[key], grad, rtol=2e-2, atol=2e-2, msg=key)
    fp32 = make_layer(backend="grouped_mm")
    torch.compile(fp32, fullgraph=True, backend="aot_eager")(torch.randn(6, 16))
    assert fp32.stats.backend == "fused"


def test_inductor_forward_backward_equals_eager() -> None:
    """Inductor's generated code around the expert operators, with drops and biases."""
    eager = make_layer(capacity_factor=0.75, bias=True)
    layer = copy.deepcopy(eager)
    x = torch.randn(2, 12, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y_eager, grads_eager = forward_backward(eager, eager, x)
    y, grads = forward_backward(compiled, layer, x)
    assert layer.stats.dropped == eager.stats.dropped > 0
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for key, grad in grads_eager.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5, msg=key)


def test_compiled_inference_and_decode() -> None:
    """Without autograd the operator takes the inference path; one-token calls too."""
    layer = make_layer(bias=True).eval()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for shape in [(5, 16), (1, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


def test_custom_experts_compile_with_a_break() -> None:
    """A custom expert module needs the host counts: it compiles, with graph breaks, and is exact."""
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)) for _ in range(4))
    layer = MoELayer(16, 8, num_experts=4, top_k=2, experts=experts)
    x = torch.randn(6, 16)
    expected = layer(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), expected)


def test_converted_transformers_model_is_one_graph() -> None:
    """A converted model compiles as stock ``transformers`` does: one graph, no break, same logits."""
    model = tiny_model("qwen3_moe").eval()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    convert(model)
    with torch.no_grad():
        expected = model(ids).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        torch._dynamo.reset()
        logits = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
