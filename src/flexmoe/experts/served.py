"""One expert computed from its weights as a cache serves them: float, int8 or packed.

Legend: N rows, D model dim, F expert hidden dim, H first-projection width (2F gated,
else F).

An ``ExpertCache`` (``flexmoe.experts.cache``) hands out each expert's ``(w_in [H, D],
w_out [D, F])`` in the form its store reads them: plain float tensors, ``Int8Weight``
(``flexmoe.experts.int8``) or ``PackedWeight`` (``flexmoe.experts.packed``). These
functions compute with any of them, the same math as the grouped experts' reference loop.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.experts.activations import weighted_activation_into
from flexmoe.experts.int8 import Int8Weight, int8_linear
from flexmoe.experts.packed import PackedWeight, packed_linear
from flexmoe.experts.rows import (
    expert_bf16,
    expert_int8,
    rows_bf16,
    takes_bf16,
    takes_expert_bf16,
    takes_expert_int8,
)

__all__ = ["ServedWeight", "served_expert_ffn", "served_linear"]

ServedWeight = Tensor | Int8Weight | PackedWeight


def served_linear(x_NI: Tensor, weight: ServedWeight) -> Tensor:
    """``x @ w^T`` for a weight ``[O, I]`` as served: ``[N, I] -> [N, O]``, in ``x``'s dtype.

    A packed weight computes in its own dtype (which is the model's, hence ``x``'s); a
    plain bf16 weight times a few bf16 rows runs on the row kernels (``flexmoe.experts.rows``).
    """
    if isinstance(weight, Int8Weight):
        return int8_linear(x_NI, weight)
    if isinstance(weight, PackedWeight):
        return packed_linear(x_NI, weight)
    if takes_bf16(x_NI, weight):
        return rows_bf16(x_NI, weight)
    return F.linear(x_NI, weight.to(x_NI.dtype))


def served_expert_ffn(
    x_ND: Tensor,
    w_in: ServedWeight,
    w_out: ServedWeight,
    activation: str,
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """One expert on its rows: ``(act(x @ w_in^T) * row_weight) @ w_out^T``, ``[N, D] -> [N, D]``.

    ``w_in`` is ``[H, D]`` (``[gate; up]`` for gated activations), ``w_out`` ``[D, F]``.
    Decoding rows of plain bf16 or int8 weights run in one call of the row kernels
    (``expert_bf16``, ``expert_int8``).
    """
    if (
        isinstance(w_in, Tensor)
        and isinstance(w_out, Tensor)
        and takes_expert_bf16(x_ND, w_in, w_out, activation)
    ):
        return expert_bf16(x_ND, w_in, w_out, activation, row_weights_N)
    if (
        isinstance(w_in, Int8Weight)
        and isinstance(w_out, Int8Weight)
        and takes_expert_int8(x_ND, w_in.q, w_out.q, activation)
    ):
        return expert_int8(x_ND, w_in.q, w_in.scale, w_out.q, w_out.scale, activation, row_weights_N)
    h_NH = served_linear(x_ND, w_in)
    gated = activation in GATED_ACTIVATIONS
    hidden = h_NH.shape[1] // 2 if gated else h_NH.shape[1]
    # the row weights rounded to the activation's dtype, as the in-memory experts round them
    rw_N = None if row_weights_N is None else row_weights_N.to(h_NH.dtype)
    a_NF = weighted_activation_into(
        activation,
        h_NH[:, :hidden],
        h_NH[:, hidden:] if gated else None,
        rw_N,
        h_NH.new_empty(h_NH.shape[0], hidden),
    )
    return served_linear(a_NF, w_out)
