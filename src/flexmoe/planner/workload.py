"""What the planner simulates: one MoE layer, and how its router spreads the load.

A ``Load`` is the share of routed assignments each expert receives (``share_E``,
summing to one), in expert-index order: expert ``e`` lives where the layer's
placement puts it (``flexmoe.placement``: rank ``e // (E/W)`` for whole
experts), so the order of the shares decides which ranks are hot. Every source rank
is assumed to route with the same shares (tokens are spread over ranks independently
of their routing), so a rank sends ``T*K*share_E[e]`` rows to expert ``e``.

Legend: E experts, T tokens per device, K top-k, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flexmoe.config import GATED_ACTIVATIONS, MoEConfig
from flexmoe.planner.cluster import DTYPE_BYTES

__all__ = ["Load", "MoEWorkload"]


@dataclass(frozen=True, kw_only=True)
class MoEWorkload:
    """One MoE layer's shapes and per-device batch.

    Attributes:
        dim: ``D``.
        hidden_dim: ``F`` per expert.
        num_experts: ``E``.
        top_k: ``K``.
        gated: SwiGLU/GeGLU experts (first projection ``2F`` wide) or plain ones.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (activations and expert weights).
        tokens_per_device: ``T``.
        capacity_factor: the layer's capacity policy (``> 0`` fixed, ``< 0`` adaptive
            with a cap, ``0`` dropless), for flexmoe's plans. Static baselines use
            their own fixed factor.
        training: forward and backward (``True``) or forward only.
        experts_per_token: the mean routed experts per token when it is not ``top_k``
            (top-p routing, zero-computation experts: some slots are not routed), a
            number in ``(0, top_k]``; the rows and the capacity ``ceil(cf * A / E)`` are
            then those of the ``A = T * experts_per_token`` routed assignments. ``None``:
            ``top_k``.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    gated: bool = True
    dtype: str = "bf16"
    tokens_per_device: int = 4096
    capacity_factor: float = 0.0
    training: bool = True
    experts_per_token: float | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "num_experts", "tokens_per_device"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        k = self.experts_per_token
        if k is not None and (
            isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= self.top_k
        ):
            raise ValueError(
                f"experts_per_token must be None or a number in (0, top_k={self.top_k}], got {k!r}"
            )
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if not math.isfinite(self.capacity_factor):
            raise ValueError(f"capacity_factor must be finite, got {self.capacity_factor!r}")

    @classmethod
    def from_config(
        cls, config: MoEConfig, tokens_per_device: int, dtype: str = "fp32", training: bool = True
    ) -> MoEWorkload:
        """The workload of a layer built from ``config`` (what the online tuner scores)."""
        return cls(
            dim=config.dim,
            hidden_dim=config.hidden_dim,
            num_experts=config.num_experts,
            top_k=min(config.top_k, config.num_experts),  # zero-computation experts take no rows
            gated=config.experts.activation in GATED_ACTIVATIONS,
            dtype=dtype,
            tokens_per_device=tokens_per_device,
            capacity_factor=config.capacity.capacity_factor,
            training=training,
        )

    @property
    def bytes_per_element(self) -> int:
        """Bytes of one activation or weight element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def first_width(self) -> int:
        """Width of the first projection: ``2F`` gated, else ``F``."""
        return 2 * self.hidden_dim if self.gated else self.hidden_dim

    @property
    def expert_params(self) -> int:
        """Weights of one whole expert (no biases): ``D*(H + F)``."""
        return self.dim * (self.first_width + self.hidden_dim)

    @property
    def routed_per_token(self) -> float:
        """Routed assignments per token: ``experts_per_token``, else ``top_k``."""
        return float(self.top_k) if self.experts_per_token is None else float(self.experts_per_token)

    def flops_per_row(self, hidden_dim: int | None = None) -> float:
        """Forward GEMM FLOPs of one routed row through an expert (or a hidden slice of it)."""
        F = self.hidden_dim if hidden_dim is None else hidden_dim
        H = 2 * F if self.gated else F
        return 2.0 * self.dim * (H + F)


def _normalise(share: NDArray[np.float64], name: str) -> NDArray[np.float64]:
    total = float(share.sum())
    if (
        share.ndim != 1
        or share.size == 0
        or not np.all(np.isfinite(share))
        or np.any(share < 0)
        or total <= 0
    ):
        raise ValueError(f"{name}: expert shares must be a non-empty vector of finite values >= 0, not all 0")
    return share / total


@dataclass(frozen=True)
class Load:
    """Share of the routed assignments per expert (``share_E``, sums to 1) and a label."""

    name: str
    share_E: NDArray[np.float64]

    @property
    def num_experts(self) -> int:
        """``E``."""
        return int(self.share_E.size)

    @property
    def max_over_mean(self) -> float:
        """The hottest expert's share over the even share ``1/E``."""
        return float(self.share_E.max()) * self.num_experts

    @classmethod
    def uniform(cls, num_experts: int) -> Load:
        """Every expert gets ``1/E``."""
        return cls("uniform", np.full(num_experts, 1.0 / num_experts))

    @classmethod
    def zipf(cls, num_experts: int, s: float, shuffle_seed: int | None = 0) -> Load:
        """Expert of popularity rank ``i`` (1-based) gets a share proportional to ``i**-s``.

        ``shuffle_seed`` scatters the popularity ranks over expert indices (so over
        ranks) with a fixed permutation; ``None`` puts the hottest experts first (on
        rank 0: the worst case for plain expert parallelism).
        """
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"zipf exponent s must be a finite number >= 0, got {s!r}")
        share = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
        return cls(f"zipf({s:g})", _place(share / share.sum(), shuffle_seed))

    @classmethod
    def hot_experts(cls, num_experts: int, share: float, count: int, shuffle_seed: int | None = None) -> Load:
        """``count`` hot experts share ``share`` of the load evenly; the others share the rest.

        By default the hot experts are experts ``0..count-1`` (on the first ranks, as
        in least-loaded EP's "30:4" cases); ``shuffle_seed`` scatters them.
        """
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share!r}")
        if not isinstance(count, int) or not 1 <= count <= num_experts:
            raise ValueError(f"count must be an int in [1, num_experts={num_experts}], got {count!r}")
        cold = num_experts - count
        if cold == 0:
            values = np.full(num_experts, 1.0 / num_experts)
        else:
            values = np.concatenate([np.full(count, share / count), np.full(cold, (1 - share) / cold)])
        return cls(f"hot({share:g} on {count})", _place(values, shuffle_seed))

    @classmethod
    def from_counts(cls, counts_E: Sequence[float] | NDArray[np.float64], name: str = "counts") -> Load:
        """Observed per-expert assignment counts (from ``layer.stats.routed_per_expert`` or a trace)."""
        share = _normalise(np.asarray(counts_E, dtype=np.float64), name)
        return cls(name, share)

    def rows_per_expert(self, workload: MoEWorkload, world_size: int) -> NDArray[np.float64]:
        """Expected routed rows per expert over the whole step: ``W*T*routed_per_token*share_E``."""
        if self.num_experts != workload.num_experts:
            raise ValueError(
                f"load {self.name!r} has {self.num_experts} experts, the workload {workload.num_experts}"
            )
        return self.share_E * (world_size * workload.tokens_per_device * workload.routed_per_token)


def _place(share: NDArray[np.float64], shuffle_seed: int | None) -> NDArray[np.float64]:
    if shuffle_seed is None:
        return share
    order = np.random.default_rng(shuffle_seed).permutation(share.size)
    return share[order]
