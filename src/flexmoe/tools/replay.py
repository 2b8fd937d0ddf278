"""Replaying recorded routing through a real layer: ``force_routing`` and ``expert_ids_from_counts``.

A layer forced to route a recorded step's counts computes that step exactly (the
routing weights stay the router's, differentiable), so a trace can be re-run and timed.

Legend: T tokens, K top-k, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from flexmoe.layer import MoELayer
from flexmoe.planner.trace import check_counts
from flexmoe.routing import Router, RouterOutput

__all__ = ["expert_ids_from_counts", "force_routing", "routing_from_counts"]


def _integers(values: Sequence[int] | Tensor | NDArray[Any], name: str) -> list[int]:
    """``values`` as a list of ints; ``ValueError`` naming ``name`` unless it is 1-D and integral."""
    array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values)
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.ndim != 1 or not integral:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got {values!r}")
    return [int(v) for v in array.tolist()]


def expert_ids_from_counts(
    counts: Sequence[int] | Tensor | NDArray[Any],
    top_k: int,
    num_tokens: int | None = None,
    *,
    num_experts: int | None = None,
    seed: int | None = 0,
) -> Tensor:
    """Expert ids ``[T, K]`` (int64, ``K`` distinct per row) with exactly ``counts[e]`` ids ``e``.

    ``T = num_tokens`` (default ``sum(counts) / top_k``). The counts must be one step's
    routing: ``num_experts`` (default ``len(counts)``) non-negative integers summing to
    ``T * K``, none over ``T``; otherwise ``ValueError`` names the argument.

    Construction: the expert-major list of the ``T*K`` slots (``counts[e]`` copies of
    ``e``) fills the ``[K, T]`` matrix row by row, so slot ``j`` goes to token ``j mod T``;
    one expert's slots are consecutive and at most ``T`` long, so no token gets an
    expert twice. ``seed`` (default 0) then shuffles the tokens and the order of each
    token's choices (which matters for capacity priority) reproducibly; ``None`` keeps
    the plain layout.
    """
    values = _integers(counts, "counts")
    if num_experts is not None and (not isinstance(num_experts, int) or num_experts < 1):
        raise ValueError(f"num_experts must be an int >= 1 or None, got {num_experts!r}")
    E = len(values) if num_experts is None else num_experts
    if not values:
        raise ValueError("counts must not be empty")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
    if num_tokens is not None and (
        isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0
    ):
        raise ValueError(f"num_tokens must be an int >= 0 or None, got {num_tokens!r}")
    T = check_counts(values, E, top_k, num_tokens, tokens_name="num_tokens")
    K = top_k
    # 1. expert-major slots, 2. slot j -> (choice j // T, token j % T).
    ids_N = torch.repeat_interleave(torch.arange(E), torch.tensor(values, dtype=torch.int64))
    ids_TK = ids_N.view(K, T).t()
    if seed is not None and T > 0:
        # 3. shuffle tokens, then each token's choice order.
        generator = torch.Generator().manual_seed(seed)
        ids_TK = ids_TK[torch.randperm(T, generator=generator)]
        order_TK = torch.rand(T, K, generator=generator).argsort(dim=1)
        ids_TK = ids_TK.gather(1, order_TK)
    return ids_TK.contiguous()


def routing_from_counts(
    counts: Sequence[int] | Tensor | NDArray[Any],
    top_k: int,
    experts_per_token: Sequence[int] | Tensor | NDArray[Any],
    *,
    num_experts: int | None = None,
    seed: int | None = 0,
) -> tuple[Tensor, Tensor]:
    """``(expert_ids_TK, valid_TK)`` routing ``experts_per_token[j]`` tokens to ``j`` experts each.

    A step of a per-token number of experts (top-p routing, zero-computation experts;
    ``MoEStats.experts_per_token`` or a trace record's): ``T = sum(experts_per_token)``
    tokens, ``valid_TK`` marks the slots in use, and exactly ``counts[e]`` used slots
    name expert ``e``. Each row holds distinct experts (the unused slots too, as a router
    gives). ``force_routing(layer, expert_ids_TK, valid_TK)`` replays it.

    Construction (Ryser's for bipartite degree sequences): tokens in order of decreasing
    demand each take the experts with the most assignments left (ties: lower id). It
    succeeds whenever the counts can be one step's routing; otherwise ``ValueError``.
    ``seed`` (default 0) then shuffles the tokens and each token's used choices
    reproducibly (the unused slots stay last, as under top-p routing); ``None`` keeps
    the plain layout.
    """
    values = _integers(counts, "counts")
    hist = _integers(experts_per_token, "experts_per_token")
    if not values:
        raise ValueError("counts must not be empty")
    E = len(values) if num_experts is None else num_experts
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
    T = check_counts(values, E, top_k, None, tokens_name="num_tokens", experts_per_token=hist)
    K = top_k
    demand_T = torch.arange(K, -1, -1).repeat_interleave(torch.tensor(hist[::-1], dtype=torch.int64))
    remaining_E = torch.tensor(values, dtype=torch.int64)
    ids_TK = torch.empty(T, K, dtype=torch.int64)
    valid_TK = torch.arange(K).expand(T, K) < demand_T[:, None]
    for t, m in enumerate(demand_T.tolist()):
        order_E = torch.argsort(-remaining_E, stable=True)  # the most left first; ties: lower id
        if m and int(remaining_E[order_E[m - 1]]) == 0:
            raise ValueError(
                "counts and experts_per_token cannot be one step's routing "
                f"(token {t} needs {m} distinct experts with assignments left)"
            )
        remaining_E[order_E[:m]] -= 1
        ids_TK[t] = order_E[:K]  # the unused slots: other experts, so the row stays distinct
    if seed is not None and T > 0:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(T, generator=generator)
        ids_TK, valid_TK = ids_TK[rows], valid_TK[rows]
        order_TK = (torch.rand(T, K, generator=generator) + 2.0 * ~valid_TK).argsort(dim=1)
        ids_TK, valid_TK = ids_TK.gather(1, order_TK), valid_TK.gather(1, order_TK)
    return ids_TK.contiguous(), valid_TK.contiguous()


def _check_expert_ids(expert_ids_TK: object, num_experts: int) -> Tensor:
    if not isinstance(expert_ids_TK, Tensor):
        raise TypeError(f"expert_ids_TK must be a torch.Tensor, got {type(expert_ids_TK).__name__}")
    if expert_ids_TK.dim() != 2 or expert_ids_TK.is_floating_point() or expert_ids_TK.is_complex():
        raise ValueError(
            f"expert_ids_TK must be a 2-D integer tensor [tokens, top_k], got shape "
            f"{tuple(expert_ids_TK.shape)}, dtype {expert_ids_TK.dtype}"
        )
    T, K = expert_ids_TK.shape
    if not 1 <= K <= num_experts:
        raise ValueError(f"expert_ids_TK must have 1 to num_experts={num_experts} columns, got {K}")
    ids = expert_ids_TK.to(torch.int64)
    if T and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert_ids_TK values must be in [0, num_experts={num_experts})")
    if T and K > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("expert_ids_TK: each row (token) must hold distinct experts")
    return ids


@contextmanager
def force_routing(layer: MoELayer, expert_ids_TK: Tensor, valid_TK: Tensor | None = None) -> Iterator[None]:
    """Make ``layer`` route its ``T`` tokens to ``expert_ids_TK [T, K]`` inside the ``with`` block.

    ``valid_TK`` (bool ``[T, K]``): the slots in use, as top-p routing gives them
    (``routing_from_counts``); the others are not routed. Every forward of the layer in
    the block must see ``T`` tokens and use ``top_k=K`` (else ``ValueError``). The
    router still runs: its logits and probabilities feed the auxiliary losses, and the
    weights are its scores of the forced experts (renormalised and scaled per its
    config), differentiable w.r.t. the router's parameters. Works through a forward
    hook on ``layer.router``: no parameter or state-dict key changes. On several
    ranks, each rank passes the ids of its own tokens.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a flexmoe.MoELayer, got {type(layer).__name__}")
    ids_TK = _check_expert_ids(expert_ids_TK, layer.config.num_experts)
    T, K = ids_TK.shape
    if valid_TK is not None and (
        not isinstance(valid_TK, Tensor) or valid_TK.dtype != torch.bool or valid_TK.shape != ids_TK.shape
    ):
        raise ValueError(
            f"valid_TK must be a bool tensor of the shape of expert_ids_TK {tuple(ids_TK.shape)}"
        )

    def hook(router: Router, args: tuple[Any, ...], kwargs: dict[str, Any], output: RouterOutput) -> Any:
        x_TD = args[0] if args else kwargs["x_TD"]
        top_k = args[1] if len(args) > 1 else kwargs["top_k"]
        if x_TD.shape[0] != T or top_k != K:
            raise ValueError(
                f"force_routing: the forced expert ids are for {T} tokens, top-{K}; the layer was "
                f"called with {x_TD.shape[0]} tokens, top-{top_k}"
            )
        logits_TE = output.logits_TE
        ids = ids_TK.to(logits_TE.device)
        valid = None if valid_TK is None else valid_TK.to(logits_TE.device)
        with torch.autocast(device_type=logits_TE.device.type, enabled=False):
            scores_TE, _ = router.scores(logits_TE)
            weights_TK = scores_TE.gather(1, ids)
            if valid is not None:
                weights_TK = weights_TK * valid
            cfg = router.config
            if cfg.normalize_weights and K > 1:
                normalized_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
                if valid is None:
                    weights_TK = normalized_TK
                else:  # a token with one expert keeps its raw score, as the router does
                    weights_TK = torch.where(valid.sum(dim=-1, keepdim=True) > 1, normalized_TK, weights_TK)
            if cfg.routed_scaling_factor != 1.0:
                weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(ids, weights_TK, logits_TE, output.probs_TE, valid)

    handle = layer.router.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
