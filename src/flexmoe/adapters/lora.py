"""Attaching LoRA adapters to the grouped experts of a model, saving, loading and merging them.

Works on anything that holds ``GroupedExperts``: a ``MoELayer``, a model built from
them, or a ``transformers`` model converted with ``flexmoe.hf.convert`` (whose experts
share the ``transformers`` Parameters, so merging changes those).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from flexmoe.experts import GroupedExperts
from flexmoe.experts.lora import FACTOR_SHARDS, TARGETS, ExpertLoRA
from flexmoe.layer import MoELayer
from flexmoe.parallel import tag_expert_parameters

__all__ = [
    "add_lora",
    "load_lora_state_dict",
    "lora_adapters",
    "lora_state_dict",
    "merge_lora",
    "remove_lora",
    "unmerge_lora",
]


def grouped_experts(model: nn.Module) -> dict[str, GroupedExperts]:
    """Every ``GroupedExperts`` of ``model`` by its path (``named_modules``)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, GroupedExperts)}


def distributed_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The distributed MoE layers of ``model`` by the path of their experts (``<layer>.experts``)."""
    return {
        f"{path}.experts" if path else "experts": m
        for path, m in model.named_modules()
        if isinstance(m, MoELayer) and m.world_size > 1
    }


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    experts: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    targets: Sequence[str] = TARGETS,
    use_rslora: bool = False,
    freeze_base: bool = True,
) -> dict[str, ExpertLoRA]:
    """Attach a LoRA adapter to every ``GroupedExperts`` of ``model``; returns them by experts path.

    Args:
        model: a ``MoELayer``, a ``GroupedExperts``, or any model holding them (a
            ``transformers`` model converted with ``flexmoe.hf.convert`` included).
        rank: ``r`` of every adapter.
        alpha: updates are ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapters' inputs, in training mode only.
        experts: the expert ids to adapt in every layer (``None``: all), or a mapping from
            experts path (a key of the returned dict, e.g. ``"model.layers.0.mlp.moe.experts"``)
            to ids; layers the mapping leaves out get no adapter.
        targets: the projections to adapt: ``"w_in"`` (gate and up, ``gate_up_proj``)
            and/or ``"w_out"`` (down, ``down_proj``).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        freeze_base: set ``requires_grad=False`` on every other parameter of ``model``
            (routers, experts, attention, ...), so that only the adapters train.

    New adapters start with ``B = 0``: the model's outputs are unchanged until they train.

    On a distributed layer each rank holds the factors of the experts it stores, one row
    per stored expert (zero rows, which stay zero, for experts without an adapter); ``A``
    takes those rows of what a single-device layer draws from the same seed. With
    sharded experts (``num_experts < world size``) a rank's row is its part of its
    expert's factors: ``B_in`` and ``A_out`` cut along the hidden dim like ``w_in`` and
    ``w_out``, ``A_in`` and ``B_out`` whole (their gradients are summed over the shards).
    """
    found = grouped_experts(model)
    if not found:
        raise ValueError(f"model has no GroupedExperts to adapt (a {type(model).__name__})")
    spread = distributed_layers(model)
    chosen: dict[str, Sequence[int] | None]
    if isinstance(experts, Mapping):
        unknown = sorted(set(experts) - set(found))
        if unknown:
            raise ValueError(
                f"experts names {unknown}, which are not GroupedExperts paths of {sorted(found)}"
            )
        chosen = {path: experts[path] for path in found if path in experts}
    else:
        chosen = dict.fromkeys(found, experts)
    for path in chosen:
        check_in_memory(path, found[path], "add_lora")
        if found[path].lora is not None:
            raise ValueError(f"{path or 'the experts'} already has a LoRA adapter; remove_lora() it first")
    adapters = {}
    for path, ids in chosen.items():
        module = found[path]
        E, width, hidden = module.num_experts, module.w_in.shape[1], module.hidden_dim
        if path in spread:  # the single-device adapter; each rank keeps its part below
            placement = spread[path].placement
            assert placement is not None
            E, width, hidden = placement.num_experts, width * placement.shards, placement.hidden_dim
        adapter = ExpertLoRA(
            E,
            module.dim,
            width,
            hidden,
            rank,
            alpha,
            dropout,
            ids,
            targets,
            use_rslora,
            device=module.w_in.device,
            dtype=module.w_in.dtype,
        )
        adapters[path] = (
            adapter if path not in spread else _stored_rows(adapter, spread[path], module.w_in.shape[1])
        )
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for path, adapter in adapters.items():
        found[path].lora = adapter
    return adapters


def check_in_memory(path: str, experts: GroupedExperts, what: str) -> None:
    """Raise ``ValueError`` where ``experts`` are offloaded (``flexmoe.hf.load_offloaded``): nothing to train.

    Offloading empties the expert Parameters (no rows at all), which a layer never has
    otherwise (under expert parallelism every rank stores at least one expert).
    """
    if experts.w_in.shape[0] == 0 and experts.num_experts > 0:
        raise ValueError(
            f"{what}: the experts of {path or 'the layer'} are offloaded (load_offloaded) and cannot be "
            "fine-tuned; fine-tune the model loaded in memory, then serve the adapter with ExpertWeave"
        )


def _stored_rows(adapter: ExpertLoRA, layer: MoELayer, width: int) -> ExpertLoRA:
    """A single-device ``adapter`` as a distributed layer stores it: one row per stored expert."""
    stored = layer.stored_experts
    placement = layer.placement
    hidden = layer.config.hidden_dim if placement is None else placement.local_hidden_dim
    device = adapter.expert_ids.device
    # Its own initial draw is overwritten below; it must not move the generator, so that the
    # next layers' adapters still draw what single-device ones would.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        local = _empty_like_rows(adapter, len(stored), layer.config.dim, width, hidden)
    local.adapted_experts = adapter.experts
    with torch.no_grad():
        for name, value in _dense_factors(adapter).items():
            getattr(local, name).copy_(layer.local_expert_rows(value, FACTOR_SHARDS[name]))
    # Expert parameters, like the weights they adapt: data parallelism leaves them alone, and
    # a factor every shard holds whole counts once in clip_grad_norm_.
    shards = 1 if placement is None else placement.shards
    for name, param in local.named_parameters():
        tag_expert_parameters(param, shards if FACTOR_SHARDS[name] is None else 1)
    return local


def _empty_like_rows(adapter: ExpertLoRA, rows: int, dim: int, width: int, hidden: int) -> ExpertLoRA:
    """An adapter with ``adapter``'s settings and ``rows`` rows, every one adapted (values to be set)."""
    return ExpertLoRA(
        rows,
        dim,
        width,
        hidden,
        adapter.rank,
        adapter.alpha,
        adapter.dropout,
        None,
        adapter.targets,
        adapter.use_rslora,
        device=adapter.expert_ids.device,
        dtype=next(adapter.parameters()).dtype,
    )


def _dense_factors(adapter: ExpertLoRA) -> dict[str, Tensor]:
    """A single-device adapter's factors with one row per expert (zero rows for experts without one)."""
    out = {}
    for name, value in adapter.named_parameters():
        full = value.new_zeros(adapter.num_experts, *value.shape[1:])
        out[name] = full.index_copy_(0, adapter.expert_ids.to(value.device), value.detach())
    return out


def lora_adapters(model: nn.Module) -> dict[str, ExpertLoRA]:
    """The LoRA adapters attached to ``model``'s experts, by experts path."""
    return {path: m.lora for path, m in grouped_experts(model).items() if m.lora is not None}


def _prefix(path: str) -> str:
    return f"{path}.lora." if path else "lora."


def _single_device_state(adapter: ExpertLoRA, layer: MoELayer | None) -> dict[str, Tensor]:
    """``adapter.state_dict()`` as the equivalent single-device adapter's (gathered: a collective)."""
    if adapter.adapted_experts is None or layer is None:
        return {name: value.detach() for name, value in adapter.state_dict().items()}
    ids = torch.tensor(adapter.adapted_experts, device=adapter.expert_ids.device)
    state = {
        name: layer.single_device_expert_rows([p.detach()], FACTOR_SHARDS[name])[0].index_select(0, ids)
        for name, p in adapter.named_parameters()
    }
    state["expert_ids"] = ids
    return state


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' factors and expert ids, by ``<experts path>.lora.<name>`` (detached).

    Only the adapters: the base model saves as before (``state_dict`` of a converted
    ``transformers`` model still writes the original checkpoint names). Adapters of
    distributed layers are gathered into the single-device layout (a collective: call
    it on every rank), so a state saved on any world size loads on any other.
    """
    spread = distributed_layers(model)
    state = {}
    for path, adapter in lora_adapters(model).items():
        for name, value in _single_device_state(adapter, spread.get(path)).items():
            state[_prefix(path) + name] = value
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy ``lora_state_dict`` values into adapters already attached with the same settings.

    Every adapter entry must be given and every given entry must match an adapter of the
    same shape and expert ids (``ValueError`` otherwise, naming the entries). Adapters of
    distributed layers take the single-device layout and keep the rows of their experts.
    """
    spread = distributed_layers(model)
    expected: dict[str, tuple[Tensor, ExpertLoRA, MoELayer | None]] = {}
    for path, adapter in lora_adapters(model).items():
        layer = spread.get(path) if adapter.adapted_experts is not None else None
        shapes = adapter.state_dict(keep_vars=True) if layer is None else _single_device_like(adapter, layer)
        for name, value in shapes.items():
            expected[_prefix(path) + name] = (value, adapter, layer)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict: missing entries {missing}, unexpected entries {unexpected}")
    for key, (held, _, _) in expected.items():
        value = state_dict[key]
        if tuple(value.shape) != tuple(held.shape):
            raise ValueError(
                f"LoRA state dict: {key} has shape {tuple(value.shape)}, expected {tuple(held.shape)}"
            )
        if key.endswith("expert_ids") and not torch.equal(value.to(held.device), held):
            raise ValueError(f"LoRA state dict: {key} adapts experts {value.tolist()}, not {held.tolist()}")
    for key, (held, adapter, layer) in expected.items():
        value = state_dict[key]
        if layer is None:
            held.copy_(value)
        elif not key.endswith("expert_ids"):
            assert adapter.adapted_experts is not None
            ids = torch.tensor(adapter.adapted_experts, device=value.device)
            full = value.new_zeros(layer.config.num_experts, *value.shape[1:]).index_copy_(0, ids, value)
            name = key.rsplit(".", 1)[1]
            getattr(adapter, name).copy_(layer.local_expert_rows(full, FACTOR_SHARDS[name]))


def _single_device_like(adapter: ExpertLoRA, layer: MoELayer) -> dict[str, Tensor]:
    """Empty tensors shaped like the single-device state of a distributed layer's adapter."""
    assert adapter.adapted_experts is not None
    k = len(adapter.adapted_experts)
    shards = 1 if layer.placement is None else layer.placement.shards
    out = {}
    for name, p in adapter.named_parameters():
        shape = list(p.shape)
        shape[0] = k
        like = FACTOR_SHARDS[name]
        if like is not None:  # a sharded expert's rank holds 1/S of the hidden dim
            shape[1 if like == "w_in" else 2] *= shards
        out[name] = p.new_empty(shape)
    out["expert_ids"] = torch.tensor(adapter.adapted_experts, device=adapter.expert_ids.device)
    return out


def merge_lora(model: nn.Module) -> None:
    """Fold every unmerged adapter into its experts' ``w_in`` / ``w_out`` (in place).

    Then the forward runs the base path at base speed; ``unmerge_lora`` subtracts the
    updates again (equal up to rounding). Train only unmerged adapters: while merged, the
    forward does not use the factors, so they get no gradient.
    """
    for module in grouped_experts(model).values():
        if module.lora is not None and not module.lora.merged:
            module.lora.merge_into(module.w_in, module.w_out)


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` for every merged adapter."""
    for module in grouped_experts(model).values():
        if module.lora is not None and module.lora.merged:
            module.lora.unmerge_from(module.w_in, module.w_out)


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Detach every adapter; with ``merge``, fold unmerged ones into the weights first.

    A merged adapter stays folded into the weights; the base parameters keep their
    ``requires_grad`` (``add_lora`` froze them).
    """
    if merge:
        merge_lora(model)
    for module in grouped_experts(model).values():
        module.lora = None
