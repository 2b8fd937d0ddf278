"""The dispatcher strategy: how expert-major rows reach the experts and come back.

The layer calls ``dispatch`` then its experts then ``combine``; a distributed
dispatcher (exchanging rows between ranks) implements the same two calls, and the
single-device ``LocalDispatcher`` below is the reference every other one is tested
against.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from flexmoe.config import Plan
from flexmoe.dispatch.layout import DispatchLayout
from flexmoe.dispatch.permute import combine, permute

__all__ = ["Dispatcher", "LocalDispatcher"]


class Dispatcher(Protocol):
    """Moves rows between token order and the local experts' expert-major order."""

    def dispatch(self, x_TD: Tensor, layout: DispatchLayout, plan: Plan) -> tuple[Tensor, list[int], Any]:
        """Return ``(expert_input_ND, tokens_per_local_expert, metadata)``."""
        ...

    def combine(self, y_ND: Tensor, weights_TK: Tensor, layout: DispatchLayout, metadata: Any) -> Tensor:
        """Return the weighted token-order output ``[T, D]``."""
        ...


class LocalDispatcher:
    """Single device: every expert is local, dispatch is a gather, combine a weighted sum."""

    def dispatch(self, x_TD: Tensor, layout: DispatchLayout, plan: Plan) -> tuple[Tensor, list[int], Any]:  # noqa: D102
        return permute(x_TD, layout), layout.counts, None

    def combine(self, y_ND: Tensor, weights_TK: Tensor, layout: DispatchLayout, metadata: Any) -> Tensor:  # noqa: D102
        return combine(y_ND, weights_TK, layout)
