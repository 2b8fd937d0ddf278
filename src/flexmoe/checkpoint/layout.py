"""Where a model's tensors go in a checkpoint: tensor names and the whole-expert layout.

Every tensor except the experts' is stored under its ``state_dict`` name. Experts are
stored one tensor per expert and whole, with the single-device shape of that expert,
whatever the world size and placement that wrote them: ``<layer>.experts.w_in.e<expert>``.
A LoRA adapter's factors go the same way, one row per expert of every expert
(``<layer>.experts.lora.A_in.e<expert>``, zero for experts without an adapter), whether
the layer keeps rows of adapted experts only (one device) or of every stored expert
(distributed); its ``expert_ids`` are the model's own, not stored.
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
from flexmoe.experts.lora import FACTOR_SHARDS, ExpertLoRA
from flexmoe.layer import MoELayer

__all__ = [
    "EXPERT_NAMES",
    "LORA_NAMES",
    "ExpertParam",
    "adapted_rows",
    "expert_key",
    "expert_params",
    "expert_rows",
    "expert_tensor",
    "layer_config",
    "layer_expert_names",
    "local_from_whole",
    "lora_derived_keys",
    "moe_layers",
    "optim_key",
    "unadapted_rows",
    "whole_expert_shapes",
    "whole_experts",
]

EXPERT_NAMES = ("w_in", "w_out", "b_in", "b_out")
LORA_NAMES = ("lora.A_in", "lora.B_in", "lora.A_out", "lora.B_out")


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
    shapes = {pname: tuple(p.shape[1:]) for pname in EXPERT_NAMES if (p := getattr(one, pname)) is not None}
    adapter = _adapter(layer)
    if adapter is not None:  # an adapter's factors, per expert (a sharded expert's rank holds a part)
        (H, D), F, r = shapes["w_in"], cfg.hidden_dim, adapter.rank
        whole = {"lora.A_in": (r, D), "lora.B_in": (H, r), "lora.A_out": (r, F), "lora.B_out": (D, r)}
        present = [pname for pname in LORA_NAMES if expert_tensor(layer, pname) is not None]
        shapes.update({pname: whole[pname] for pname in present})
    return shapes


def _adapter(layer: MoELayer) -> ExpertLoRA | None:
    experts = layer.experts
    return experts.lora if isinstance(experts, GroupedExperts) else None


def layer_expert_names(layer: MoELayer) -> list[str]:
    """The names of ``layer``'s per-expert tensors: ``EXPERT_NAMES``, then its adapter's factors."""
    adapter = _adapter(layer)
    lora = [] if adapter is None else [n for n in LORA_NAMES if expert_tensor(layer, n) is not None]
    return [*EXPERT_NAMES, *lora]


def expert_tensor(layer: MoELayer, name: str) -> Tensor | None:
    """The stored tensor ``name`` of ``layer`` (``w_in``, ..., ``lora.A_in``, ...), ``None`` where absent."""
    if name.startswith("lora."):
        adapter = _adapter(layer)
        factor: Tensor | None = None if adapter is None else getattr(adapter, name.removeprefix("lora."))
        return factor
    value: Tensor | None = getattr(layer.experts, name)
    return value


def expert_rows(layer: MoELayer, name: str, tensor: Tensor | None) -> Tensor | None:
    """``tensor`` (shaped like ``expert_tensor(layer, name)``) with one row per stored expert.

    Only a single-device adapter of some experts changes: its rows are spread over every
    expert, zero for the others.
    """
    adapter = _adapter(layer)
    if (
        tensor is None
        or not name.startswith("lora.")
        or adapter is None
        or adapter.adapted_experts is not None
    ):
        return tensor
    if len(adapter.experts) == adapter.num_experts:
        return tensor
    full = tensor.new_zeros(adapter.num_experts, *tensor.shape[1:])
    return full.index_copy_(0, adapter.expert_ids.to(tensor.device), tensor.detach())


def adapted_rows(layer: MoELayer, name: str, rows: Tensor) -> Tensor:
    """The inverse of ``expert_rows``: a single-device adapter's rows of ``rows`` (one per stored expert)."""
    adapter = _adapter(layer)
    if not name.startswith("lora.") or adapter is None or adapter.adapted_experts is not None:
        return rows
    return rows.index_select(0, adapter.expert_ids.to(rows.device))


def unadapted_rows(layer: MoELayer, rows: Tensor) -> Tensor:
    """The rows (one per stored expert) of experts without an adapter: they must be zero."""
    adapter = _adapter(layer)
    assert adapter is not None
    adapted = set(adapter.experts if adapter.adapted_experts is None else adapter.adapted_experts)
    stored = layer.stored_experts
    keep = [row for row, e in enumerate(stored) if e not in adapted]
    return rows.index_select(0, torch.tensor(keep, dtype=torch.int64, device=rows.device))


def lora_derived_keys(layers: dict[str, MoELayer]) -> set[str]:
    """``state_dict`` keys the model itself decides, never stored: adapters' ``expert_ids``."""
    return {
        expert_prefix(n) + "lora.expert_ids" for n, layer in layers.items() if _adapter(layer) is not None
    }


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
        expert: {name: t[row].detach().contiguous() for name, t in whole.items() if t is not None}
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
    whole = get(placement.first_expert).unsqueeze(0)
    if name.startswith("lora."):  # an adapter's factor: cut like w_in / w_out, or whole on every shard
        like = FACTOR_SHARDS[name.removeprefix("lora.")]
        return whole if like is None else placement.shard_of(like, whole, gated)
    return placement.shard_of(name, whole, gated)
