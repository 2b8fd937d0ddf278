"""Experts: one expert is a dense FFN, grouped backends equal a per-expert loop, custom experts.

Legend: N rows (expert-major), D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flexmoe import MoELayer
from flexmoe.experts import GroupedExperts
from tests.reference import reference_moe, reference_params

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]
BACKENDS = ["loop", "fused", "grouped_mm"]


def dense_ffn(x: torch.Tensor, w_in, w_out, b_in, b_out, activation: str) -> torch.Tensor:
    """A dense FFN with torch.nn.functional: ``w_out act(w_in x + b_in) + b_out``."""
    h = F.linear(x, w_in, b_in)
    if activation in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    else:
        a = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](h)
    return F.linear(a, w_out, b_out)


# ----------------------------------------------------------------- one expert == dense
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("router", ["softmax", "cosine"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, -1.0])
def test_one_expert_top1_equals_dense_ffn(
    activation: str, bias: bool, router: str, capacity_factor: float
) -> None:
    torch.manual_seed(0)
    layer = MoELayer(
        6, 7, 1, top_k=1, activation=activation, bias=bias, router=router, capacity_factor=capacity_factor
    )
    x = torch.randn(2, 5, 6, requires_grad=True)
    grad_y = torch.randn(2, 5, 6)
    y = layer(x)
    (y * grad_y).sum().backward()
    assert layer.stats.dropped == 0

    ex = layer.experts
    params = [
        p.detach().clone().requires_grad_(True) if p is not None else None for p in (ex.w_in[0], ex.w_out[0])
    ]
    biases = [None, None]
    if bias:
        biases = [
            ex.b_in[0].detach().clone().requires_grad_(True),
            ex.b_out[0].detach().clone().requires_grad_(True),
        ]
    x2 = x.detach().clone().requires_grad_(True)
    y_dense = dense_ffn(x2, params[0], params[1], biases[0], biases[1], activation)
    (y_dense * grad_y).sum().backward()

    torch.testing.assert_close(y, y_dense)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ex.w_in.grad[0], params[0].grad)
    torch.testing.assert_close(ex.w_out.grad[0], params[1].grad)
    if bias:
        torch.testing.assert_close(ex.b_in.grad[0], biases[0].grad)
        torch.testing.assert_close(ex.b_out.grad[0], biases[1].grad)
    # The routing weight is exactly 1: the router gets no gradient from the output.
    for p in layer.router.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


# ----------------------------------------------------------------- grouped == loop
@st.composite
def grouped_cases(draw):
    E = draw(st.integers(1, 6))
    counts = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 5]), min_size=E, max_size=E))
    return (
        counts,
        draw(st.integers(1, 7)),
        draw(st.integers(1, 6)),
        draw(st.sampled_from(ACTIVATIONS)),
        draw(st.booleans()),
        draw(st.integers(0, 2**16)),
    )


def check_grouped_equals_loop(
    backend: str, counts, D: int, F_: int, activation: str, bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    E, N = len(counts), sum(counts)
    experts = GroupedExperts(E, D, F_, activation, bias, backend)
    x = torch.randn(N, D, requires_grad=True)
    grad_y = torch.randn(N, D)
    y = experts(x, counts, backend=backend)
    assert y.shape == (N, D)
    if N == 0:
        return  # nothing to compare (the layer never calls its experts without rows)
    (y * grad_y).sum().backward()

    # A per-expert loop of dense FFNs, each on its own rows, with its own parameter copies.
    copies = {
        name: p.detach().clone().requires_grad_(True)
        for name, p in experts.named_parameters()
        if p is not None
    }
    x2 = x.detach().clone().requires_grad_(True)
    rows, start = [], 0
    for e, n in enumerate(counts):
        b_in = copies["b_in"][e] if bias else None
        b_out = copies["b_out"][e] if bias else None
        rows.append(
            dense_ffn(x2[start : start + n], copies["w_in"][e], copies["w_out"][e], b_in, b_out, activation)
        )
        start += n
    y_loop = torch.cat(rows)
    (y_loop * grad_y).sum().backward()

    torch.testing.assert_close(y, y_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name, p in experts.named_parameters():
        expected = copies[name].grad
        actual = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40)
@given(case=grouped_cases())
def test_grouped_backend_equals_per_expert_loop(backend: str, case) -> None:
    check_grouped_equals_loop(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts", [[4, 0, 0], [0, 0, 3], [2, 0, 5]])
def test_grouped_backend_backward_from_sum(backend: str, counts: list[int]) -> None:
    # y.sum().backward() hands the backend an expanded (stride-0) gradient.
    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 8, "swiglu", True, backend)
    x = torch.randn(sum(counts), 8, requires_grad=True)
    experts(x, counts, backend=backend).sum().backward()
    reference = GroupedExperts(3, 8, 8, "swiglu", True, "loop")
    reference.load_state_dict(experts.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2, counts, backend="loop").sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(experts.named_parameters(), reference.parameters(), strict=True):
        actual = torch.zeros_like(p) if p.grad is None else p.grad
        expected = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


# ----------------------------------------------------------------- custom experts
def swiglu_module(D: int, F_: int) -> nn.Module:
    class SwiGLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(D, F_)
            self.up = nn.Linear(D, F_)
            self.down = nn.Linear(F_, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(F.silu(self.gate(x)) * self.up(x))

    return SwiGLU()


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, -1.0])
@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_module_list_experts_match_reference(capacity_factor: float, batch_prioritized: bool) -> None:
    torch.manual_seed(1)
    D, E = 5, 4
    experts = nn.ModuleList(swiglu_module(D, 3) for _ in range(E))
    layer = MoELayer(
        D,
        3,
        E,
        top_k=2,
        experts=experts,
        capacity_factor=capacity_factor,
        batch_prioritized=batch_prioritized,
        num_shared_experts=1,
    )
    x = torch.randn(9, D, requires_grad=True)
    grad_y = torch.randn(9, D)
    y = layer(x)
    (y * grad_y).sum().backward()

    params = reference_params(layer, torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    copies = [swiglu_module(D, 3) for _ in range(E)]
    for copy, original in zip(copies, experts, strict=True):
        copy.load_state_dict(original.state_dict())
    out = reference_moe(layer.config, params, x2, expert_fn=lambda e, x_D: copies[e](x_D))
    (out.y_TD * grad_y).sum().backward()

    assert layer.stats.tokens_per_expert.tolist() == out.tokens_per_expert
    torch.testing.assert_close(y, out.y_TD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for e in range(E):
        for (name, p), q in zip(experts[e].named_parameters(), copies[e].parameters(), strict=True):
            expected = torch.zeros_like(q) if q.grad is None else q.grad
            actual = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=f"experts[{e}].{name}")
    torch.testing.assert_close(layer.router.weight.grad, params["router.weight"].grad, atol=1e-5, rtol=1e-5)


class ScaleExperts(nn.Module):
    """Custom grouped experts: expert ``e`` multiplies its rows by ``scale[e]``."""

    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, num_experts))

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return x_ND * torch.repeat_interleave(self.scale, torch.tensor(counts))[:, None]


def test_custom_experts_module_matches_reference() -> None:
    torch.manual_seed(2)
    D, E = 4, 5
    custom = ScaleExperts(E, D)
    layer = MoELayer(D, 3, E, top_k=3, experts=custom, router="sigmoid", capacity_factor=0.75)
    assert layer.experts is custom
    x = torch.randn(2, 7, D, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()

    params = reference_params(layer, torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    out = reference_moe(layer.config, params, x2, expert_fn=lambda e, x_D: params["experts.scale"][e] * x_D)
    out.y_TD.square().sum().backward()

    assert layer.stats.dropped == 2 * 7 * 3 - len(out.kept) > 0
    torch.testing.assert_close(y, out.y_TD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(custom.scale.grad, params["experts.scale"].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, params["router.weight"].grad, atol=1e-5, rtol=1e-5)
