"""Preparing a model for expert-specialized fine-tuning: only the chosen experts train.

Freezing some rows of a fused ``[E, H, D]`` Parameter with a gradient mask would still
compute the whole ``[E, H, D]`` gradient, keep optimizer state for every expert, and let
decoupled weight decay (AdamW) move the frozen rows. Instead ``esft_prepare`` copies the
chosen experts into their own Parameters (``[k, H, D]`` per layer, an ``ESFTAdapter``)
and installs an ``ExpertWeave`` that sends every token's choice of a chosen expert to its
copy (one index rewrite after routing). The fused base weights are frozen and get no
gradient; the optimizer sees only the copies; saving the adapter saves just them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from flexmoe.adapters.esft import ESFTAdapter, ESFTExperts, experts_of_layers
from flexmoe.adapters.lora import check_in_memory
from flexmoe.adapters.weave import ExpertWeave, weave_of

__all__ = ["esft_prepare"]


def esft_prepare(
    model: nn.Module,
    selection: Mapping[str, Sequence[int]],
    score: str | None = None,
    threshold: float | None = None,
) -> ESFTAdapter:
    """Freeze ``model`` but for trainable copies of the ``selection``'s experts; returns the copies.

    ``selection``: expert ids by experts path (``esft_select``'s result); layers it leaves
    out or gives no ids keep all their experts frozen. Every parameter of ``model`` gets
    ``requires_grad=False`` (router, attention, embeddings, experts); the forward then
    computes the chosen experts with the copies, for every token. Train
    ``adapter.parameters()``, then ``save_esft_adapter(adapter, directory)``;
    ``remove_weave(model)`` returns the model to its base forward (``merge_esft_adapter``
    writes the trained experts into it instead).
    """
    if weave_of(model) is not None:
        raise ValueError("model already has an ExpertWeave; remove_weave(model) before esft_prepare")
    layers = experts_of_layers(model)
    unknown = sorted(set(selection) - set(layers))
    if unknown:
        raise ValueError(f"selection: {unknown} are not experts paths of the model ({sorted(layers)})")
    chosen = {}
    for path, ids in selection.items():
        experts = layers[path][1]
        check_in_memory(path, experts, "esft_prepare")
        ids = sorted({int(e) for e in ids})
        if not ids:
            continue
        if ids[0] < 0 or ids[-1] >= experts.num_experts:
            raise ValueError(f"selection: {path} names experts {ids} outside [0, {experts.num_experts})")
        index = torch.tensor(ids, device=experts.w_in.device)

        b_in, b_out = (None if b is None else rows(b, index) for b in (experts.b_in, experts.b_out))
        chosen[path] = ESFTExperts(
            tuple(ids), rows(experts.w_in, index), rows(experts.w_out, index), b_in, b_out
        )
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = ESFTAdapter(chosen, score, threshold)
    weave = ExpertWeave(model)
    weave.add_esft(adapter, name="esft", share=True)
    weave.set_adapter_ids([0])  # every token of every call: adapter 0
    return adapter


def rows(weight: Tensor, index: Tensor) -> nn.Parameter:
    """A trainable copy of ``weight``'s rows ``index`` (the chosen experts)."""
    return nn.Parameter(weight.detach().index_select(0, index).clone())
