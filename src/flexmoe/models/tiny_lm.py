"""A small decoder-only MoE language model: attention + ``MoELayer`` blocks, byte vocabulary.

Legend: B batch, L sequence length, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.config import Plan, RouterConfig
from flexmoe.layer import MoELayer, name_moe_layers

__all__ = ["TinyMoELM", "TinyMoELMConfig"]


@dataclass(frozen=True, kw_only=True)
class TinyMoELMConfig:
    """Shape of the model."""

    vocab_size: int = 256
    context: int = 128
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    top_p: float | None = None  # top-p routing (a per-token number of experts), see RouterConfig
    min_k: int = 1
    zero_experts: tuple[str, ...] = ()  # zero-computation experts, see ExpertConfig.zero_experts
    expert_hidden_dim: int = 256
    capacity_factor: float = 0.0
    load_balance_weight: float = 0.01
    plan: Plan | str | None = None  # the MoE layers' parallel plan (distributed runs); "auto": the tuner

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"num_heads must divide dim={self.dim}, got {self.num_heads}")


class _Block(nn.Module):
    def __init__(self, config: TinyMoELMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.plan = config.plan
        self.norm_attn = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.norm_moe = nn.LayerNorm(config.dim)
        self.moe = MoELayer(
            config.dim,
            config.expert_hidden_dim,
            config.num_experts,
            config.top_k,
            router=RouterConfig(top_p=config.top_p, min_k=config.min_k),
            zero_experts=config.zero_experts,
            capacity_factor=config.capacity_factor,
            load_balance_weight=config.load_balance_weight,
        )

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.norm_attn(x_BLD)).view(B, L, 3, self.num_heads, D // self.num_heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BLD = x_BLD + self.proj(attn.transpose(1, 2).reshape(B, L, D))
        out: Tensor = x_BLD + self.moe(self.norm_moe(x_BLD), plan=self.plan)
        return out


class TinyMoELM(nn.Module):
    """Token + position embeddings, ``num_layers`` attention/MoE blocks, tied output head."""

    def __init__(self, config: TinyMoELMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.position = nn.Parameter(torch.zeros(config.context, config.dim))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim)
        name_moe_layers(self)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in depth order."""
        return [module for module in self.modules() if isinstance(module, MoELayer)]

    def forward(self, tokens_BL: Tensor) -> Tensor:
        """Next-token logits ``[B, L, V]``."""
        L = tokens_BL.shape[1]
        if self.config.context < L:
            raise ValueError(f"tokens must have length <= context={self.config.context}, got {L}")
        x_BLD = self.embed(tokens_BL) + self.position[:L]
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return F.linear(self.norm(x_BLD), self.embed.weight)

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward."""
        return torch.stack([layer.aux_loss for layer in self.moe_layers()]).sum()
