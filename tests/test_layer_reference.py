"""MoELayer against the plain reference MoE: outputs and gradients, fp32, bf16, autocast, every backend.

Decisions are discrete (top-k choice, batch-priority order), and fp32 and fp64 may order
scores within 1e-5 of each other either way. A top-k near tie is checked, not skipped:
the layer's choice must be one of the tied choices, and the rest of the layer is checked
against the reference on it; the same for ties between expert groups and in the drop
order under a capacity (see ``reference_for_layer``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import CapacityConfig, ExpertConfig, MoEConfig, MoELayer, RouterConfig
from flexmoe.dispatch import make_layout
from flexmoe.layer.moe_layer import routed_experts_only
from tests.reference import Params, ReferenceOutput, kept_assignments, reference_moe, reference_params

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]
BACKENDS = ["loop", "fused", "grouped_mm"]
# Dyadic factors: exactly representable, so ceil(cf*T*K/E) has one right answer.
CAPACITY_FACTORS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, -0.25, -0.5, -1.0, -1.25, -2.0]
MARGIN = 1e-5


@dataclass
class Case:
    config: MoEConfig
    shape: tuple[int, ...]
    top_k: int | None
    capacity_factor: float | None
    seed: int


@st.composite
def cases(draw, backends: tuple[str, ...] = ("loop", "fused")) -> Case:
    E = draw(st.integers(1, 8))
    divisors = [g for g in range(1, E + 1) if E % g == 0]
    num_groups = draw(st.sampled_from(divisors))
    topk_groups = draw(st.integers(1, num_groups))
    reachable = topk_groups * (E // num_groups)
    kind = draw(st.sampled_from(["softmax", "sigmoid", "cosine"]))
    top_k = draw(st.integers(1, reachable))
    router = RouterConfig(
        top_p=draw(st.sampled_from([None, None, 0.3, 0.6, 0.9])),
        min_k=draw(st.integers(1, top_k)),
        kind=kind,
        normalize_weights=draw(st.booleans()),
        normalize_single=draw(st.booleans()),
        num_groups=num_groups,
        topk_groups=topk_groups,
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        selection_bias=draw(st.booleans()),
        cosine_dim=draw(st.integers(2, 5)),
    )
    shared = draw(st.sampled_from([0, 0, 1, 2]))
    zero = (("skip",), ("copy", "constant"), ("constant", "skip", "copy"))
    experts = ExpertConfig(
        zero_experts=draw(st.sampled_from([(), (), *zero])) if num_groups == 1 else (),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        backend=draw(st.sampled_from(backends)),
        num_shared_experts=shared,
        shared_hidden_dim=draw(st.sampled_from([None, 3])),
        shared_expert_gate=draw(st.booleans()) if shared else False,
    )
    D = draw(st.integers(1, 7))
    config = MoEConfig(
        dim=D,
        hidden_dim=draw(st.integers(1, 6)),
        num_experts=E,
        top_k=top_k,
        router=router,
        capacity=CapacityConfig(
            capacity_factor=draw(st.sampled_from(CAPACITY_FACTORS)), batch_prioritized=draw(st.booleans())
        ),
        experts=experts,
    )
    T = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 11]))
    leading = draw(st.sampled_from([(T,), (1, T), (T, 1)]))
    return Case(
        config=config,
        shape=(*leading, D),
        top_k=draw(st.one_of(st.none(), st.integers(1, reachable))),
        capacity_factor=draw(st.one_of(st.none(), st.sampled_from(CAPACITY_FACTORS))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case: Case, dtype: torch.dtype = torch.float32) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    """The layer with random parameters (and selection bias), an input and an output cotangent."""
    torch.manual_seed(case.seed)
    layer = MoELayer.from_config(case.config)
    if layer.router.expert_bias_E is not None:
        # A selection bias comparable to the scores, so that it really changes choices.
        layer.router.expert_bias_E.copy_(0.3 * torch.randn(case.config.num_choices))
    layer = layer.to(dtype)
    x = torch.randn(case.shape).to(dtype)
    grad_y = torch.randn(case.shape)
    return layer, x, grad_y


def run_layer(
    layer: MoELayer, x: torch.Tensor, grad_y: torch.Tensor, case: Case, compiled: bool = False
) -> tuple[torch.Tensor, dict]:
    """Forward and backward; ``compiled``: through ``torch.compile(fullgraph=True)`` (AOT autograd)."""
    x = x.clone().requires_grad_(True)
    run = layer
    if compiled:
        torch._dynamo.reset()  # a fresh cache: each example compiles its own layer
        run = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = run(x, top_k=case.top_k, capacity_factor=case.capacity_factor)
    (y.float() * grad_y).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    return y, grads


def layer_decisions(
    layer: MoELayer, x: torch.Tensor, top_k: int, capacity_factor: float | None
) -> tuple[list[list[int]], set[tuple[int, int]], list[int]]:
    """The layer's own top-k choice, kept ``(t, k)`` assignments and experts per token for ``x``."""
    cf = layer.config.capacity.capacity_factor if capacity_factor is None else capacity_factor
    with torch.no_grad():
        route = layer.router(x.reshape(-1, layer.config.dim), top_k, layer.config.router.top_p)
    full = route
    if layer.config.experts.zero_experts:
        route = routed_experts_only(route, layer.config.num_experts)
    layout = make_layout(
        route.expert_ids_TK,
        route.weights_TK,
        layer.config.num_experts,
        cf,
        layer.config.capacity.batch_prioritized,
        route.valid_TK,
    )
    kept = {divmod(s, top_k) for s in layout.slot_ids_N.tolist()}
    return full.expert_ids_TK.tolist(), kept, full.experts_per_token().tolist()


def reference_for_layer(
    layer: MoELayer, x: torch.Tensor, x64: torch.Tensor, top_k: int | None, capacity_factor: float | None
) -> tuple[ReferenceOutput, Params]:
    """The reference output and parameters, on the layer's own decisions where only near ties differ.

    Ties in the top-k, in the choice of expert groups and in the drop order are checked,
    not skipped: where the reference's decision margin is tiny, the layer's choice and
    kept set must be among the tied alternatives (else ``AssertionError``), and the rest
    of the layer is checked against the reference on them.
    """
    params = reference_params(layer)
    k = top_k or layer.config.top_k
    out = reference_moe(layer.config, params, x64, top_k=k, capacity_factor=capacity_factor)
    if out.margin <= MARGIN:
        chosen, kept, counts = layer_decisions(layer, x, k, capacity_factor)
        out = reference_moe(
            layer.config,
            params,
            x64,
            top_k=k,
            capacity_factor=capacity_factor,
            near_tie_choice=chosen,
            near_tie_kept=kept,
            near_tie_counts=counts,
        )
    return out, params


def run_reference(
    layer: MoELayer, x: torch.Tensor, grad_y: torch.Tensor, case: Case
) -> tuple[ReferenceOutput, dict]:
    x64 = x.detach().double().requires_grad_(True)
    out, params = reference_for_layer(layer, x, x64, case.top_k, case.capacity_factor)
    (out.y_TD * grad_y.double()).sum().backward()
    grads = {name: p.grad for name, p in params.items() if p.requires_grad}
    grads["x"] = x64.grad
    return out, grads


def assert_close_scaled(
    actual: torch.Tensor | None, expected: torch.Tensor | None, rel: float, floor: float, name: str
) -> None:
    """Elementwise ``|a - e| <= rel * (|e| + max|e|) + floor`` (a ``None`` grad means zero).

    ``floor`` absorbs the rounding of O(1) terms that cancel to a tiny result.
    """
    if expected is None and actual is None:
        return
    if expected is None:
        expected = torch.zeros_like(actual)
    if actual is None:
        actual = torch.zeros_like(expected)
    assert actual.shape == expected.shape, name
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    tolerance = rel * (expected.abs() + scale) + floor
    error = (actual - expected).abs()
    assert bool((error <= tolerance).all()), (
        f"{name}: max error {error.max().item():.3g}, scale {scale:.3g}\nactual={actual}\nexpected={expected}"
    )


def check_against_reference(
    case: Case, dtype: torch.dtype, rel: float, floor: float, autocast: bool = False, compiled: bool = False
) -> None:
    layer, x, grad_y = build(case, dtype)
    reference, expected = run_reference(layer, x, grad_y, case)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
        y, grads = run_layer(layer, x, grad_y, case, compiled)

    assert y.shape == x.shape
    assert y.dtype == (torch.bfloat16 if autocast else dtype)
    stats = layer.stats
    assert stats.routed_per_expert.tolist() == reference.routed_per_expert
    assert stats.tokens_per_expert.tolist() == reference.tokens_per_expert
    assert stats.capacity == reference.capacity
    assert stats.dropped == sum(reference.routed_per_expert) - len(reference.kept)
    E = layer.config.num_experts
    per_token = [sum(e < E for e in row) for row in reference.routing.expert_ids]
    assert stats.experts_per_token.tolist() == [per_token.count(k) for k in range(stats.top_k + 1)]
    zero = layer.config.experts.zero_experts
    if zero:
        chosen = [e for row in reference.routing.expert_ids for e in row]
        assert stats.zero_expert_choices.tolist() == [chosen.count(E + j) for j in range(len(zero))]
    else:
        assert stats.zero_expert_choices is None
    assert_close_scaled(y, reference.y_TD, rel, floor, "y")
    assert set(grads) == set(expected), "the reference must cover every parameter"
    gain = router_gain(layer)
    for name, grad in expected.items():
        scale = gain if name.startswith("router.") else 1.0
        assert_close_scaled(grads[name], grad, rel * scale, floor * scale, f"grad {name}")


def router_gain(layer: MoELayer) -> float:
    """How much the router's logits amplify an error in what flows back into them.

    The router's gradient is the routing-weight gradient (the expert outputs, rounded in
    the layer's dtype) times the logits' sensitivity: the cosine router divides by its
    temperature (``1/0.07`` by default), which also saturates its softmax (``1 - p``
    cancels in fp32), and the sum over tokens can cancel; so its gradient is checked
    within that factor against the fp64 reference.
    """
    if layer.config.router.kind != "cosine":
        return 1.0
    return 1.0 / max(float(layer.router.log_temperature.exp()), 0.01)


@settings(max_examples=60)
@given(case=cases())
def test_fp32_matches_reference(case: Case) -> None:
    check_against_reference(case, torch.float32, rel=2e-5, floor=1e-5)


@settings(max_examples=25)
@given(case=cases(backends=("loop",)))
def test_every_backend_matches_reference(case: Case) -> None:
    for backend in BACKENDS:
        config = dataclasses.replace(
            case.config, experts=dataclasses.replace(case.config.experts, backend=backend)
        )
        backend_case = dataclasses.replace(case, config=config)
        check_against_reference(backend_case, torch.float32, rel=2e-5, floor=1e-5)
        check_against_reference(backend_case, torch.bfloat16, rel=4e-2, floor=1e-2)


@settings(max_examples=20)
@given(case=cases(backends=("fused",)))
def test_fused_backend_without_the_one_pass_activation_matches_reference(case: Case) -> None:
    """Where the one-pass SwiGLU kernel does not run, the elementwise ops on the row-major halves do."""
    with (
        mock.patch("flexmoe.experts.backends.takes_swiglu", return_value=False),
        mock.patch("flexmoe.experts.activations.takes_swiglu", return_value=False),
    ):
        check_against_reference(case, torch.float32, rel=2e-5, floor=1e-5)
        check_against_reference(case, torch.bfloat16, rel=4e-2, floor=1e-2)


@settings(max_examples=30)
@given(case=cases())
def test_bf16_layer_matches_reference(case: Case) -> None:
    # The reference computes in fp64 from the same bf16-rounded weights and input.
    check_against_reference(case, torch.bfloat16, rel=4e-2, floor=1e-2)


@settings(max_examples=25)
@given(case=cases())
def test_autocast_bf16_matches_reference(case: Case) -> None:
    # fp32 parameters; the router stays fp32, the expert GEMMs run in bf16.
    check_against_reference(case, torch.float32, rel=4e-2, floor=1e-2, autocast=True)


@settings(max_examples=20)
@given(case=cases())
def test_fp16_layer_matches_reference(case: Case) -> None:
    # fp16 has 3 more mantissa bits than bf16 but a narrow range; the sizes here stay in range.
    check_against_reference(case, torch.float16, rel=1e-2, floor=5e-3)


def test_a_near_tie_is_checked_not_skipped():
    """The reference takes another top-k only where it differs by near-tied scores."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight[0] = 0.5
        layer.router.weight[1] = 0.5 + 1e-9  # experts 0 and 1: a near tie
        layer.router.weight[2:] = -0.5  # experts 2 and 3: clearly behind
    params = reference_params(layer)
    x = torch.ones(1, 8, dtype=torch.float64)
    best = reference_moe(layer.config, params, x).routing.expert_ids[0][0]
    assert best in (0, 1)
    other = 1 - best
    tied = reference_moe(layer.config, params, x, near_tie_choice=[[other]])
    assert tied.routing.expert_ids == [[other]]
    with pytest.raises(AssertionError):  # not a tie: refused
        reference_moe(layer.config, params, x, near_tie_choice=[[2]])


def test_a_near_tie_between_groups_is_checked_not_skipped():
    """Group-limited routing: another group is taken only where the group scores near-tie."""
    layer = MoELayer(8, 16, num_experts=4, top_k=1, router=RouterConfig(num_groups=2, topk_groups=1))
    with torch.no_grad():
        layer.router.weight[0] = 0.5  # group 0: expert 0 leads
        layer.router.weight[1] = -0.5
        layer.router.weight[2] = 0.5 + 1e-9  # group 1: expert 2 near-ties expert 0
        layer.router.weight[3] = -0.4
    params = reference_params(layer)
    x = torch.ones(1, 8, dtype=torch.float64)
    best = reference_moe(layer.config, params, x).routing.expert_ids[0][0]
    assert best in (0, 2)
    other = 2 - best
    assert reference_moe(layer.config, params, x, near_tie_choice=[[other]]).routing.expert_ids == [[other]]
    for wrong in (1, 3):  # in a tied group but not its best; and a group's runner-up
        with pytest.raises(AssertionError):
            reference_moe(layer.config, params, x, near_tie_choice=[[wrong]])


def test_a_near_tie_in_the_drop_order_is_checked_not_skipped():
    """Batch priority: another kept set is taken only where the weights near-tie."""
    expert_ids = [[0], [0], [0]]
    weights = [[0.5], [0.5 + 1e-9], [0.2]]  # capacity 1 of 3: token 1 wins, token 0 near-ties it
    kept, cap, margin = kept_assignments(expert_ids, weights, 3, 1.0, batch_prioritized=True)
    assert (kept, cap) == ({(1, 0)}, 1) and margin < 1e-8
    tied, _, _ = kept_assignments(expert_ids, weights, 3, 1.0, True, near_tie_kept={(0, 0)})
    assert tied == {(0, 0)}
    for wrong in ({(2, 0)}, {(0, 0), (1, 0)}, set()):  # a clearly lighter one; too many; too few
        with pytest.raises(AssertionError):
            kept_assignments(expert_ids, weights, 3, 1.0, True, near_tie_kept=wrong)
    with pytest.raises(AssertionError):  # the default priority is exact: no tie to take
        kept_assignments(expert_ids, weights, 3, 1.0, False, near_tie_kept={(1, 0)})
