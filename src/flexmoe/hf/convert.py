"""Convert the sparse-MoE blocks of a loaded ``transformers`` model in place, and back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from flexmoe.hf.block import FlexMoEBlock
from flexmoe.hf.families import REFUSED, SUPPORTED, UnsupportedMoEError
from flexmoe.hf.plan import BlockPlan, ConversionOptions, plan_block
from flexmoe.layer import name_moe_layers
from flexmoe.parallel.runtime import resolve_group

__all__ = ["Conversion", "convert", "find_moe_blocks", "is_moe_block", "revert"]


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` is a sparse-MoE block.

    That is a ``transformers`` class of ``SUPPORTED`` or ``REFUSED``, or any module with
    an ``experts`` module and a ``gate`` or ``router`` module (a block of a newer
    ``transformers`` or of remote code, which ``convert`` then refuses as not verified).
    """
    if isinstance(module, FlexMoEBlock):
        return False
    name = type(module).__name__
    if type(module).__module__.startswith("transformers.models.") and (name in SUPPORTED or name in REFUSED):
        return True
    has_router = isinstance(getattr(module, "gate", None), nn.Module) or isinstance(
        getattr(module, "router", None), nn.Module
    )
    return has_router and isinstance(getattr(module, "experts", None), nn.Module)


def find_moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, block)`` for every sparse-MoE block of ``model``, outermost first (not inside another)."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if is_moe_block(child):
                yield path, child
            else:
                yield from walk(child, path)

    if is_moe_block(model):
        yield "", model
    else:
        yield from walk(model, "")


@dataclass
class Conversion:
    """What ``convert`` did to a model; ``revert()`` undoes it.

    Attributes:
        model: the converted model (changed in place).
        blocks: ``path -> FlexMoEBlock`` for every converted block.
        refused: the blocks left as they were (``strict=False`` only), with the reasons.
    """

    model: nn.Module
    blocks: dict[str, FlexMoEBlock] = field(default_factory=dict)
    refused: list[UnsupportedMoEError] = field(default_factory=list)

    def revert(self) -> nn.Module:
        """Put the original blocks back (see ``flexmoe.hf.revert``) and return the model."""
        return revert(self.model)

    def summary(self) -> str:
        """One line per converted or refused block."""
        lines = [
            f"{path}: {block.original_class} -> MoELayer({block.moe.config.num_experts} experts, "
            f"top-{block.moe.config.top_k}, {block.moe.config.router.kind})"
            for path, block in self.blocks.items()
        ]
        lines += [f"{error.path}: refused, {error.reason}" for error in self.refused]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    *,
    group: object = False,
    backend: str = "auto",
    capacity_factor: float = 0.0,
    load_balance_weight: float = 0.0,
    aux_free_rate: float = 0.0,
    strict: bool = True,
) -> Conversion:
    """Replace every sparse-MoE block of a ``transformers`` model by a ``FlexMoEBlock``, in place.

    The new blocks compute the same function with the same Parameters (no copy on one
    device), so training updates the model's own weights and ``revert`` puts the
    original modules back. Every block is checked before anything changes: with
    ``strict=True`` (default) the first block that cannot be converted raises
    ``UnsupportedMoEError`` naming its class, path and the reason, and the model is left
    untouched; with ``strict=False`` such blocks stay as they are and are listed in
    ``Conversion.refused``.

    Args:
        model: a ``transformers`` model (any ``nn.Module`` holding MoE blocks).
        group: ``False`` (default): one device. A ``torch.distributed`` process group,
            or ``None`` for the default group: spread every block's experts over the
            ranks (expert parallelism); each rank keeps only its experts' weights and
            releases the original full expert tensors (``revert`` gathers them back).
            Every rank must convert the same model the same way. ``None`` outside
            ``torch.distributed`` (or with one rank) is the same as ``False``.
        backend: flexmoe's expert GEMM backend (``auto``, ``fused``, ``loop``, ``grouped_mm``).
        capacity_factor: ``0`` (default) is dropless, like ``transformers``; see ``MoELayer``.
        load_balance_weight: weight of flexmoe's balance loss in each ``block.moe.aux_loss``
            (default 0: ``transformers`` adds its own with ``output_router_logits``).
        aux_free_rate: auxiliary-loss-free balancing rate; needs a selection bias in the
            model (DeepSeek-V3's ``e_score_correction_bias``), which it then trains.
        strict: raise on the first block that does not convert (default), or skip it.

    Returns:
        A ``Conversion``: the converted blocks by path, the refused ones, and ``revert()``.
    """
    if group is not False and resolve_group(group) is None:
        group = False  # torch.distributed not initialised, or a one-rank group: share, don't copy
    options = ConversionOptions(
        backend=backend,
        capacity_factor=capacity_factor,
        load_balance_weight=load_balance_weight,
        aux_free_rate=aux_free_rate,
    )
    plans: list[BlockPlan] = []
    conversion = Conversion(model)
    for path, block in find_moe_blocks(model):
        if not path:
            raise ValueError("the model itself is a sparse-MoE block: convert a model that contains it")
        try:
            plans.append(plan_block(block, options, path))
        except UnsupportedMoEError as error:
            if strict:
                raise
            conversion.refused.append(error)
    if not plans and not conversion.refused:
        raise ValueError(f"{type(model).__name__} has no sparse-MoE block to convert")
    for plan in plans:
        new = FlexMoEBlock.build(plan, group)
        _replace(model, plan.path, new)
        conversion.blocks[plan.path] = new
    if group is not False:
        name_moe_layers(model)  # collective errors name the layer by its path
    return conversion


def revert(model: nn.Module) -> nn.Module:
    """Put back the original ``transformers`` blocks of every ``FlexMoEBlock`` in ``model``.

    The original modules return (the same objects), holding the current weights: any
    training done while converted is kept. Distributed conversions gather the experts
    back from every rank: call it on every rank. Returns ``model`` (or the original block
    when ``model`` itself is a ``FlexMoEBlock``).
    """
    if isinstance(model, FlexMoEBlock):
        return model.restore()
    found = [(path, module) for path, module in model.named_modules() if isinstance(module, FlexMoEBlock)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no converted block (FlexMoEBlock) to revert")
    for path, block in found:
        _replace(model, path, block.restore())
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
