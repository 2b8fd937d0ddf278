"""The distributed training contract with uneven batches: the recipe gives the single-device gradient.

Each rank adds ``aux_loss / W`` to its loss (the mean over ranks, as data parallelism
averages); the router's gradient summed over ranks must then equal the single-device
layer's on the ranks' concatenated batches, for any per-rank token counts. The loss here
is the auxiliary loss alone (weights 1), so a wrong share cannot hide under the main loss.
"""

from __future__ import annotations

import pytest
import torch

from flexmoe import MoELayer
from flexmoe.parallel import all_reduce_sum_


def _router_grads_match(rank: int, world: int, tokens_per_rank: list[int], router: str) -> float:
    torch.manual_seed(0)
    kwargs = {"load_balance_weight": 1.0, "z_loss_weight": 1.0, "router": router}
    layer = MoELayer(16, 32, 4, 2, **kwargs)  # type: ignore[arg-type]
    oracle = MoELayer(16, 32, 4, 2, group=False, **kwargs)  # type: ignore[arg-type]
    oracle.load_single_device_state_dict(layer.single_device_state_dict())
    x_all = torch.randn(sum(tokens_per_rank), 16, generator=torch.Generator().manual_seed(1))
    oracle(x_all)
    oracle.aux_loss.backward()
    start = sum(tokens_per_rank[:rank])
    layer(x_all[start : start + tokens_per_rank[rank]])
    (layer.aux_loss / world).backward()
    # The ranks' mean aux_loss is the whole batch's.
    mean = layer.aux_loss.detach().clone()
    all_reduce_sum_([mean])
    torch.testing.assert_close(mean / world, oracle.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    worst = 0.0
    for name, param in layer.router.named_parameters():
        grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        all_reduce_sum_([grad])
        want = dict(oracle.router.named_parameters())[name].grad
        assert want is not None
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"router.{n}: {m}")
        worst = max(worst, float((grad - want).abs().max()))
    return worst


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("tokens_per_rank", "router"),
    [([37, 2], "softmax"), ([0, 23], "softmax"), ([5, 0, 40, 9], "sigmoid")],
)
def test_aux_loss_recipe_gives_the_single_device_router_gradient(rank_pools, tokens_per_rank, router):
    rank_pools.run(_router_grads_match, len(tokens_per_rank), tokens_per_rank, router)
