"""Permute token rows into expert-major order and combine expert outputs back.

Legend: T tokens, D model dim, K top-k, S routed slots (T*K), N kept slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexmoe.dispatch.layout import DispatchLayout

__all__ = ["combine", "permute"]


def permute(x_TD: Tensor, layout: DispatchLayout) -> Tensor:
    """Gather the rows of the kept slots, expert-major: ``x_ND[n] = x_TD[token_ids_N[n]]``."""
    return x_TD.index_select(0, layout.token_ids_N)


def combine(y_ND: Tensor, weights_TK: Tensor, layout: DispatchLayout) -> Tensor:
    """Weighted sum of each token's expert outputs: ``out[t] = sum_k w[t,k] * y[slot(t,k)]``.

    The kept rows are scattered to their slot positions (dropped slots stay zero) and
    reduced over ``k`` with one batched matmul: deterministic on every device, no atomics,
    and the reduction accumulates in fp32 inside the matmul for bf16/fp16 inputs.
    """
    T, K = layout.num_tokens, layout.top_k
    D = y_ND.shape[-1]
    if len(layout.slot_ids_N) == T * K:
        # Dropless: a permutation, so an index_select by the inverse is a gather.
        inverse_S = torch.empty_like(layout.slot_ids_N)
        inverse_S[layout.slot_ids_N] = torch.arange(T * K, device=y_ND.device)
        y_SD = y_ND.index_select(0, inverse_S)
    else:
        y_SD = y_ND.new_zeros(T * K, D).index_copy(0, layout.slot_ids_N, y_ND)
    weights_T1K = weights_TK.to(y_ND.dtype).unsqueeze(1)
    return torch.bmm(weights_T1K, y_SD.view(T, K, D)).squeeze(1)
