"""The dispatcher strategy: how expert-major rows reach the experts and come back.

The layer calls ``dispatch``, then its experts, then ``combine``. A distributed
dispatcher (exchanging rows between ranks) implements the same two calls; the
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

    def dispatch(
        self, x_TD: Tensor, weights_TK: Tensor, layout: DispatchLayout, plan: Plan
    ) -> tuple[Tensor, Tensor, list[int], Any]:
        """Return ``(expert_input_ND, row_weights_N, tokens_per_local_expert, metadata)``."""
        ...

    def combine(self, y_ND: Tensor, layout: DispatchLayout, metadata: Any) -> Tensor:
        """Return the token-order sum ``[T, D]`` of the (already weighted) expert rows."""
        ...


class LocalDispatcher:
    """Single device: every expert is local, dispatch is a gather, combine a per-token sum."""

    def dispatch(  # noqa: D102
        self, x_TD: Tensor, weights_TK: Tensor, layout: DispatchLayout, plan: Plan
    ) -> tuple[Tensor, Tensor, list[int], Any]:
        row_weights_N = weights_TK.reshape(-1).index_select(0, layout.slot_ids_N)
        return permute(x_TD, layout), row_weights_N, layout.counts, None

    def combine(self, y_ND: Tensor, layout: DispatchLayout, metadata: Any) -> Tensor:  # noqa: D102
        return combine(y_ND, layout)
