"""OffloadedExperts' one-token path (a decode step of one sequence) against its general path, bit for bit.

The one-token path runs each expert on the token's row and sums the weighted outputs in
slot order; the general path dispatches expert-major rows and combines them. Every
output bit, the layer's stats and the cache's counts must agree, over routers, dtypes,
capacities, int8 experts and budgets that make experts wait for reads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer, RouterConfig
from flexmoe.experts.cache import ExpertCache
from flexmoe.layer.offloaded import OffloadedExperts, int8_experts_in_memory, offload_experts


class Store:
    """The layer's own experts, read as copies."""

    def __init__(self, layer: MoELayer) -> None:
        self.w_in, self.w_out = layer.experts.w_in.detach().clone(), layer.experts.w_out.detach().clone()

    def nbytes(self, key):
        return (self.w_in[0].numel() + self.w_out[0].numel()) * self.w_in.element_size()

    def read(self, key):
        return self.w_in[key[1]].clone(), self.w_out[key[1]].clone()


def offloaded(layer: MoELayer, kind: str, budget_experts: int | None) -> OffloadedExperts:
    layer = copy.deepcopy(layer)
    if kind == "int8":
        int8_experts_in_memory(layer)
    else:
        store = Store(layer)
        budget = None if budget_experts is None else budget_experts * store.nbytes((0, 0))
        offload_experts(layer, ExpertCache(store, 1, budget, prefetch=False), 0)
    assert isinstance(layer.strategy, OffloadedExperts)
    return layer


def general_path_only(layer: MoELayer) -> MoELayer:
    layer.strategy._takes_token = lambda x_TD, route: False  # type: ignore[method-assign]
    return layer


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    dim=st.sampled_from([16, 48, 64]),
    hidden=st.sampled_from([8, 24, 32]),
    experts=st.integers(2, 10),
    top_k=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    router=st.sampled_from(["softmax", "sigmoid"]),
    capacity_factor=st.sampled_from([0.0, 1.0, -1.25]),
    kind=st.sampled_from(["plain", "int8"]),
    budget=st.sampled_from([None, "top_k"]),
    steps=st.integers(1, 3),
)
def test_one_token_equals_the_general_path(
    seed, dim, hidden, experts, top_k, dtype, router, capacity_factor, kind, budget, steps
):
    top_k = min(top_k, experts)
    torch.manual_seed(seed)
    layer = MoELayer(
        dim,
        hidden,
        experts,
        top_k,
        router=RouterConfig(kind=router),
        capacity_factor=capacity_factor,
    ).to(dtype)
    layer.eval()
    budget_experts = top_k if budget == "top_k" else None
    token = offloaded(layer, kind, budget_experts)
    general = general_path_only(offloaded(layer, kind, budget_experts))
    runs = []
    original = OffloadedExperts._run_token

    def counted(self, *args):
        runs.append(1)
        return original(self, *args)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(OffloadedExperts, "_run_token", counted)
        for _ in range(steps):
            x = torch.randn(1, 1, dim).to(dtype)
            y_token, y_general = token(x), general(x)
            assert y_token.dtype == y_general.dtype == dtype
            assert torch.equal(y_token, y_general)
            a, b = token.stats, general.stats
            assert torch.equal(a.routed_per_expert, b.routed_per_expert)
            assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
            assert (a.capacity, a.dropped, a.num_tokens) == (b.capacity, b.dropped, b.num_tokens)
    assert len(runs) == steps  # the one-token path ran, and only on the first layer
    cache_a, cache_b = token.strategy.cache.stats, general.strategy.cache.stats
    assert (cache_a.lookups, cache_a.hits, cache_a.misses) == (cache_b.lookups, cache_b.hits, cache_b.misses)
    token.strategy.cache.close()
    general.strategy.cache.close()


def test_the_general_path_runs_several_tokens_gradients_and_top_p():
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 6, 3, router=RouterConfig(top_p=0.5)).eval()
    strategy = offloaded(layer, "plain", None).strategy
    one = torch.randn(1, 16)
    route = layer.router(one, 3, None)
    assert strategy._takes_token(one, route)
    assert not strategy._takes_token(torch.randn(2, 16), layer.router(torch.randn(2, 16), 3, None))
    assert not strategy._takes_token(one, layer.router(one, 3, 0.5))  # top-p: unused slots
    assert not strategy._takes_token(one.requires_grad_(), route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not strategy._takes_token(one.detach(), route)
    strategy.cache.close()
