"""MoELayer's public surface: per-call overrides, stats, aux_loss, dtypes, state_dict, shapes.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

import flexmoe
from flexmoe import MoELayer, RouterConfig
from tests.reference import (
    reference_load_balance_loss,
    reference_moe,
    reference_params,
    reference_z_loss,
)

D, F, E = 6, 5, 4


def make_layer(**kwargs) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, F, E, **kwargs)


def twin(layer: MoELayer, **kwargs) -> MoELayer:
    """A layer built with other settings, holding the same parameters."""
    other = make_layer(**kwargs)
    other.load_state_dict(layer.state_dict())
    return other


# ----------------------------------------------------------------- per-call overrides
def test_top_k_override_applies_to_that_call_only() -> None:
    layer = make_layer(top_k=2)
    config = layer.config
    x = torch.randn(7, D)
    y1 = layer(x, top_k=1)
    assert layer.stats.top_k == 1
    assert layer.config is config and layer.config.top_k == 2
    torch.testing.assert_close(y1, twin(layer, top_k=1)(x))
    y2 = layer(x)
    assert layer.stats.top_k == 2
    torch.testing.assert_close(y2, twin(layer, top_k=2)(x))
    assert not torch.allclose(y1, y2)


def test_capacity_factor_override_applies_to_that_call_only() -> None:
    layer = make_layer(top_k=2, capacity_factor=0.0)
    x = torch.randn(13, D)
    y_capped = layer(x, capacity_factor=0.5)
    assert layer.stats.capacity_factor == 0.5
    assert layer.stats.capacity == math.ceil(0.5 * 13 * 2 / E)
    assert layer.stats.dropped > 0
    assert layer.config.capacity.capacity_factor == 0.0
    torch.testing.assert_close(y_capped, twin(layer, top_k=2, capacity_factor=0.5)(x))
    layer(x)
    assert layer.stats.capacity is None and layer.stats.dropped == 0


def test_plan_override_applies_to_that_call_only() -> None:
    layer = make_layer()
    x = torch.randn(5, D)
    plan = flexmoe.Plan(r=1, d=2)
    y = layer(x, plan=plan)
    assert layer.stats.plan == plan
    assert layer.stats.world_size == 1
    # Every plan computes the same layer.
    torch.testing.assert_close(y, layer(x))
    assert layer.stats.plan == flexmoe.Plan()


def test_forward_never_stores_overrides() -> None:
    layer = make_layer(top_k=2, capacity_factor=1.0)
    before = (layer.config, {k: v.clone() for k, v in layer.state_dict().items()})
    layer(torch.randn(5, D), top_k=3, capacity_factor=-2.0, plan=flexmoe.Plan(d=3))
    assert layer.config == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in layer.state_dict().items())


# ----------------------------------------------------------------- stats
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.0, -0.5, -1.0])
@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("backend", ["auto", "loop", "fused", "grouped_mm"])
def test_stats_are_consistent(capacity_factor: float, batch_prioritized: bool, backend: str) -> None:
    layer = MoELayer(
        8,
        8,
        E,
        top_k=2,
        capacity_factor=capacity_factor,
        batch_prioritized=batch_prioritized,
        backend=backend,
    )
    x = torch.randn(3, 5, 8)
    layer(x)
    s = layer.stats
    T, K = 15, 2
    assert (s.num_tokens, s.top_k, s.capacity_factor) == (T, K, capacity_factor)
    assert s.routed_per_expert.dtype == s.tokens_per_expert.dtype == torch.int64
    assert s.routed_per_expert.shape == s.tokens_per_expert.shape == (E,)
    assert int(s.routed_per_expert.sum()) == T * K
    assert int(s.tokens_per_expert.sum()) + s.dropped == T * K
    assert bool((s.tokens_per_expert <= s.routed_per_expert).all())
    if capacity_factor == 0:
        assert s.capacity is None and s.dropped == 0
    else:
        cap = math.ceil(abs(capacity_factor) * T * K / E)
        expected = cap if capacity_factor > 0 else min(cap, int(s.routed_per_expert.max()))
        assert s.capacity == expected
        assert torch.equal(s.tokens_per_expert, s.routed_per_expert.clamp(max=expected))
    assert s.load_max_over_mean == pytest.approx(float(s.routed_per_expert.max()) / (T * K / E))
    assert s.plan == flexmoe.Plan() and s.world_size == 1
    assert s.backend == ("fused" if backend == "auto" else backend)
    assert s.balance_loss is not None and s.z_loss is None


# ----------------------------------------------------------------- aux_loss
@pytest.mark.parametrize("top_p", [None, 0.4])
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "cosine"])
def test_aux_loss_is_a_differentiable_scalar_with_the_right_value(router: str, top_p: float | None) -> None:
    """With top-p routing too: the balance loss's f counts the routed assignments only."""
    config = RouterConfig(kind=router, cosine_dim=4, top_p=top_p)
    layer = make_layer(top_k=2, router=config, load_balance_weight=0.3, z_loss_weight=0.02)
    x = torch.randn(9, D)
    layer(x)
    aux = layer.aux_loss
    assert aux.shape == () and aux.dtype == torch.float32 and aux.requires_grad

    params = reference_params(layer)
    out = reference_moe(layer.config, params, x.double())
    balance = reference_load_balance_loss(out.routing, E)
    z = reference_z_loss(out.routing)
    torch.testing.assert_close(layer.stats.balance_loss.double(), balance.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.stats.z_loss.double(), z.detach(), atol=1e-6, rtol=1e-6)
    expected = 0.3 * balance + 0.02 * z
    torch.testing.assert_close(aux.double(), expected.detach(), atol=1e-6, rtol=1e-6)

    aux.backward()
    expected.backward()
    for name, p in layer.router.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[f"router.{name}"].grad, atol=1e-6, rtol=1e-5)
    assert any(p.grad.abs().sum() > 0 for p in layer.router.parameters())


def test_top_p_is_checked_and_overrides_one_call() -> None:
    layer = make_layer(top_k=3)
    x = torch.randn(12, D)
    for bad in (0.0, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]"):
            layer(x, top_p=bad)
    with pytest.raises(ValueError, match=r"router\.top_p must be a float in"):
        RouterConfig(top_p=2.0)
    with pytest.raises(ValueError, match=r"router\.min_k must be an int in \[1, top_k=3\]"):
        make_layer(top_k=3, router=RouterConfig(top_p=0.5, min_k=4))
    layer(x, top_p=0.2)
    assert layer.stats.experts_per_token.tolist()[1] > 0  # some tokens took one expert
    layer(x)
    assert layer.stats.experts_per_token.tolist() == [0, 0, 0, 12]  # the configuration: top-3


def test_set_routing_changes_later_calls_like_a_layer_built_that_way() -> None:
    layer = make_layer(top_k=3)
    x = torch.randn(12, D)
    config = layer.set_routing(top_k=2, top_p=0.6, capacity_factor=1.5)
    assert layer.config is config and layer.router.config is config.router
    built = twin(layer, top_k=2, router=RouterConfig(top_p=0.6), capacity_factor=1.5)
    torch.testing.assert_close(layer(x), built(x))
    assert layer.stats.experts_per_token.tolist() == built.stats.experts_per_token.tolist()
    layer.set_routing(top_p=None)  # None turns top-p off; what is not given is kept
    assert layer.config.router.top_p is None and layer.config.top_k == 2
    layer(x)
    assert layer.stats.experts_per_token.tolist() == [0, 0, 12]
    with pytest.raises(ValueError, match=r"router\.min_k must be an int in \[1, top_k=2\]"):
        layer.set_routing(top_p=0.5, min_k=3)
    assert layer.config.router.top_p is None  # a refused change leaves the layer as it was
    with pytest.raises(ValueError, match=r"top_k must be"):
        layer.set_routing(top_k=E + 1)


def test_aux_loss_is_zero_without_balancing_terms() -> None:
    layer = make_layer(load_balance_weight=0.0)
    layer(torch.randn(4, D))
    assert float(layer.aux_loss) == 0.0
    assert layer.stats.balance_loss is None and layer.stats.z_loss is None


# ----------------------------------------------------------------- dtypes
def capture_router_output(layer: MoELayer) -> list:
    outputs: list = []
    layer.router.register_forward_hook(lambda module, args, out: outputs.append(out))
    return outputs


def test_router_runs_in_fp32_for_bf16_input() -> None:
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.experts.w_in.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in layer.router.parameters())
    outputs = capture_router_output(layer)
    y = layer(torch.randn(5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    (route,) = outputs
    assert route.weights_TK.dtype == route.logits_TE.dtype == route.probs_TE.dtype == torch.float32
    assert layer.aux_loss.dtype == torch.float32


def test_router_runs_in_fp32_under_autocast() -> None:
    layer = make_layer()
    outputs = capture_router_output(layer)
    x = torch.randn(5, D)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (route,) = outputs
    assert route.logits_TE.dtype == route.weights_TK.dtype == torch.float32
    # fp32 logits exactly: the same as outside autocast.
    torch.testing.assert_close(route.logits_TE, x @ layer.router.weight.t(), atol=1e-6, rtol=1e-6)


def test_tokens_reach_the_experts_in_autocast_dtype() -> None:
    # Cast before the permutation: T rows cast, K copies of each moved in bf16.
    layer = make_layer()
    seen: list[torch.dtype] = []
    layer.experts.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(5, D, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert seen == [torch.bfloat16]
    assert x.grad is not None and x.grad.dtype == torch.float32
    layer(torch.randn(5, D))
    assert seen == [torch.bfloat16, torch.float32]


# ----------------------------------------------------------------- state_dict
@pytest.mark.parametrize("router", ["softmax", "sigmoid", "cosine"])
def test_state_dict_round_trip(router: str) -> None:
    layer = make_layer(
        router=router, bias=True, num_shared_experts=1, shared_expert_gate=True, aux_free_rate=0.1
    )
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]))
    state = layer.state_dict()
    assert "router.expert_bias_E" in state
    assert not any("pending" in key for key in state), "the step's load counts are not checkpoint state"

    torch.manual_seed(123)
    restored = MoELayer(
        D, F, E, router=router, bias=True, num_shared_experts=1, shared_expert_gate=True, aux_free_rate=0.1
    )
    restored.load_state_dict(state)
    x = torch.randn(8, D)
    torch.testing.assert_close(restored(x), layer(x), atol=0, rtol=0)
    assert torch.equal(restored.router.expert_bias_E, layer.router.expert_bias_E)


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(D,), (3, D), (2, 3, D), (2, 1, 3, D)])
def test_output_shape_for_any_leading_dims(shape: tuple[int, ...]) -> None:
    layer = make_layer()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    assert layer.stats.num_tokens == math.prod(shape[:-1])
    y.sum().backward()
    assert x.grad.shape == x.shape
    # Leading dims are only a batch: the same as the flattened call, token by token.
    torch.testing.assert_close(y.reshape(-1, D), layer(x.detach().reshape(-1, D)))


def test_non_contiguous_input() -> None:
    layer = make_layer()
    x = torch.randn(D, 7).t()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


# ----------------------------------------------------------------- training-only noise
@pytest.mark.parametrize("router", [RouterConfig(noise_std=1.0), RouterConfig(input_jitter=0.5)])
def test_router_noise_only_while_training(router: RouterConfig) -> None:
    layer = make_layer(router=router)
    x = torch.randn(32, D)
    layer.eval()
    y_eval = layer(x)
    # Without noise the layer equals the plain reference.
    out = reference_moe(layer.config, reference_params(layer), x.double())
    torch.testing.assert_close(y_eval.double(), out.y_TD.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), y_eval, atol=0, rtol=0)
    layer.train()
    assert not torch.allclose(layer(x), y_eval)


def test_prepare_for_inference_keeps_the_layer_exact():
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(32, 16, 8, 2).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = layer(x)
        prepared = layer.prepare_for_inference()
        got = layer(x)
    assert prepared == layer.experts.prepare_for_inference()  # platform-dependent, but consistent
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
