"""Low-precision copies of fp32 expert weights under autocast, kept while the weights are unchanged.

Under ``torch.autocast`` the expert GEMMs run on bf16 (or fp16) copies of the fp32
parameters. Training changes the weights every step, so each step casts them again;
but decoding under autocast would cast every expert's weights for every token, which
for a decode step costs more than the GEMMs themselves (they read each weight once).
``CastCache`` keeps the copies made without gradients and reuses them until the
parameter changes in place (its version counter moves), is replaced, or moves.

With gradients, each step's copies and the gradients cast back to fp32 are as large
as the expert weights; they come from the workspace pool and return to it once freed,
so the next step reuses their memory instead of faulting in fresh pages (on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flexmoe.workspace import WORKSPACE

__all__ = ["CastCache", "pooled_cast"]


@dataclass
class _Copy:
    source: Tensor  # the parameter it was cast from (held to compare identity)
    pointer: int
    version: int
    tensor: Tensor


class _PooledCast(torch.autograd.Function):
    """``weight.to(dtype)`` and its gradient cast back, both into pooled buffers."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.source_dtype = weight.dtype
        copy = WORKSPACE.take_until_released(tuple(weight.shape), dtype, weight.device)
        return copy.copy_(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad_source = WORKSPACE.take_until_released(tuple(grad.shape), ctx.source_dtype, grad.device)
        return grad_source.copy_(grad), None


def pooled_cast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight.to(dtype)`` (differentiable), the copy and its gradient in pooled memory."""
    cast: Tensor = _PooledCast.apply(weight, dtype)
    return cast


class CastCache:
    """Casts of parameters to a compute dtype, reused while grad mode is off and they are unchanged.

    With grad mode on, ``cast`` is a differentiable ``.to(dtype)`` (``pooled_cast``) and
    keeps nothing: the copy is needed by the backward anyway, and the optimizer changes
    the weights before the next step.
    """

    def __init__(self) -> None:
        self._copies: dict[tuple[str, torch.dtype], _Copy] = {}

    def cast(self, name: str, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``weight.to(dtype)``, from the cache when grad mode is off and ``weight`` is unchanged."""
        if weight.dtype == dtype:
            return weight
        key = (name, dtype)
        if torch.compiler.is_compiling():  # a compiled graph keeps its own casts
            return weight.to(dtype)
        if weight.is_inference():  # inference tensors have no version
            self._copies.pop(key, None)
            return weight.to(dtype)
        if torch.is_grad_enabled():
            self._copies.pop(key, None)
            return pooled_cast(weight, dtype)
        entry = self._copies.get(key)
        pointer, version = weight.data_ptr(), weight._version
        if (
            entry is not None
            and entry.source is weight
            and (entry.pointer, entry.version) == (pointer, version)
        ):
            return entry.tensor
        with torch.inference_mode(False):  # a normal tensor: usable in any later no-grad call
            copy = weight.detach().to(dtype)
        self._copies[key] = _Copy(weight, pointer, version, copy)
        return copy

    def cached(self) -> dict[tuple[str, torch.dtype], Tensor]:
        """The copies kept now, by ``(name, dtype)``."""
        return {key: copy.tensor for key, copy in self._copies.items()}

    def clear(self) -> None:
        """Drop every copy (frees their memory)."""
        self._copies.clear()

    @property
    def nbytes(self) -> int:
        """Bytes the cached copies hold."""
        return sum(c.tensor.numel() * c.tensor.element_size() for c in self._copies.values())
