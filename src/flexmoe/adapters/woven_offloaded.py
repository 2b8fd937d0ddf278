"""The base-weight part of a multi-adapter batch whose base experts come from an ``ExpertCache``.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E base experts.

``woven_ffn`` (``flexmoe.adapters.woven``) computes the base and LoRA rows of a
multi-adapter batch as grouped GEMMs over the base experts' stacked weights. An
offloaded layer (``flexmoe.layer.offloaded``) has no such stack: its experts arrive
one at a time from the budgeted cache, each pinned only while it is used. So here each
base expert computes both projections of its rows as soon as its weights arrive, and
the LoRA terms, whose factors are in memory, run over all rows at once: the ``w_in``
terms before the experts (added to each expert's pre-activation), the ``w_out`` terms
after them (on the routing-weighted activations, as ``woven_ffn`` adds them). The
result is ``woven_ffn``'s, row for row.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from flexmoe.adapters.woven import Groups, LoRAPart
from flexmoe.experts.activations import activate
from flexmoe.experts.cache import ExpertWeights
from flexmoe.experts.served import served_linear

__all__ = ["served_woven_ffn"]


def served_woven_ffn(
    x_ND: Tensor,
    groups: Groups,
    served: Iterable[tuple[int, ExpertWeights]],
    activation: str,
    row_weights_N: Tensor,
    parts: list[LoRAPart],
    backend: str = "auto",
) -> Tensor:
    """``w * FFN_j(x)`` per row with its base expert ``j`` plus its slot's LoRA terms; weights as served.

    ``groups``: rows per base expert (``E`` groups, base and LoRA rows of an expert
    consecutive); ``served``: ``(expert, (w_in [H, D], w_out [D, F]))`` once for every
    expert with rows, in any order (float in ``x``'s dtype, ``Int8Weight`` or ``PackedWeight``); ``parts``:
    the LoRA stacks' shares of the call, as for ``woven_ffn``. ``backend``: ``"loop"``
    runs the LoRA GEMMs one slot at a time, anything else with ``torch._grouped_mm``
    where it runs (``woven_ffn``'s rule).
    """
    lora_backend = "loop" if backend == "loop" else "grouped_mm"
    ends = np.cumsum(groups.counts_G)
    starts = ends - groups.counts_G
    # 1. the LoRA terms of w_in, every row at once (the factors are in memory)
    delta_NH: Tensor | None = None
    for part in parts:
        if part.target == "w_in":
            if delta_NH is None:
                delta_NH = x_ND.new_zeros(x_ND.shape[0], part.B.shape[1])
            part.add_to(x_ND, delta_NH[None], lora_backend)
    # 2. each base expert's rows as soon as its weights are here
    keep_activations = any(part.target == "w_out" for part in parts)
    outputs: dict[int, Tensor] = {}
    activations: dict[int, Tensor] = {}
    for j, (w_in, w_out) in served:
        rows = slice(int(starts[j]), int(ends[j]))
        h_nH = served_linear(x_ND[rows], w_in)
        if delta_NH is not None:
            h_nH = h_nH + delta_NH[rows]
        a_nF = activate(h_nH, activation) * row_weights_N[rows, None]
        outputs[j] = served_linear(a_nF, w_out)
        if keep_activations:
            activations[j] = a_nF
    order = np.flatnonzero(groups.counts_G).tolist()
    if sorted(outputs) != order:
        raise ValueError(f"served: expected the experts {order} once each, got {sorted(outputs)}")
    if not order:
        return x_ND.new_zeros(x_ND.shape)
    y_ND = torch.cat([outputs[j] for j in order])
    # 3. the LoRA terms of w_out, on every row's routing-weighted activation
    if keep_activations:
        a_NF = torch.cat([activations[j] for j in order])
        for part in parts:
            if part.target == "w_out":
                part.add_to(a_NF, y_ND[None], lora_backend)
    return y_ND
