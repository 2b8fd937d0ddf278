"""``Stopwatch``: a layer's forward and backward time on this rank (the tuner's measurements)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

__all__ = ["Stopwatch"]


# --------------------------------------------------------------------------- stopwatch
class _Mark(torch.autograd.Function):
    """Identity whose backward notes the time (the layer's backward passes it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, watch: Stopwatch, which: int) -> Tensor:
        ctx.watch, ctx.which = watch, which
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.watch.mark(ctx.which)
        return grad, None, None


class Stopwatch:
    """A layer's forward and backward time on this rank, read at the next call.

    Four marks: forward start and end (in ``forward``), backward start (the output's
    gradient arrives) and end (the input's gradient leaves; only when the input
    requires grad, else the sample is the forward alone). CPU: wall clock; CUDA: events
    on the current stream, read (waiting for them) at the next call.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = [None] * 4

    def mark(self, which: int) -> None:
        """Note mark ``which`` (0 forward start, 1 forward end, 2 backward start, 3 backward end)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[which] = event
        else:
            self._marks[which] = time.perf_counter()

    def start(self, x: Tensor) -> Tensor:
        """Forward start; returns ``x`` marked for the backward's end."""
        self._marks = [None] * 4
        self.mark(0)
        return _Mark.apply(x, self, 3) if x.requires_grad else x

    def stop(self, y: Tensor) -> Tensor:
        """Forward end; returns ``y`` marked for the backward's start."""
        self.mark(1)
        return _Mark.apply(y, self, 2) if y.requires_grad else y

    def _between(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return float(a.elapsed_time(b)) / 1e3
        return float(b - a)

    def read(self) -> float:
        """Seconds of the last call (0.0 when none finished)."""
        m = self._marks
        if m[0] is None or m[1] is None:
            return 0.0
        seconds = self._between(m[0], m[1])
        if m[2] is not None and m[3] is not None:
            seconds += self._between(m[2], m[3])
        return seconds
