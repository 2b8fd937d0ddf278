"""Load-balancing terms: the Switch/GShard loss, the router z-loss, and the aux-loss-free bias rule.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aux_free_bias_update", "load_balance_loss", "router_z_loss"]


def load_balance_loss(
    probs_TE: Tensor, expert_ids_TK: Tensor, fraction_E: Tensor | None = None, valid_TK: Tensor | None = None
) -> Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the ``T*K`` routed assignments that chose expert ``i``
    (before any capacity drop), ``P_i`` the mean of ``probs_TE[:, i]``. It is 1.0 when
    both are uniform, for any ``K``. (``transformers``' Mixtral loss sums over the k
    choices instead, so its value is ``K`` times this one.) Gradients flow through
    ``P`` only; ``f`` is a count. A distributed layer passes ``fraction_E`` of the
    global batch, so that the mean of the ranks' losses is the global-batch loss. With
    ``valid_TK`` (top-p routing) ``f`` counts the routed assignments only.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    if fraction_E is None:
        ids = expert_ids_TK.reshape(-1)
        ones = torch.ones_like(ids) if valid_TK is None else valid_TK.reshape(-1).to(ids.dtype)
        counts_E = ids.new_zeros(E).scatter_add_(0, ids, ones).to(probs_TE.dtype)
        fraction_E = counts_E / counts_E.sum().clamp_min(1)
    fraction_E = fraction_E.to(device=probs_TE.device, dtype=probs_TE.dtype)
    return E * torch.dot(fraction_E, probs_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t (log sum_i exp(logits_ti))^2``: keeps logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def aux_free_bias_update(bias_E: Tensor, counts_E: Tensor, rate: float) -> Tensor:
    """One step of auxiliary-loss-free balancing (DeepSeek-V3): ``b + rate * sign(mean(c) - c)``.

    Under-loaded experts (count below the mean) get a larger selection bias, overloaded
    ones a smaller one, each by exactly ``rate``; an expert exactly at the mean is left
    alone. Pure: returns the new bias.
    """
    counts_E = counts_E.to(torch.float64)
    return bias_E + rate * torch.sign(counts_E.mean() - counts_E).to(bias_E.dtype)
