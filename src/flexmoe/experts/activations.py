"""Expert activations and their hand-written derivatives (for the fused backward).

Legend: N rows, F expert hidden dim, H first-projection width (2F if gated, else F).
Gated activations read ``h_NH`` as ``[gate | up]`` (the ``transformers`` order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.config import GATED_ACTIVATIONS

__all__ = ["activate", "activate_backward", "activate_parts"]


def _base(activation: str) -> str:
    return {"swiglu": "silu", "geglu": "gelu"}.get(activation, activation)


def _apply(name: str, h: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    return F.silu(h)


def _apply_backward(name: str, grad: Tensor, h: Tensor) -> Tensor:
    if name == "relu":
        return grad * (h > 0).to(grad.dtype)
    op = torch.ops.aten.gelu_backward if name == "gelu" else torch.ops.aten.silu_backward
    result: Tensor = op(grad, h)
    return result


def activate(h_NH: Tensor, activation: str) -> Tensor:
    """``act(h)``, or ``act(gate) * up`` for gated activations."""
    return activate_parts(h_NH, activation)[0]


def activate_parts(h_NH: Tensor, activation: str) -> tuple[Tensor, Tensor | None]:
    """``(activation output, act(gate))``; the second is ``None`` when not gated.

    The backward of a gated unit needs ``act(gate)`` again; returning it lets the fused
    backward compute it once.
    """
    if activation in GATED_ACTIVATIONS:
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        act_gate_NF = _apply(_base(activation), gate_NF)
        return act_gate_NF * up_NF, act_gate_NF
    return _apply(activation, h_NH), None


def activate_backward(
    grad_NF: Tensor, h_NH: Tensor, activation: str, act_gate_NF: Tensor | None = None
) -> Tensor:
    """Gradient w.r.t. ``h_NH`` of ``activate(h_NH)``, given the gradient of its output.

    For gated activations pass ``act_gate_NF`` (from ``activate_parts``) to avoid
    recomputing it.
    """
    if activation in GATED_ACTIVATIONS:
        base = _base(activation)
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        if act_gate_NF is None:
            act_gate_NF = _apply(base, gate_NF)
        grad_NH = torch.empty_like(h_NH)
        grad_gate, grad_up = grad_NH.chunk(2, dim=-1)
        torch.mul(grad_NF, act_gate_NF, out=grad_up)
        grad_gate.copy_(_apply_backward(base, grad_NF * up_NF, gate_NF))
        return grad_NH
    return _apply_backward(activation, grad_NF, h_NH)
