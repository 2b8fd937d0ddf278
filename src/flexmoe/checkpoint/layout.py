"""Where a model's tensors go in a checkpoint: tensor names and the whole-expert layout.

Every tensor except the experts' is stored under its ``state_dict`` name. Experts are
stored one tensor per expert and whole, with the single-device shape of that expert,
whatever the world size and placement that wrote them: ``<layer>.experts.w_in.e<expert>``.
Optimizer state is named ``optim/<parameter>/<key>``, with ``.e<expert>`` for the
per-expert state of expert parameters. A checkpoint written by ``W`` ranks thus loads on
``W'`` ranks: each rank reads the whole experts it stores and keeps its slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.experts import GroupedExperts
from flexmoe.layer import MoELayer

__all__ = [
    "EXPERT_NAMES",
    "ExpertParam",
    "expert_key",
    "expert_params",
    "layer_config",
    "local_from_whole",
    "moe_layers",
    "optim_key",
    "whole_expert_shapes",
    "whole_experts",
]

EXPERT_NAMES = ("w_in", "w_out", "b_in", "b_out")


@dataclasses.dataclass(frozen=True)
class ExpertParam:
    """An expert parameter of an MoE layer: ``layer.experts.<name>``."""

    layer: str
    name: str


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The model's MoE layers by module name; each must have the built-in grouped experts."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    for name, layer in layers.items():
        if not isinstance(layer.experts, GroupedExperts):
            raise CheckpointError(
                f"MoE layer {name or '<root>'!r} has custom experts; checkpoints need the built-in ones"
            )
        if layer.world_size > 1 and layer.experts.lora is not None:
            raise CheckpointError(
                f"MoE layer {name or '<root>'!r}: checkpoints of LoRA adapters on distributed layers are "
                "not supported yet; save the adapter with flexmoe.adapters.lora_state_dict"
            )
    return layers


def layer_config(layer: MoELayer) -> dict[str, object]:
    """The settings a checkpoint's experts must share with the model to load."""
    cfg = layer.config
    return {
        "dim": cfg.dim,
        "hidden_dim": cfg.hidden_dim,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "activation": cfg.experts.activation,
        "bias": cfg.experts.bias,
    }


def expert_prefix(layer_name: str) -> str:
    """``<layer>.experts.``: the prefix of a layer's expert parameters."""
    return f"{layer_name}.experts." if layer_name else "experts."


def expert_params(layers: dict[str, MoELayer]) -> dict[str, ExpertParam]:
    """Every expert parameter name of a single-device model with these layers.

    Includes names a rank may lack (a sharded expert's ``b_out`` lives on shard 0 only).
    """
    return {
        expert_prefix(lname) + pname: ExpertParam(lname, pname)
        for lname, layer in layers.items()
        for pname in whole_expert_shapes(layer)
    }


def expert_key(param: str, expert: int) -> str:
    """``<param>.e<expert>``: the stored name of one whole expert of ``param``."""
    return f"{param}.e{expert}"


def optim_key(param: str, key: str) -> str:
    """``optim/<param>/<key>``: the stored name of optimizer state ``key`` of ``param``."""
    return f"optim/{param}/{key}"


def whole_expert_shapes(layer: MoELayer) -> dict[str, tuple[int, ...]]:
    """The single-device shape of one expert's parameters (``w_in``, ``w_out`` and the biases)."""
    cfg = layer.config
    one = GroupedExperts(
        1, cfg.dim, cfg.hidden_dim, activation=cfg.experts.activation, bias=cfg.experts.bias, device="meta"
    )
    return {pname: tuple(p.shape[1:]) for pname in EXPERT_NAMES if (p := getattr(one, pname)) is not None}


def whole_experts(layer: MoELayer, tensors: dict[str, Tensor | None]) -> dict[int, dict[str, Tensor]]:
    """The whole experts this rank writes, from tensors shaped like its expert parameters.

    ``{expert: {name: tensor}}``. Sharded experts are gathered first (a collective: every
    rank calls it) and written by their shard 0.
    """
    whole = layer.whole_stored_experts(tensors)
    placement = layer.placement
    if placement is not None and placement.sharded and placement.shard_index != 0:
        return {}
    return {
        expert: {
            name: t[row].detach().contiguous() for name in EXPERT_NAMES if (t := whole.get(name)) is not None
        }
        for row, expert in enumerate(layer.stored_experts)
    }


def local_from_whole(layer: MoELayer, name: str, get: Callable[[int], Tensor]) -> Tensor | None:
    """The rank's stored tensor ``name`` (e.g. ``w_in``), built from whole experts ``get(expert)``.

    ``None`` where the rank stores none of it (a sharded expert's ``b_out`` off shard 0).
    """
    placement = layer.placement
    if placement is None or not placement.sharded:
        return torch.stack([get(e) for e in layer.stored_experts])
    gated = layer.config.experts.activation in GATED_ACTIVATIONS
    return placement.shard_of(name, get(placement.first_expert).unsqueeze(0), gated)
