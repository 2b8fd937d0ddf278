"""Run the MoE blocks of ``transformers`` models on flexmoe, with the same weights.

    import flexmoe.hf

    conversion = flexmoe.hf.convert(model)  # in place; every sparse-MoE block -> FlexMoEBlock
    ...                                       # train, evaluate, generate
    flexmoe.hf.revert(model)                 # the original blocks, with the current weights

``SUPPORTED`` and ``REFUSED`` (in ``flexmoe.hf.families``) list every block class of the
installed ``transformers`` (``discover_moe_blocks()`` finds them) with how it maps onto
a ``MoELayer`` or why it does not. ``register_experts_implementation()`` adds a
``"flexmoe"`` experts implementation to ``transformers``' registry for the blocks that
keep their own routing. ``load_offloaded(path, expert_budget="8GiB")`` builds a model whose
experts stay on disk, read into a budgeted cache (``offload_stats(model)`` reports it);
``quantize_experts(src, dst)`` writes a copy with int8 experts that it reads as well.

Needs ``transformers>=5`` (``pip install 'flexmoe[hf]'``), imported only when used.
"""

from flexmoe.hf.block import FlexMoEBlock
from flexmoe.hf.convert import Conversion, convert, find_moe_blocks, is_moe_block, revert
from flexmoe.hf.discover import MoEBlockClass, discover_moe_blocks
from flexmoe.hf.experts_impl import (
    EXPERTS_IMPLEMENTATION,
    flexmoe_experts_forward,
    register_experts_implementation,
)
from flexmoe.hf.families import REFUSED, SUPPORTED, Family, UnsupportedMoEError, family_of
from flexmoe.hf.offload import load_offloaded, offload_stats, parse_bytes, quantize_linear_layers
from flexmoe.hf.quantize import QuantizedCopy, quantize_experts
from flexmoe.hf.routing import LayerRouting, RoutingOverride, routing_settings, set_routing

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "REFUSED",
    "SUPPORTED",
    "Conversion",
    "Family",
    "FlexMoEBlock",
    "LayerRouting",
    "MoEBlockClass",
    "QuantizedCopy",
    "RoutingOverride",
    "UnsupportedMoEError",
    "convert",
    "discover_moe_blocks",
    "family_of",
    "find_moe_blocks",
    "flexmoe_experts_forward",
    "is_moe_block",
    "load_offloaded",
    "offload_stats",
    "parse_bytes",
    "quantize_experts",
    "quantize_linear_layers",
    "register_experts_implementation",
    "revert",
    "routing_settings",
    "set_routing",
]
