"""The workspace pool: reuse, ownership, and a byte bound that holds whatever the calls do."""

from __future__ import annotations

import importlib

import pytest
import torch

import flexmoe
from flexmoe.workspace import WORKSPACE, Workspace

from .distributed import run_distributed
from .test_experts import ScaleExperts

CPU = torch.device("cpu")


def _offer(pool: Workspace, numel: int) -> int:
    buffer = pool.take((numel,), torch.float32, CPU)
    pointer = buffer.untyped_storage().data_ptr()
    pool.give(buffer)
    return pointer


def test_a_given_buffer_is_taken_again():
    pool = Workspace()
    pointer = _offer(pool, 1024)
    assert pool.pooled_bytes() == 4096
    again = pool.take((32, 32), torch.float32, CPU)
    assert again.untyped_storage().data_ptr() == pointer and pool.pooled_bytes() == 0


def test_a_shared_buffer_is_not_pooled():
    pool = Workspace()
    buffer = pool.take((1024,), torch.float32, CPU)
    view = buffer[:10]
    pool.give(buffer)
    assert pool.pooled_bytes() == 0
    del view


def test_a_released_buffer_is_pooled_once_nothing_uses_it():
    """``take_until_released``: the buffer returns when freed, never while a view still uses it."""
    pool = Workspace()
    buffer = pool.take_until_released((1024,), torch.float32, CPU)
    pointer = buffer.untyped_storage().data_ptr()
    view = buffer[:10]
    del buffer  # released, but the view still uses the memory
    fresh = pool.take((1024,), torch.float32, CPU)
    assert fresh.untyped_storage().data_ptr() != pointer
    view.fill_(1.0)  # still its own memory
    del view
    again = pool.take((32, 32), torch.float32, CPU)
    assert again.untyped_storage().data_ptr() == pointer and pool.pooled_bytes() == 0


def test_the_byte_bound_evicts_the_oldest_first():
    pool = Workspace(max_bytes=3 * 4096)
    _offer(pool, 1024)
    _offer(pool, 1025)
    _offer(pool, 1026)
    assert pool.pooled_bytes() <= 3 * 4096
    _offer(pool, 1027)  # over the bound: the oldest go first
    assert pool.pooled_bytes() == (1026 + 1027) * 4  # the newest that fit the bound stay
    newest = pool.take((1027,), torch.float32, CPU)
    assert newest.numel() == 1027


def test_a_buffer_larger_than_the_bound_is_not_kept():
    pool = Workspace(max_bytes=1000)
    _offer(pool, 1024)
    assert pool.pooled_bytes() == 0


def test_lowering_the_bound_evicts_at_once():
    pool = Workspace()
    for numel in range(1000, 1010):
        _offer(pool, numel)
    assert pool.pooled_bytes() > 8000
    pool.max_bytes = 8000
    assert pool.pooled_bytes() <= 8000


def test_layer_calls_that_keep_changing_stay_under_the_bound():
    bound = 24 << 20
    saved = WORKSPACE.max_bytes
    WORKSPACE.max_bytes = bound
    try:
        torch.manual_seed(0)
        layer = flexmoe.MoELayer(128, 256, num_experts=8, top_k=2)
        peak = 0
        for i in range(40):  # new batch sizes and top-k every call: buffers of new sizes
            x = torch.randn(64 + 37 * i, 128, requires_grad=True)
            layer(x, top_k=1 + i % 3).sum().backward()
            peak = max(peak, WORKSPACE.pooled_bytes())
        assert 0 < peak <= bound
    finally:
        WORKSPACE.max_bytes = saved


def _switching_plans(rank: int, world: int, bound: int) -> int:
    WORKSPACE.max_bytes = bound
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(64, 128, num_experts=4, top_k=2)
    plans = layer.valid_plans(degrees=(1, 2, 4))
    peak = 0
    for i in range(3 * len(plans)):
        x = torch.randn(96 + 17 * ((i + rank) % 5), 64, requires_grad=True)
        layer(x, plan=plans[i % len(plans)]).sum().backward()
        peak = max(peak, WORKSPACE.pooled_bytes())
    return peak


def test_distributed_calls_that_switch_plans_stay_under_the_bound():
    bound = 2 << 20
    peaks = run_distributed(_switching_plans, 2, bound)
    assert all(0 < peak <= bound for peak in peaks), peaks


def _expert_grads_step(layer: flexmoe.MoELayer, x: torch.Tensor) -> None:
    layer(x).square().sum().backward()


def test_expert_weight_gradients_reuse_their_memory_once_dropped():
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(64, 128, 4, top_k=2)
    x = torch.randn(32, 64)
    _expert_grads_step(layer, x)
    first = layer.experts.w_in.grad.data_ptr(), layer.experts.w_out.grad.data_ptr()
    expected = layer.experts.w_in.grad.clone(), layer.experts.w_out.grad.clone()
    layer.zero_grad(set_to_none=True)  # the gradients go back to the pool...
    _expert_grads_step(layer, x)  # ...and the next backward writes them in the same memory
    assert (layer.experts.w_in.grad.data_ptr(), layer.experts.w_out.grad.data_ptr()) == first
    torch.testing.assert_close(layer.experts.w_in.grad, expected[0])
    torch.testing.assert_close(layer.experts.w_out.grad, expected[1])


def test_a_gradient_still_held_is_never_overwritten():
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(64, 128, 4, top_k=2)
    _expert_grads_step(layer, torch.randn(32, 64))
    kept = layer.experts.w_in.grad  # the user keeps it (a reference, and a view of it)
    view = layer.experts.w_out.grad[1:]
    values = kept.clone(), view.clone()
    layer.zero_grad(set_to_none=True)
    for _ in range(2):
        _expert_grads_step(layer, torch.randn(32, 64))
        layer.zero_grad(set_to_none=True)
    assert torch.equal(kept, values[0]) and torch.equal(view, values[1])


def test_accumulated_gradients_add_up():
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(64, 128, 4, top_k=2)
    xs = [torch.randn(32, 64) for _ in range(3)]
    singles = []
    for x in xs:
        layer.zero_grad(set_to_none=True)
        _expert_grads_step(layer, x)
        singles.append(layer.experts.w_in.grad.clone())
    layer.zero_grad(set_to_none=True)
    for x in xs:
        _expert_grads_step(layer, x)  # accumulates into .grad; each step's own gradient is freed
    torch.testing.assert_close(layer.experts.w_in.grad, sum(singles), rtol=1e-5, atol=1e-6)


class CountingWorkspace(Workspace):
    """A pool that counts the buffers it could not serve from what it holds."""

    fresh = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pooled = self.pooled_bytes()
        buffer = super().take(shape, dtype, device)
        self.fresh += self.pooled_bytes() == pooled
        return buffer


def test_inference_calls_give_their_permuted_rows_back(monkeypatch):
    """After the first call, the rows ``permute`` takes and the combine's come from the pool."""
    torch.manual_seed(0)
    pool = CountingWorkspace()
    # permute's and combine's buffers (the package exports a function of the module's name)
    monkeypatch.setattr(importlib.import_module("flexmoe.dispatch.permute"), "WORKSPACE", pool)
    layer = flexmoe.MoELayer(64, 128, 4, top_k=2)
    x = torch.randn(32, 64)
    with torch.no_grad():
        expected = layer(x)
        first = pool.fresh
        for _ in range(3):
            torch.testing.assert_close(layer(x), expected)
    assert first >= 1 and pool.fresh == first


@pytest.mark.parametrize("custom", [False, True])  # custom experts save the rows themselves
def test_training_calls_keep_their_permuted_rows_for_the_backward(custom: bool, monkeypatch):
    torch.manual_seed(0)
    experts = ScaleExperts(4, 64) if custom else None
    layer = flexmoe.MoELayer(64, 128, 4, top_k=2, experts=experts)
    x, other = torch.randn(32, 64), torch.randn(32, 64)
    permute_module = importlib.import_module("flexmoe.dispatch.permute")
    with monkeypatch.context() as patch:  # the reference: permute and combine without a pool
        patch.setattr(permute_module, "WORKSPACE", Workspace(max_bytes=0))
        layer(x).square().sum().backward()
    expected = [p.grad.clone() for p in layer.experts.parameters()]
    layer.zero_grad(set_to_none=True)
    pointers: list[int] = []
    layer.experts.register_forward_pre_hook(lambda _, args: pointers.append(args[0].data_ptr()))
    loss = layer(x).square().sum()
    layer(other).square().sum()  # a second call before the first's backward
    loss.backward()
    assert pointers[0] != pointers[1]
    for p, grad in zip(layer.experts.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, grad)
