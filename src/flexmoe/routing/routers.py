"""Routers: token -> (top-k expert ids, routing weights), with the scores the losses need.

Legend: T tokens, D model dim, E experts, K top-k, R cosine-router dim, G expert groups.

All router math runs in fp32 with autocast disabled, whatever the input dtype: the
top-k choice is discrete and bf16 logits flip it for nearly tied experts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.config import RouterConfig

__all__ = [
    "CosineRouter",
    "Router",
    "RouterChoice",
    "RouterOutput",
    "SigmoidRouter",
    "SoftmaxRouter",
    "build_router",
    "select_top_k",
    "top_p_mask",
]


@dataclass
class RouterOutput:
    """What a router returns for ``T`` tokens.

    Attributes:
        expert_ids_TK: chosen experts, int64, each row distinct.
        weights_TK: routing weights of the chosen experts, fp32, differentiable.
        logits_TE: raw router logits, fp32 (the z-loss uses them).
        probs_TE: a per-token distribution over experts, fp32 (the balance loss uses it).
        valid_TK: which of the ``K`` slots each token uses (top-p routing: a per-token
            number of experts, a prefix of its choices; their weights are zero); ``None``
            when every token uses all ``K``.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    valid_TK: Tensor | None = None

    def experts_per_token(self) -> Tensor:
        """How many experts each token uses (int64 ``[T]``)."""
        T, K = self.expert_ids_TK.shape
        if self.valid_TK is None:
            return self.expert_ids_TK.new_full((T,), K)
        return self.valid_TK.sum(dim=1)


@dataclass
class RouterChoice:
    """The experts a router picks for ``T`` tokens, before their weights (``Router.choose``).

    Attributes:
        expert_ids_TK: chosen experts, as in ``RouterOutput``.
        scores_TE: the affinities the weights are read from, fp32.
        logits_TE: raw router logits, fp32.
        probs_TE: a per-token distribution over experts, fp32.
        valid_TK: the top-p mask, as in ``RouterOutput``; ``None`` without top-p.
    """

    expert_ids_TK: Tensor
    scores_TE: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    valid_TK: Tensor | None = None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context with autocast off on ``device_type``: ``torch.autocast(enabled=False)`` where it is on.

    Entering that context costs more than a decode step's router math; where autocast is
    already off (outside ``torch.compile``, which traces the context as it is) nothing is entered.
    """
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def select_top_k(
    scores_TE: Tensor, top_k: int, num_groups: int = 1, topk_groups: int = 1, group_reduce: str = "max"
) -> Tensor:
    """Indices of the ``top_k`` best experts per token, optionally group-limited.

    With ``num_groups > 1`` the experts are split into ``G`` contiguous groups, each
    group is scored by ``group_reduce`` over its members (``"max"``, DeepSeek-V2; or
    ``"top2_sum"``, DeepSeek-V3), and only experts in the ``topk_groups`` best groups
    are eligible.
    """
    if num_groups > 1:
        T, E = scores_TE.shape
        grouped_TGM = scores_TE.view(T, num_groups, E // num_groups)
        if group_reduce == "top2_sum":
            group_scores_TG = grouped_TGM.topk(min(2, E // num_groups), dim=-1).values.sum(-1)
        else:
            group_scores_TG = grouped_TGM.amax(dim=-1)
        best_groups = group_scores_TG.topk(topk_groups, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups, True)
        eligible_TE = group_mask_TG.repeat_interleave(E // num_groups, dim=1)
        scores_TE = scores_TE.masked_fill(~eligible_TE, float("-inf"))
    return scores_TE.topk(top_k, dim=-1, sorted=True).indices


def top_p_mask(chosen_probs_TK: Tensor, top_p: float, min_k: int) -> Tensor:
    """Which choices each token keeps: the fewest (in choice order) whose probabilities reach ``top_p``.

    Choice ``k`` is kept when the probability mass of the choices before it is below
    ``top_p``; the first ``min_k`` are always kept.
    """
    before_TK = chosen_probs_TK.cumsum(dim=1) - chosen_probs_TK
    valid_TK = before_TK < top_p
    valid_TK[:, : min(min_k, valid_TK.shape[1])] = True
    return valid_TK


class Router(nn.Module):
    """Base class: the shared parts (fp32 logits, noise, selection bias, top-k, weights).

    Subclasses define ``logits`` and ``scores`` (the per-expert affinity from which the
    weights are read).
    """

    group_reduce = "max"
    expert_bias_E: Tensor

    def __init__(
        self, dim: int, num_experts: int, config: RouterConfig, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.config = config
        # The selection bias is state, not a parameter: it receives no gradient and is
        # changed only by the aux-loss-free update rule.
        self.register_buffer(
            "expert_bias_E",
            torch.zeros(num_experts, dtype=torch.float32, device=device) if config.selection_bias else None,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> Router:
        # The router's parameters and selection bias stay fp32 whatever dtype the model
        # is converted to: bf16 would round a bias step of 1e-3 away and perturb the
        # discrete top-k choice. Device moves apply as usual.
        super()._apply(fn, recurse)
        for tensor in [*self.parameters(recurse=False), *self.buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()
        return self

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits ``[T, E]`` in fp32."""
        raise NotImplementedError

    def scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """``(scores_TE, probs_TE)``: the affinities weights are read from, and a distribution."""
        probs_TE = logits_TE.softmax(dim=-1)
        return probs_TE, probs_TE

    def forward(self, x_TD: Tensor, top_k: int, top_p: float | None = None) -> RouterOutput:
        """Route ``x_TD`` to ``top_k`` experts per token (fewer under ``top_p``: see ``RouterConfig``)."""
        cfg = self.config
        with _autocast_off(x_TD.device.type):
            choice = self._choose(x_TD, top_k, top_p)
            weights_TK = choice.scores_TE.gather(1, choice.expert_ids_TK)
            valid_TK = choice.valid_TK
            if valid_TK is not None:
                weights_TK = weights_TK * valid_TK
            if cfg.normalize_weights and (top_k > 1 or cfg.normalize_single):
                normalized_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
                if valid_TK is None or cfg.normalize_single:
                    weights_TK = normalized_TK
                else:  # a token that kept one expert keeps its raw score, as top-1 does
                    several_T1 = valid_TK.sum(dim=-1, keepdim=True) > 1
                    weights_TK = torch.where(several_T1, normalized_TK, weights_TK)
            if cfg.routed_scaling_factor != 1.0:
                weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(choice.expert_ids_TK, weights_TK, choice.logits_TE, choice.probs_TE, valid_TK)

    def choose(self, x_TD: Tensor, top_k: int, top_p: float | None = None) -> RouterChoice:
        """The experts ``forward`` picks for ``x_TD``, without computing their weights.

        For callers that only need the choice (a prediction of which experts a later
        call will use); a plain method, so the module's hooks do not see it.
        """
        with _autocast_off(x_TD.device.type):
            return self._choose(x_TD, top_k, top_p)

    def _choose(self, x_TD: Tensor, top_k: int, top_p: float | None) -> RouterChoice:
        cfg = self.config
        x32_TD = x_TD.float()
        if self.training and cfg.input_jitter > 0:
            x32_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1 - cfg.input_jitter, 1 + cfg.input_jitter)
        logits_TE = self.logits(x32_TD)
        if self.training and cfg.noise_std > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * cfg.noise_std
        scores_TE, probs_TE = self.scores(logits_TE)
        choice_TE = scores_TE.detach()
        if self.expert_bias_E is not None:
            choice_TE = choice_TE + self.expert_bias_E
        expert_ids_TK = select_top_k(choice_TE, top_k, cfg.num_groups, cfg.topk_groups, self.group_reduce)
        valid_TK = None
        if top_p is not None and top_k > 1:
            valid_TK = top_p_mask(probs_TE.detach().gather(1, expert_ids_TK), top_p, cfg.min_k)
        return RouterChoice(expert_ids_TK, scores_TE, logits_TE, probs_TE, valid_TK)


class SoftmaxRouter(Router):
    """``softmax(x W^T)`` over experts, then top-k (Switch, GShard, Mixtral, Qwen-MoE)."""

    def __init__(
        self, dim: int, num_experts: int, config: RouterConfig, device: torch.device | None = None
    ) -> None:
        super().__init__(dim, num_experts, config, device)
        self.weight = nn.Parameter(torch.empty(num_experts, dim, device=device, dtype=torch.float32))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def logits(self, x_TD: Tensor) -> Tensor:  # noqa: D102
        return F.linear(x_TD, self.weight.float())


class SigmoidRouter(SoftmaxRouter):
    """Independent ``sigmoid(x W^T)`` scores per expert (DeepSeek-V3).

    Group scores are the sum of each group's two best scores, as in DeepSeek-V3.
    """

    group_reduce = "top2_sum"

    def scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        scores_TE = logits_TE.sigmoid()
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


class CosineRouter(Router):
    """Cosine similarity between a projected token and learned expert embeddings (X-MoE).

    ``logits = cos(P x, e_i) / tau`` with a learned temperature ``tau`` clamped below at
    0.01, so that logits stay bounded whatever the norm of ``x``.
    """

    def __init__(
        self, dim: int, num_experts: int, config: RouterConfig, device: torch.device | None = None
    ) -> None:
        super().__init__(dim, num_experts, config, device)
        self.proj = nn.Parameter(torch.empty(config.cosine_dim, dim, device=device, dtype=torch.float32))
        self.expert_embeddings = nn.Parameter(
            torch.empty(num_experts, config.cosine_dim, device=device, dtype=torch.float32)
        )
        self.log_temperature = nn.Parameter(
            torch.full((), math.log(config.cosine_init_temperature), device=device, dtype=torch.float32)
        )
        nn.init.normal_(self.proj, std=dim**-0.5)
        nn.init.orthogonal_(self.expert_embeddings)

    def logits(self, x_TD: Tensor) -> Tensor:  # noqa: D102
        h_TR = F.normalize(F.linear(x_TD, self.proj.float()), dim=-1)
        e_ER = F.normalize(self.expert_embeddings.float(), dim=-1)
        temperature = self.log_temperature.float().exp().clamp_min(0.01)
        return F.linear(h_TR, e_ER) / temperature


def build_router(
    dim: int, num_experts: int, config: RouterConfig, device: torch.device | None = None
) -> Router:
    """The router module that ``config.kind`` names."""
    kinds: dict[str, type[Router]] = {
        "softmax": SoftmaxRouter,
        "sigmoid": SigmoidRouter,
        "cosine": CosineRouter,
    }
    return kinds[config.kind](dim, num_experts, config, device)
