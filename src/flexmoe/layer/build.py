"""Building a layer's parts: its experts, and the check that every rank built the same layer."""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.experts import GroupedExperts, ModuleListExperts
from flexmoe.parallel import ExpertParallel, stable_hash, tag_expert_parameters
from flexmoe.placement import Placement

__all__ = ["make_experts", "share_across_ranks"]


def make_experts(
    config: MoEConfig,
    experts: nn.Module | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    placement: Placement | None = None,
) -> nn.Module:
    """The layer's routed experts: the built-in grouped FFN (this rank's part of it), or a custom module."""
    num_experts, hidden_dim = config.num_experts, config.hidden_dim
    what = "num_experts"
    if placement is not None:
        num_experts, hidden_dim = placement.local_experts, placement.local_hidden_dim
        if experts is not None:
            raise ValueError(
                "experts: custom expert modules run on a single device only (group=False); "
                "a distributed layer needs the built-in grouped experts"
            )
    if experts is None:
        ecfg = config.experts
        built = GroupedExperts(
            num_experts, config.dim, hidden_dim, ecfg.activation, ecfg.bias, ecfg.backend, device, dtype
        )
        if placement is not None and placement.sharded:
            # Hidden shard s of its expert; w_out's columns are fan-in F, not F/S.
            with torch.no_grad():
                bound = 1.0 / config.hidden_dim**0.5
                built.w_out.uniform_(-bound, bound)
                if built.b_out is not None:
                    built.b_out.uniform_(-bound, bound)
            if built.b_out is not None and placement.shard_index != 0:
                built.b_out = None  # the output bias lives on shard 0 only
        return built
    if isinstance(experts, nn.ModuleList):
        if len(experts) != num_experts:
            raise ValueError(f"experts must hold {what}={num_experts} modules, got {len(experts)}")
        return ModuleListExperts(experts, config.dim)
    if not isinstance(experts, nn.Module):
        raise TypeError(f"experts must be an nn.Module or nn.ModuleList, got {type(experts).__name__}")
    for name, expected in (("num_experts", num_experts), ("dim", config.dim)):
        got = getattr(experts, name, None)
        if got != expected:
            raise ValueError(f"experts.{name} must be {expected} to match the layer, got {got!r}")
    return experts


def share_across_ranks(ep: ExpertParallel, config: MoEConfig, router: nn.Module, experts: nn.Module) -> None:
    """Check that every rank built the same layer, give every rank rank 0's router, tag the experts."""
    fields = {
        "dim": config.dim,
        "hidden_dim": config.hidden_dim,
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "ranks_per_node": ep.placement.ranks_per_node,
        "custom experts": stable_hash(type(experts).__name__),
        "configuration (router, capacity, experts, balance)": stable_hash(repr(config)),
    }
    ep.check_same({"num_tokens": 0, **fields})
    ep.broadcast_(router)
    tag_expert_parameters(experts)
