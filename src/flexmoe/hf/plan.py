"""Check that a ``transformers`` sparse-MoE block converts, and work out how: a ``BlockPlan``.

Legend: T tokens, D model dim, F expert hidden dim, H first-projection width (2F), E experts, K top-k.

``plan_block`` changes nothing: it reads the block's router semantics through its
``Family`` (``flexmoe.hf.families``), checks the expert layout, and returns the
flexmoe configuration and the tensors to share; ``FlexMoEBlock.build`` applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from flexmoe.config import BalanceConfig, CapacityConfig, ExpertConfig, MoEConfig, RouterConfig
from flexmoe.hf.families import (
    Family,
    UnsupportedMoEError,
    activation_of,
    expert_layout_problem,
    family_of,
    resolve,
)

__all__ = ["BlockPlan", "ConversionOptions", "plan_block"]


@dataclass(frozen=True, kw_only=True)
class ConversionOptions:
    """The flexmoe settings a conversion applies to every block (see ``flexmoe.hf.convert``)."""

    backend: str = "auto"
    capacity_factor: float = 0.0
    load_balance_weight: float = 0.0
    aux_free_rate: float = 0.0


@dataclass
class BlockPlan:
    """A checked conversion of one block: the flexmoe configuration and the tensors to share."""

    block: nn.Module
    path: str
    family: Family
    config: MoEConfig
    router_weight: nn.Parameter
    w_in: nn.Parameter
    w_out: nn.Parameter
    bias: Tensor | None
    extras: dict[str, nn.Module | None]


def plan_block(block: nn.Module, options: ConversionOptions, path: str = "") -> BlockPlan:
    """Check that ``block`` converts and work out how, without changing anything.

    Raises ``UnsupportedMoEError`` (the class and the reason) when it does not convert,
    ``ValueError`` when an option does not fit it.
    """
    name = type(block).__name__
    try:
        family = family_of(type(block))
    except UnsupportedMoEError as error:
        raise UnsupportedMoEError(name, error.reason, path) from None

    def refuse(reason: str) -> UnsupportedMoEError:
        return UnsupportedMoEError(name, reason, path)

    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise refuse("it has no experts module")
    problem = expert_layout_problem(block, experts)
    if problem is None and family.check is not None:
        problem = family.check(block)
    if problem is not None:
        raise refuse(problem)
    w_in_EHD: nn.Parameter = getattr(experts, "gate_up_proj")  # noqa: B009 (checked above)
    w_out_EDF: nn.Parameter = getattr(experts, "down_proj")  # noqa: B009
    E, H, D = w_in_EHD.shape
    router_weight = resolve(block, family.router_weight or f"{family.router}.weight")
    if not isinstance(router_weight, nn.Parameter) or tuple(router_weight.shape) != (E, D):
        shape = tuple(router_weight.shape) if isinstance(router_weight, Tensor) else router_weight
        raise refuse(f"its router weight is {shape!r}, expected a Parameter of shape {(E, D)}")
    router_config, bias = _router_config(block, family, options, refuse)
    top_k = int(resolve(block, family.top_k or f"{family.router}.top_k"))
    experts_config = ExpertConfig(
        activation=activation_of(experts),  # type: ignore[arg-type]
        backend=options.backend,  # type: ignore[arg-type]
    )
    balance = BalanceConfig(
        load_balance_weight=options.load_balance_weight, aux_free_rate=options.aux_free_rate
    )
    capacity = CapacityConfig(capacity_factor=options.capacity_factor)
    try:
        config = MoEConfig(
            dim=D,
            hidden_dim=H // 2,
            num_experts=E,
            top_k=top_k,
            router=router_config,
            capacity=capacity,
            experts=experts_config,
            balance=balance,
        )
    except ValueError as error:
        raise refuse(f"its configuration has no flexmoe equivalent ({error})") from error
    extras = {
        attribute.split(".")[-1]: _module_or_none(resolve(block, attribute))
        for attribute in (family.shared, family.shared_gate, family.post_norm)
        if attribute
    }
    return BlockPlan(block, path, family, config, router_weight, w_in_EHD, w_out_EDF, bias, extras)


def _module_or_none(value: object) -> nn.Module | None:
    return value if isinstance(value, nn.Module) else None


def _router_config(
    block: nn.Module, family: Family, options: ConversionOptions, refuse: Callable[[str], UnsupportedMoEError]
) -> tuple[RouterConfig, Tensor | None]:
    scores = family.scores(block) if callable(family.scores) else family.scores
    normalize = bool(resolve(block, family.normalize))
    scale = resolve(block, family.scale)
    scale = 1.0 if scale is None else float(scale)
    groups: tuple[int, int] | None
    if callable(family.groups):
        groups = family.groups(block)
    elif family.groups is not None:
        num_groups, topk_groups = (resolve(block, path) for path in family.groups)
        groups = None if num_groups is None else (int(num_groups), int(topk_groups or num_groups))
    else:
        groups = None
    bias = resolve(block, family.selection_bias) if family.selection_bias else None
    if bias is not None and not isinstance(bias, Tensor):
        raise refuse(f"its selection bias is a {type(bias).__name__}, not a tensor")
    if options.aux_free_rate > 0 and bias is None:
        raise ValueError(
            f"aux_free_rate={options.aux_free_rate} needs a selection bias (e_score_correction_bias) in the "
            f"model, and {type(block).__name__} has none"
        )
    num_groups, topk_groups = groups or (1, 1)
    try:
        config = RouterConfig(
            kind=scores,
            normalize_weights=normalize,
            normalize_single=normalize,  # one expert gets weight 1, as transformers gives it
            num_groups=num_groups,
            topk_groups=topk_groups,
            routed_scaling_factor=scale,
            selection_bias=bias is not None,
        )
    except ValueError as error:
        raise refuse(f"its router has no flexmoe equivalent ({error})") from error
    return config, bias
