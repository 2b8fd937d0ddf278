"""Expert placements: which physical slot stores each logical expert (``E >= W``, whole experts).

A *placement* is a permutation ``slot_of_expert[e]``: logical expert ``e`` (the id the
router picks, the index in single-device tensors and checkpoints) is stored in physical
slot ``s``, on rank ``s // El`` at local index ``s % El``. The identity is the storage of
``flexmoe.placement.geometry``. Everything here is pure: every rank computes the same
answer from the same (global) inputs, without communicating.

Legend: W ranks, E experts, El = E/W experts per rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "SlotMap",
    "check_placement",
    "experts_by_rank",
    "identity_placement",
    "moved_experts",
    "rank_loads",
    "slot_loads",
]


def identity_placement(num_experts: int) -> list[int]:
    """The initial placement: expert ``e`` in slot ``e``."""
    return list(range(num_experts))


def check_placement(slot_of_expert: Sequence[int], num_experts: int, world_size: int) -> list[int]:
    """``slot_of_expert`` as a list of ints, or ``ValueError`` unless it is a permutation of ``range(E)``."""
    slots = [int(s) for s in slot_of_expert]
    if sorted(slots) != list(range(num_experts)):
        raise ValueError(
            f"a placement must be a permutation of range(num_experts={num_experts}) "
            f"(slot of each logical expert), got {slots}"
        )
    if num_experts % world_size != 0:
        raise ValueError(
            f"placements need whole experts on every rank: num_experts={num_experts} is not a multiple "
            f"of the world size {world_size}"
        )
    return slots


def experts_by_rank(slot_of_expert: Sequence[int], world_size: int) -> list[list[int]]:
    """``[rank][local index]``: the logical expert in each slot."""
    El = len(slot_of_expert) // world_size
    out = [[-1] * El for _ in range(world_size)]
    for e, s in enumerate(slot_of_expert):
        out[s // El][s % El] = e
    return out


def rank_loads(loads: Sequence[float], slot_of_expert: Sequence[int], world_size: int) -> list[float]:
    """Rows (or any per-expert load) each rank computes under a placement, without rerouting."""
    El = len(loads) // world_size
    out = [0.0] * world_size
    for e, s in enumerate(slot_of_expert):
        out[s // El] += float(loads[e])
    return out


def slot_loads(loads: Sequence[float], slot_of_expert: Sequence[int]) -> list[float]:
    """Per-expert ``loads`` in physical slot order (what the layer's exchange sees)."""
    out = [0.0] * len(loads)
    for e, slot in enumerate(slot_of_expert):
        out[slot] = float(loads[e])
    return out


def moved_experts(old: Sequence[int], new: Sequence[int], world_size: int) -> list[int]:
    """Logical experts whose rank differs between two placements."""
    El = len(old) // world_size
    return [e for e in range(len(old)) if old[e] // El != new[e] // El]


class SlotMap:
    """A layer's placement: the physical slot of each logical expert, and the index tensor for it.

    The identity until ``set`` changes it (``MoELayer.apply_placement``); mapping ids or
    counts through the identity costs nothing.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._slots: list[int] | None = None  # None: the identity
        self._index: Tensor | None = None  # the slots as a tensor, on the last device used

    @property
    def is_identity(self) -> bool:
        """Whether every expert is in its own slot."""
        return self._slots is None

    @property
    def slot_of_expert(self) -> list[int]:
        """``slot_of_expert[e]``: the slot of logical expert ``e``."""
        return identity_placement(self.num_experts) if self._slots is None else list(self._slots)

    def expert_of_slot(self) -> dict[int, int]:
        """The logical expert stored in each slot."""
        return {slot: e for e, slot in enumerate(self.slot_of_expert)}

    def set(self, slot_of_expert: list[int]) -> None:
        """Use the (already checked) placement ``slot_of_expert`` from now on."""
        self._slots = None if slot_of_expert == identity_placement(self.num_experts) else list(slot_of_expert)
        self._index = None

    def index(self, device: torch.device) -> Tensor:
        """``slot_of_expert`` as an int64 tensor on ``device`` (cached)."""
        index = self._index
        if index is None or index.device != device:
            index = torch.tensor(self.slot_of_expert, dtype=torch.int64, device=device)
            self._index = index
        return index

    def to_slots(self, expert_ids: Tensor) -> Tensor:
        """Logical expert ids -> physical slots."""
        return expert_ids if self._slots is None else self.index(expert_ids.device)[expert_ids]

    def to_logical(self, per_slot_E: Tensor) -> Tensor:
        """A per-slot tensor (first dim ``E``) -> the same per logical expert."""
        return (
            per_slot_E if self._slots is None else per_slot_E.index_select(0, self.index(per_slot_E.device))
        )
