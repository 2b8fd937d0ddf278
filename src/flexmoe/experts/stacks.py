"""A stack of experts' tensors as the inference passes take them (``stacked_inference``).

Legend: G experts in the stack, H first-projection width (2F gated, else F), D model dim,
F expert hidden dim.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor

__all__ = ["ExpertTensors", "StackProducts"]


class StackProducts(Protocol):
    """Faster products with one stack's experts where they apply (``flexmoe.experts.packed``)."""

    def project_in(self, x_nD: Tensor, expert: int) -> Tensor | None:
        """``x @ w_in[expert]^T`` (``[n, H]``, no bias), or ``None``: these rows take the plain GEMM."""

    def project_out(self, a_nF: Tensor, expert: int) -> Tensor | None:
        """``a @ w_out[expert]^T`` (``[n, D]``, no bias), or ``None``: these rows take the plain GEMM."""


class ExpertTensors(NamedTuple):
    """A stack of experts' weights in the backends' layout: ``w_in [G, H, D]``, ``w_out [G, D, F]``.

    ``products``: faster products with these weights where they apply (the packed copies
    of ``GroupedExperts.prepare_for_inference``); ``None``: plain GEMMs.
    """

    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    products: StackProducts | None = None
