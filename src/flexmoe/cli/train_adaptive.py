"""``flexmoe train``'s adaptive routing: zero-computation experts, layer schedules and the mean-k controller.

- ``--zero-experts skip,copy,constant``: zero-computation experts the routers choose
  among next to the ``--experts`` (``flexmoe.ExpertConfig.zero_experts``).
- ``--layer-top-k``, ``--layer-top-p``, ``--layer-capacity-factor``: per-layer values,
  each a constant or a schedule over the steps (``flexmoe.layer.schedule``: ``2,1``,
  ``2->1@300``, ``0.9->0.5@0..400``), set before every step's forward. The step decides
  the value, so a resumed run continues them exactly.
- ``--target-experts K`` (with ``--top-p`` as the starting ``p``): the
  ``ExpertsPerTokenController`` moves each layer's ``p`` after every step by
  ``--target-rate * (K - measured mean experts per token)``; its ``p`` s are saved in
  every checkpoint (``extra["adaptive"]``) and restored on ``--resume``.

``check_routing_options`` holds the cross-field rules ``TrainConfig`` runs;
``RoutingControl`` is what the training loop calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from flexmoe.cli.options import OptionError
from flexmoe.config import ZERO_EXPERTS
from flexmoe.layer import ExpertsPerTokenController, MoELayer, RoutingSchedule


class RoutingOptions(Protocol):
    """The ``TrainConfig`` fields this module reads (``flexmoe.cli.train_config`` imports this module)."""

    @property
    def layers(self) -> int: ...

    @property
    def experts(self) -> int: ...

    @property
    def top_k(self) -> int: ...

    @property
    def top_p(self) -> float | None: ...

    @property
    def min_k(self) -> int: ...

    @property
    def zero_experts(self) -> str | None: ...

    @property
    def layer_top_k(self) -> str | None: ...

    @property
    def layer_top_p(self) -> str | None: ...

    @property
    def layer_capacity_factor(self) -> str | None: ...

    @property
    def target_experts(self) -> float | None: ...

    @property
    def target_rate(self) -> float: ...


__all__ = ["RoutingControl", "check_routing_options", "zero_experts_of"]


def zero_experts_of(text: str | None) -> tuple[str, ...]:
    """``--zero-experts`` as a tuple of kinds (``OptionError`` for an unknown one)."""
    if text is None:
        return ()
    kinds = tuple(kind.strip() for kind in text.split(","))
    for kind in kinds:
        if kind not in ZERO_EXPERTS:
            raise OptionError(
                "zero_experts", f"must be a comma-separated list of {', '.join(ZERO_EXPERTS)}, got {text!r}"
            )
    return kinds


def schedule_of(config: RoutingOptions) -> RoutingSchedule:
    """The layer schedules of ``config`` (``OptionError`` naming the option for bad text)."""
    texts = {
        "layer_top_k": config.layer_top_k,
        "layer_top_p": config.layer_top_p,
        "layer_capacity_factor": config.layer_capacity_factor,
    }
    parsed: dict[str, str | None] = {}
    for option, text in texts.items():
        try:
            RoutingSchedule.parse(config.layers, **{option.removeprefix("layer_"): text})
        except ValueError as error:
            reason = str(error).split(": ", 1)[-1]
            raise OptionError(option, reason) from None
        parsed[option.removeprefix("layer_")] = text
    return RoutingSchedule.parse(config.layers, **parsed)


def check_routing_options(config: RoutingOptions) -> None:
    """The cross-field rules of the adaptive-routing options (``OptionError`` naming one)."""
    zero_experts_of(config.zero_experts)
    schedule = schedule_of(config)
    k_range = schedule.top_k_range()
    if k_range is not None and not config.min_k <= k_range[0] <= k_range[1] <= config.experts:
        raise OptionError(
            "layer_top_k",
            f"every value must be in [--min-k, --experts] = [{config.min_k}, {config.experts}], "
            f"got {config.layer_top_k!r}",
        )
    if config.target_experts is None:
        return
    if config.top_p is None:
        raise OptionError("target_experts", "needs --top-p (the controller's starting p)")
    if config.layer_top_p is not None:
        raise OptionError("target_experts", "and --layer-top-p both set top-p: choose one")
    top_k = config.top_k if k_range is None else k_range[0]
    if not config.min_k <= config.target_experts <= top_k:
        raise OptionError(
            "target_experts",
            f"must be in [--min-k, --top-k] = [{config.min_k}, {top_k}], got {config.target_experts!r}",
        )


class RoutingControl:
    """The run's layer schedule and mean-k controller, applied around each training step."""

    def __init__(
        self,
        layers: Sequence[MoELayer],
        schedule: RoutingSchedule,
        controller: ExpertsPerTokenController | None,
    ) -> None:
        self.layers = list(layers)
        self.schedule = schedule
        self.controller = controller

    @staticmethod
    def from_config(config: RoutingOptions, layers: Sequence[MoELayer]) -> RoutingControl:
        """The schedule and the controller ``config`` asks for (neither: a control that does nothing)."""
        controller = None
        if config.target_experts is not None:
            controller = ExpertsPerTokenController(layers, config.target_experts, config.target_rate)
        return RoutingControl(layers, schedule_of(config), controller)

    def before_step(self, step: int) -> None:
        """Set the layers' scheduled routing for training step ``step`` (``done``: the routing after it)."""
        if not self.schedule.is_empty():
            self.schedule.apply(self.layers, max(step, 0))

    def after_step(self) -> None:
        """One controller update from the step's measured experts per token."""
        if self.controller is not None:
            self.controller.step()

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps (``extra["adaptive"]``): the controller's ``p`` s (a schedule: nothing)."""
        return None if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state(self, state: object) -> None:
        """Restore ``state()`` from a checkpoint (nothing saved: the controller keeps its starting ``p``)."""
        if self.controller is None or not isinstance(state, dict) or "controller" not in state:
            return
        self.controller.load_state_dict(state["controller"])
