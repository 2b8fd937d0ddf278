"""Layer-wise routing schedules: per-layer ``top_k`` / ``top_p`` / capacity factor, as functions of the step.

DynaMoE gives each layer its own expert budget; a schedule also lets a budget change
over training (e.g. top-2 for the first steps, then top-1). A value is a pure function
of the step, so a resumed run needs no schedule state: the step decides the value.

A schedule is written as text, one entry per MoE layer separated by commas (one entry:
every layer), each entry one of::

    0.6             a constant
    2->1@300        A before step 300, B from step 300 on (a step change)
    0.9->0.5@0..400 A up to step 0, B from step 400, linear in between

``top_k`` values are rounded to the nearest integer (halves up).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from flexmoe.layer.moe_layer import MoELayer

__all__ = ["RoutingSchedule", "StepSchedule", "parse_layer_schedule"]

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ENTRY = re.compile(rf"^({_NUMBER})(?:->({_NUMBER})@(\d+)(?:\.\.(\d+))?)?$")


@dataclass(frozen=True)
class StepSchedule:
    """One value over steps: ``start`` up to step ``begin``, ``end`` from step ``finish``, linear between.

    ``begin == finish`` is a step change (``end`` from that step on); a constant has
    ``start == end``.
    """

    start: float
    end: float
    begin: int = 0
    finish: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"schedule values must be finite, got {self.start!r} and {self.end!r}")
        if not 0 <= self.begin <= self.finish:
            raise ValueError(
                f"schedule steps must satisfy 0 <= begin <= finish, got {self.begin} and {self.finish}"
            )

    @staticmethod
    def constant(value: float) -> StepSchedule:
        """The same value at every step."""
        return StepSchedule(value, value)

    def at(self, step: int) -> float:
        """The value at ``step``."""
        if step >= self.finish:
            return self.end
        if step <= self.begin:  # begin < finish here
            return self.start
        return self.start + (self.end - self.start) * (step - self.begin) / (self.finish - self.begin)

    def values(self) -> tuple[float, float]:
        """The two values it moves between (every value lies between them)."""
        return self.start, self.end

    def __str__(self) -> str:
        if self.start == self.end:
            return f"{self.start:g}"
        steps = f"{self.begin}" if self.begin == self.finish else f"{self.begin}..{self.finish}"
        return f"{self.start:g}->{self.end:g}@{steps}"


def parse_layer_schedule(text: str, num_layers: int, name: str = "schedule") -> list[StepSchedule]:
    """One ``StepSchedule`` per layer from ``text`` (see the module docstring); errors name ``name``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name}: expected a comma-separated list of values or schedules, got {text!r}")
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) not in (1, num_layers):
        raise ValueError(
            f"{name}: expected 1 entry (every layer) or {num_layers} (one per MoE layer), "
            f"got {len(entries)} in {text!r}"
        )
    out = []
    for entry in entries:
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(
                f"{name}: cannot read {entry!r}; expected a number, 'A->B@STEP' or 'A->B@START..END'"
            )
        start, end, begin, finish = match.groups()
        if end is None:
            out.append(StepSchedule.constant(float(start)))
            continue
        first = int(begin)
        last = first if finish is None else int(finish)
        if last < first:
            raise ValueError(f"{name}: in {entry!r} the end step must be >= the start step")
        out.append(StepSchedule(float(start), float(end), first, last))
    return out * num_layers if len(out) == 1 else out


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


@dataclass(frozen=True)
class RoutingSchedule:
    """Per-layer schedules of ``top_k``, ``top_p`` and the capacity factor (``None``: left as configured).

    Example:
        >>> schedule = RoutingSchedule.parse(2, top_k="2->1@100", capacity_factor="1.25,1.0")
        >>> schedule.values(150, 1)
        {'top_k': 1, 'capacity_factor': 1.0}
        >>> schedule.apply(layers, step)  # before each step's forward

    ``values(step)`` gives each layer's settings at a step; ``apply`` sets them with
    ``MoELayer.set_routing`` (changing only what differs from the layer's current config).
    """

    top_k: tuple[StepSchedule, ...] | None = None
    top_p: tuple[StepSchedule, ...] | None = None
    capacity_factor: tuple[StepSchedule, ...] | None = None

    @staticmethod
    def parse(
        num_layers: int,
        *,
        top_k: str | None = None,
        top_p: str | None = None,
        capacity_factor: str | None = None,
    ) -> RoutingSchedule:
        """Parse the text of each (see the module docstring) and check the values' ranges."""
        k = None if top_k is None else tuple(parse_layer_schedule(top_k, num_layers, "top_k"))
        p = None if top_p is None else tuple(parse_layer_schedule(top_p, num_layers, "top_p"))
        cf = (
            None
            if capacity_factor is None
            else tuple(parse_layer_schedule(capacity_factor, num_layers, "capacity_factor"))
        )
        for schedule in k or ():
            if min(schedule.values()) < 0.5:
                raise ValueError(f"top_k: every value must be >= 1, got {schedule}")
        for schedule in p or ():
            if not all(0 < v <= 1 for v in schedule.values()):
                raise ValueError(f"top_p: every value must be in (0, 1], got {schedule}")
        return RoutingSchedule(top_k=k, top_p=p, capacity_factor=cf)

    def is_empty(self) -> bool:
        """Whether nothing is scheduled."""
        return self.top_k is None and self.top_p is None and self.capacity_factor is None

    def top_k_range(self) -> tuple[int, int] | None:
        """The least and the most ``top_k`` any layer gets at any step (``None``: no top-k schedule)."""
        if self.top_k is None:
            return None
        values = [_round_half_up(v) for s in self.top_k for v in s.values()]
        return min(values), max(values)

    def values(self, step: int, layer: int) -> dict[str, float | int]:
        """Layer ``layer``'s scheduled settings at ``step`` (only those scheduled)."""
        out: dict[str, float | int] = {}
        if self.top_k is not None:
            out["top_k"] = _round_half_up(self.top_k[layer].at(step))
        if self.top_p is not None:
            out["top_p"] = self.top_p[layer].at(step)
        if self.capacity_factor is not None:
            out["capacity_factor"] = self.capacity_factor[layer].at(step)
        return out

    def apply(self, layers: Sequence[MoELayer], step: int) -> None:
        """Set every layer's scheduled settings for ``step`` with ``MoELayer.set_routing`` (only those)."""
        for i, layer in enumerate(layers):
            values = self.values(step, i)
            cfg = layer.config
            current = {
                "top_k": cfg.top_k,
                "top_p": cfg.router.top_p,
                "capacity_factor": cfg.capacity.capacity_factor,
            }
            changed = {key: v for key, v in values.items() if current[key] != v}
            if changed:
                layer.set_routing(**changed)  # type: ignore[arg-type]
