"""The experts-per-token controller's update rule: integral control of top-p's ``p``.

A pure function, like the aux-loss-free bias rule next to it; ``flexmoe.layer``'s
``ExpertsPerTokenController`` applies it to real layers between steps.
"""

from __future__ import annotations

import math

__all__ = ["top_p_update"]


def top_p_update(
    p: float, measured_k: float, target_k: float, rate: float, p_min: float, p_max: float
) -> float:
    """One controller step: ``p + rate * (target_k - measured_k)``, clamped to ``[p_min, p_max]``.

    Top-p routing's mean experts per token grows with ``p`` (a token takes the fewest of
    its best experts whose probabilities reach ``p``), so raising ``p`` when the
    measured mean is below the target and lowering it when above is an integral
    controller on the error: at a fixed point the measured mean equals the target, or
    ``p`` rests at a bound that cannot reach it. Pure: returns the new ``p``.
    """
    for name, value in (("measured_k", measured_k), ("target_k", target_k), ("rate", rate)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not 0 < p_min <= p_max <= 1:
        raise ValueError(f"p_min and p_max must satisfy 0 < p_min <= p_max <= 1, got {p_min!r} and {p_max!r}")
    return min(p_max, max(p_min, p + rate * (target_k - measured_k)))
