"""The experts' gated SiLU in one pass on CPU: ``swiglu.c`` of the kernel library.

PyTorch runs ``silu(gate) * up * w`` as three elementwise ops, each reading and writing
the whole ``[rows, cols]`` grid (and rounding bf16 in between), and its backward as
about eight. These calls compute each in one pass, in fp32, rounding once:

- ``swiglu_into(gate, up, weights, out, per=...)``: ``out = silu(gate) * up * w``, with
  ``w`` one weight per row (``per="row"``), per column (``"column"``) or none;
- ``swiglu_backward_into(gate, up, grad, ...)``: from the gradient of the weighted
  activation, the gate's and up's gradients, and optionally the weighted activation
  and the weights' gradient (fp32).

``takes_swiglu`` says where they run: CPU tensors in fp32 or bf16 alike, each a grid of
contiguous rows, with the kernel library available (``flexmoe.experts.kernels``).
Nothing here records autograd: the fused backend calls them inside its own backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexmoe.experts.kernels import library

__all__ = ["swiglu_backward_into", "swiglu_into", "takes_swiglu"]

_PER = {None: 0, "row": 1, "column": 2}


def takes_swiglu(*grids: Tensor) -> bool:
    """Whether the kernels take these ``[rows, cols]`` grids (gate, up, gradient, outputs)."""
    first = grids[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16) or library() is None:
        return False
    return all(
        t.device == first.device
        and t.dtype == first.dtype
        and t.dim() == 2
        and t.shape == first.shape
        and t.stride(1) == 1
        and t.stride(0) >= t.shape[1]
        for t in grids
    )


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weights(weights: Tensor | None, length: int, name: str) -> Tensor | None:
    if weights is None:
        return None
    if weights.dim() != 1 or weights.shape[0] != length:
        raise ValueError(f"{name}: expected {length} weights, got shape {tuple(weights.shape)}")
    return weights.detach().float().contiguous()


def _check(gate: Tensor, up: Tensor, *outputs: Tensor | None) -> None:
    grids = [gate, up, *(t for t in outputs if t is not None)]
    if not takes_swiglu(*grids):
        raise ValueError(
            "swiglu: expected CPU fp32 or bf16 grids of one shape and dtype with contiguous rows, got "
            + ", ".join(f"{tuple(t.shape)} {t.dtype} stride {t.stride()}" for t in grids)
        )
    if gate.stride(0) != up.stride(0):
        raise ValueError(
            f"swiglu: gate and up rows must be equally far apart, got {gate.stride(0)} and {up.stride(0)}"
        )


def swiglu_into(
    gate: Tensor, up: Tensor, weights: Tensor | None, out: Tensor, per: str | None = None
) -> Tensor:
    """``out = silu(gate) * up * w``, ``w`` the ``weights`` per ``"row"`` or ``"column"``; returns ``out``."""
    if per not in _PER or (weights is None) != (per is None):
        raise ValueError(f"per: expected 'row' or 'column' with weights, None without, got {per!r}")
    _check(gate, up, out)
    rows, cols = gate.shape
    w = _weights(weights, rows if per == "row" else cols, "weights")
    if out.numel() == 0:
        return out
    kernels = library()
    assert kernels is not None
    status = kernels.flexmoe_swiglu_forward(
        int(gate.dtype == torch.bfloat16), gate.data_ptr(), up.data_ptr(), gate.stride(0), rows, cols,
        _pointer(w), _PER[per], out.data_ptr(), out.stride(0),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"flexmoe_swiglu_forward failed ({status})")
    return out


def swiglu_backward_into(
    gate: Tensor,
    up: Tensor,
    grad: Tensor,
    weights: Tensor | None,
    grad_gate: Tensor,
    grad_up: Tensor,
    weighted: Tensor | None = None,
    grad_weights: Tensor | None = None,
    per: str | None = None,
) -> None:
    """The gradients of ``a = silu(gate) * up * w`` from ``grad``, the gradient of ``a``.

    ``w``: ``weights`` per ``"row"`` or ``"column"`` (``per``), or none. Writes
    ``grad_gate`` and ``grad_up`` (rows as far apart as each other); where given,
    ``weighted`` gets ``a`` itself and ``grad_weights`` (fp32, one per weight) the
    weights' gradient: ``grad * silu(gate) * up`` summed over each weight's row or column.
    """
    if per not in _PER or (weights is None) != (per is None):
        raise ValueError(f"per: expected 'row' or 'column' with weights, None without, got {per!r}")
    if grad_weights is not None and weights is None:
        raise ValueError("grad_weights: there are no weights to take a gradient of")
    _check(gate, up, grad, grad_gate, grad_up, weighted)
    rows, cols = gate.shape
    length = rows if per == "row" else cols
    if grad_gate.stride(0) != grad_up.stride(0):
        raise ValueError("swiglu: grad_gate and grad_up rows must be equally far apart")
    if grad_weights is not None and (
        grad_weights.dtype != torch.float32
        or grad_weights.shape != (length,)
        or not grad_weights.is_contiguous()
    ):
        raise ValueError(
            f"grad_weights: expected a contiguous fp32 [{length}], "
            f"got {grad_weights.dtype} {tuple(grad_weights.shape)}"
        )
    w = _weights(weights, length, "weights")
    if grad_weights is not None:
        grad_weights.zero_()  # a grid without rows sums to zero (the kernel adds nothing to it then)
    if gate.numel() == 0:
        return
    kernels = library()
    assert kernels is not None
    status = kernels.flexmoe_swiglu_backward(
        int(gate.dtype == torch.bfloat16), gate.data_ptr(), up.data_ptr(), gate.stride(0), grad.data_ptr(),
        grad.stride(0), rows, cols, _pointer(w), _PER[per], _pointer(weighted),
        0 if weighted is None else weighted.stride(0), _pointer(grad_weights), grad_gate.data_ptr(),
        grad_up.data_ptr(), grad_gate.stride(0),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"flexmoe_swiglu_backward failed ({status})")
