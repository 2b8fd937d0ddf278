"""What a plan sends: the expected bytes per rank of one training step (forward + backward).

Legend: W ranks, L ranks per node (``nodes = W/L``), E experts, S = W/E shards per
expert (1 if ``E >= W``), El = max(E/W, 1) stored experts (or shards) per rank,
r the plan's sharing degree, g = S/r ranks per gather group (``r = 0``: g = W),
T tokens per rank, K top-k, D model dim, b bytes per element, P parameters stored
per rank (``El * (H*D + D*F_local [+ H + D])``, H = 2F_local gated else F_local).

Rows (routing uniform over experts, nothing dropped, ``N = T*K`` rows per rank):
- ``r >= 1``: each row goes to the ``r`` ranks computing its expert (one per group);
  the expected number of those that are this rank is ``r/W``, so a rank sends
  ``N * r * (W - 1)/W`` rows per direction with the flat exchange. The 2DH exchange
  sends the fraction ``(L - 1)/L`` of them inside the node and then, aggregated,
  the fraction ``(nodes - 1)/nodes`` across nodes: ``N * r * ((L-1)/L + (nodes-1)/nodes)``.
  Forward: dispatch + return; backward: the same again (gradients of both).
- ``r = 0``: no rows.

Weights (Tutel's EP+DP / DP terms): gathering a group of ``g`` shards sends this
rank's ``P`` parameters to ``g - 1`` ranks in the forward pass, and their gradients
back in the backward pass: ``2 * (g - 1) * P * b``. No gather when ``g = 1``.

Tutel's Table 4 is the special case ``E >= W``: EP O(C), DP O(P), and for ``E < W``
O(C*r + P/(E*r)) per step — the trade-off ``r`` moves along.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.config import Plan
from flexmoe.placement import Placement

__all__ = ["PlanTraffic", "predict_traffic"]


@dataclass(frozen=True)
class PlanTraffic:
    """Expected bytes one rank sends in one training step under a plan."""

    row_bytes: float
    weight_bytes: float

    @property
    def total(self) -> float:
        """Rows plus weights."""
        return self.row_bytes + self.weight_bytes


def predict_traffic(
    placement: Placement,
    plan: Plan,
    tokens_per_rank: int,
    top_k: int,
    dim: int,
    params_per_rank: int,
    bytes_per_element: int,
    backward: bool = True,
) -> PlanTraffic:
    """The formulas of the module docstring, for a resolved ``plan`` (``r`` not ``None``)."""
    resolved = placement.resolve(plan)
    r = resolved.r
    assert r is not None
    W, L = placement.world_size, placement.ranks_per_node
    nodes = W // L
    passes = 2 if backward else 1
    rows = 0.0
    if r >= 1:
        fraction = (L - 1) / L + (nodes - 1) / nodes if resolved.exchange == "2dh" else (W - 1) / W
        # x2: the dispatch and the return exchange.
        rows = 2 * passes * tokens_per_rank * top_k * r * fraction * dim * bytes_per_element
    g = placement.group_size(r) if (r == 0 or placement.sharded) else 1
    weights = passes * (g - 1) * params_per_rank * bytes_per_element
    return PlanTraffic(row_bytes=rows, weight_bytes=float(weights))
