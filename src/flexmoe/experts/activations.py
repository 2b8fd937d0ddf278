"""Expert activations, and their out-of-place-free forms for the fused backend.

Legend: N rows, F expert hidden dim, H first-projection width (2F if gated, else F).
Gated activations read ``h`` as ``[gate | up]`` along the last dim (the ``transformers``
order); the fused backend applies the base activation to the gate half itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.experts.swiglu import swiglu_into, takes_swiglu

__all__ = [
    "activate",
    "activation_backward_into",
    "activation_into",
    "base_activation",
    "is_gated_silu",
    "weighted_activation_into",
]


def base_activation(activation: str) -> str:
    """The pointwise function of an activation: ``swiglu -> silu``, ``geglu -> gelu``."""
    return {"swiglu": "silu", "geglu": "gelu"}.get(activation, activation)


def is_gated_silu(activation: str) -> bool:
    """Whether ``activation`` is ``silu(gate) * up`` (SwiGLU)."""
    return activation in GATED_ACTIVATIONS and base_activation(activation) == "silu"


def activate(h_NH: Tensor, activation: str) -> Tensor:
    """``act(h)``, or ``act(gate) * up`` for gated activations."""
    if activation in GATED_ACTIVATIONS:
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return _pointwise(base_activation(activation), gate_NF) * up_NF
    return _pointwise(activation, h_NH)


def _pointwise(name: str, h: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    return F.silu(h)


def activation_into(name: str, h: Tensor, out: Tensor) -> Tensor:
    """``out = act(h)`` for a pointwise ``name`` (``relu``, ``gelu``, ``silu``), no allocation."""
    if name == "relu":
        return torch.clamp_min(h, 0, out=out)
    if name == "gelu":
        return torch.ops.aten.gelu.out(h, out=out)  # type: ignore[no-any-return]
    return torch.ops.aten.silu.out(h, out=out)  # type: ignore[no-any-return]


def weighted_activation_into(
    activation: str, gate_NF: Tensor, up_NF: Tensor | None, row_weights_N: Tensor | None, out_NF: Tensor
) -> Tensor:
    """``out = act(gate) * up`` (``up_NF=None``: ``act(gate)``), times the row weights; returns ``out``.

    SwiGLU runs in one pass where the CPU kernel takes the grids (``flexmoe.experts.swiglu``,
    rounded once), else as PyTorch's elementwise ops.
    """
    if up_NF is not None and is_gated_silu(activation) and takes_swiglu(gate_NF, up_NF, out_NF):
        return swiglu_into(gate_NF, up_NF, row_weights_N, out_NF, None if row_weights_N is None else "row")
    activation_into(base_activation(activation), gate_NF, out_NF)
    if up_NF is not None:
        out_NF.mul_(up_NF)
    if row_weights_N is not None:
        out_NF.mul_(row_weights_N[:, None])
    return out_NF


def activation_backward_into(name: str, grad: Tensor, h: Tensor, out: Tensor) -> Tensor:
    """``out = grad * act'(h)`` for a pointwise ``name``; ``out`` may alias ``grad``."""
    if name == "relu":
        return torch.mul(grad, h > 0, out=out)
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=out)  # type: ignore[no-any-return]
    return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)  # type: ignore[no-any-return]
