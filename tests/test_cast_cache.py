"""Autocast's copies of the expert weights: reused only while nothing could have changed them."""

from __future__ import annotations

import torch

from flexmoe import MoELayer
from flexmoe.experts.cast_cache import CastCache, pooled_cast
from flexmoe.workspace import WORKSPACE


def autocast_call(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)


def uncached_call(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    layer.experts.casts.clear()
    return autocast_call(layer, x)


def test_decoding_under_autocast_casts_the_weights_once_and_follows_their_changes() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, 2)
    x = torch.randn(5, 16)
    first = autocast_call(layer, x)
    cached = layer.experts.casts.cached()
    assert set(cached) == {("w_in", torch.bfloat16), ("w_out", torch.bfloat16)}
    assert layer.experts.casts.nbytes == (layer.experts.w_in.numel() + layer.experts.w_out.numel()) * 2
    again = autocast_call(layer, x)
    assert all(layer.experts.casts.cached()[k] is v for k, v in cached.items())
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # An optimizer step changes the weights in place: the next call casts them anew.
    layer.experts.w_out.grad = torch.ones_like(layer.experts.w_out)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    changed = autocast_call(layer, x)
    assert not torch.equal(changed, first)
    torch.testing.assert_close(changed, uncached_call(layer, x), rtol=0, atol=0)
    # So does loading other weights.
    other = MoELayer(16, 8, 4, 2)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(autocast_call(layer, x), autocast_call(other, x), rtol=0, atol=0)


def test_training_under_autocast_keeps_no_copy_and_gets_fp32_gradients() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, 2)
    x = torch.randn(5, 16)
    autocast_call(layer, x)  # a copy made without grad ...
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert layer.experts.casts.nbytes == 0  # ... is dropped by a call with grad
    assert layer.experts.w_in.grad is not None and layer.experts.w_in.grad.dtype == torch.float32


def test_pooled_cast_is_a_differentiable_cast() -> None:
    weight = torch.randn(6, 5, requires_grad=True)
    cast = pooled_cast(weight, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, weight.detach().bfloat16())
    grad = torch.randn(6, 5).bfloat16()
    cast.backward(grad)
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    assert torch.equal(weight.grad, grad.float())


def pooled_bytes_after_releases() -> int:
    """What the workspace pool holds once the buffers released so far are pooled."""
    WORKSPACE.give(WORKSPACE.take((1,), torch.float32, torch.device("cpu")))  # a take pools them
    return WORKSPACE.pooled_bytes()


def test_training_under_autocast_returns_the_fp32_gradients_to_the_pool() -> None:
    torch.manual_seed(0)
    layer = MoELayer(64, 128, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(32, 64)).float().sum().backward()
    grads = [layer.experts.w_in.grad, layer.experts.w_out.grad]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    before = pooled_bytes_after_releases()
    del grads
    layer.zero_grad(set_to_none=True)  # the fp32 gradients (cast back from bf16) are freed
    assert pooled_bytes_after_releases() >= before + grad_bytes


def test_cast_cache_returns_the_weight_itself_in_its_own_dtype() -> None:
    cache = CastCache()
    weight = torch.randn(3, 4)
    with torch.no_grad():
        assert cache.cast("w", weight, torch.float32) is weight
        assert cache.cast("w", weight, torch.bfloat16) is cache.cast("w", weight, torch.bfloat16)
        weight.add_(1.0)
        torch.testing.assert_close(cache.cast("w", weight, torch.bfloat16), weight.to(torch.bfloat16))


def test_a_compiled_layer_decodes_under_autocast_like_the_eager_one() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 4, 2)
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, fullgraph=True)
    eager = autocast_call(layer, x)
    torch.testing.assert_close(autocast_call(compiled, x), eager, rtol=0, atol=0)
