"""``ExpertsPerTokenController``: hold the mean routed experts per token of top-p layers at a target.

Between optimizer steps, each layer's ``p`` moves by the integral rule of
``flexmoe.routing.top_p_update``::

    p_l <- clamp(p_l + rate * (target_l - k_l), p_min, p_max)

where ``k_l`` is layer ``l``'s measured mean routed experts per token over the training
forward calls since the previous update (its ``MoEStats.experts_per_token``: zero-
computation experts count as no expert). Like the aux-loss-free bias, the controller
changes no weights and needs no gradient; its state (each layer's ``p``) is a
``state_dict`` to keep with the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from flexmoe.layer.moe_layer import MoELayer
from flexmoe.routing import top_p_update

__all__ = ["ExpertsPerTokenController"]


class ExpertsPerTokenController:
    """Adjust each top-p layer's ``p`` so its mean routed experts per token tends to ``target``.

    Example:
        >>> layer = MoELayer(64, 128, 8, top_k=4, router=RouterConfig(top_p=0.9))
        >>> controller = ExpertsPerTokenController(layer, target=1.5, rate=0.05)
        >>> y = layer(torch.randn(32, 64))   # counted: a training-mode forward
        >>> controller.step()                # or controller.attach(optimizer)

    Args:
        modules: a model (its ``MoELayer`` s) or the layers themselves; every one must
            route with top-p (``RouterConfig(top_p=...)`` or ``set_routing(top_p=...)``):
            its ``p`` is where the controller starts.
        target: the wanted mean routed experts per token, in ``[min_k, top_k]`` of each
            layer: one number for every layer, or one per layer (layer budgets).
        rate: the gain: ``p`` moves by ``rate`` per expert of error per update, > 0.
        p_min, p_max: the bounds of ``p``, ``0 < p_min <= p_max <= 1``.

    Counts come from forward hooks on the layers (training mode only, so evaluations
    do not count; a host sync per call); ``step`` applies one update per layer that ran
    and resets the counts (gradient accumulation: every micro-batch counts). ``remove``
    takes the hooks off.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[MoELayer],
        target: float | Sequence[float],
        rate: float = 0.05,
        *,
        p_min: float = 0.05,
        p_max: float = 1.0,
    ) -> None:
        layers = list(modules.modules()) if isinstance(modules, nn.Module) else list(modules)
        self.layers = [m for m in layers if isinstance(m, MoELayer)]
        if not self.layers:
            raise ValueError("modules: expected a model with MoELayers or MoELayers, got none")
        targets = [target] * len(self.layers) if isinstance(target, int | float) else list(target)
        if len(targets) != len(self.layers) or not all(
            isinstance(t, int | float) and math.isfinite(t) and t >= 0 for t in targets
        ):
            raise ValueError(
                f"target must be a finite number >= 0 or {len(self.layers)} of them (one per layer), "
                f"got {target!r}"
            )
        if not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if not 0 < p_min <= p_max <= 1:
            raise ValueError(
                f"p_min and p_max must satisfy 0 < p_min <= p_max <= 1, got {p_min!r} and {p_max!r}"
            )
        for i, layer in enumerate(self.layers):
            if layer.config.router.top_p is None:
                raise ValueError(
                    f"modules: MoE layer {i} does not route with top-p; give it a starting p "
                    "(RouterConfig(top_p=...) or set_routing(top_p=...))"
                )
        self.targets = [float(t) for t in targets]
        self.rate, self.p_min, self.p_max = float(rate), p_min, p_max
        self._expert_sums = [0 for _ in self.layers]  # routed experts summed over counted tokens
        self._tokens = [0 for _ in self.layers]
        self._hooks = [layer.register_forward_hook(self._count) for layer in self.layers]

    @property
    def top_p(self) -> list[float]:
        """Each layer's current ``p``."""
        return [_top_p(layer, i) for i, layer in enumerate(self.layers)]

    def _count(self, layer: nn.Module, inputs: Any, output: Any) -> None:
        if not layer.training:
            return
        assert isinstance(layer, MoELayer)
        stats = layer.stats
        hist = None if stats is None else stats.experts_per_token
        if hist is None:
            return
        i = self.layers.index(layer)
        self._expert_sums[i] += int((hist * torch.arange(len(hist))).sum())
        self._tokens[i] += int(hist.sum())

    def measured(self) -> list[float | None]:
        """Each layer's mean routed experts per token since the last ``step`` (``None``: no tokens)."""
        return [s / t if t else None for s, t in zip(self._expert_sums, self._tokens, strict=True)]

    def step(self) -> list[float]:
        """One update of every layer that saw tokens (see the module docstring); returns the new ``p`` s."""
        for i, (layer, k) in enumerate(zip(self.layers, self.measured(), strict=True)):
            if k is not None:
                p = top_p_update(_top_p(layer, i), k, self.targets[i], self.rate, self.p_min, self.p_max)
                layer.set_routing(top_p=p)
        self._expert_sums = [0 for _ in self.layers]
        self._tokens = [0 for _ in self.layers]
        return self.top_p

    def attach(self, optimizer: torch.optim.Optimizer) -> object:
        """Run ``step()`` after every ``optimizer.step()``; returns the hook handle."""

        def update(*_: object) -> None:
            self.step()

        return optimizer.register_step_post_hook(update)

    def remove(self) -> None:
        """Take the forward hooks off the layers (the layers keep their current ``p``)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        """The controller's state: its settings and each layer's ``p`` (JSON-ready)."""
        return {
            "targets": self.targets,
            "rate": self.rate,
            "p_min": self.p_min,
            "p_max": self.p_max,
            "top_p": self.top_p,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set each layer's ``p`` from ``state`` (a ``state_dict()``); the settings stay this controller's."""
        values = state.get("top_p") if isinstance(state, dict) else None
        if not isinstance(values, list) or len(values) != len(self.layers):
            raise ValueError(f"state: expected 'top_p' with {len(self.layers)} values, got {values!r}")
        for layer, p in zip(self.layers, values, strict=True):
            layer.set_routing(top_p=p)


def _top_p(layer: MoELayer, index: int) -> float:
    p = layer.config.router.top_p
    if p is None:  # someone turned it off behind the controller's back
        raise ValueError(f"MoE layer {index} no longer routes with top-p; the controller needs it")
    return p
