"""Decoding segments on the row kernels, a stack's experts at a time (``flexmoe.experts.rows``).

Legend: N rows, D model dim, F expert hidden dim, H first-projection width (2F gated, else
F), a segment ``(group, start, end)``: a group's consecutive rows.

``stacked_inference`` hands its decoding segments here first: the experts whose rows need
nothing added between the projections run whole (``whole_experts``: both products and the
activation), the others' projections run one call per projection (``decoding_segments``,
``project_in_batched``, ``project_out_batched``); each call covers every segment of a
stack, the loop over them in C, so no Python runs between experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from torch import Tensor

from flexmoe.experts.kernels import bf16_max_rows
from flexmoe.experts.rows import experts_bf16, rows_bf16_segments, takes_bf16_segments, takes_experts_bf16
from flexmoe.experts.stacks import ExpertTensors

__all__ = ["StackSegments", "decoding_segments", "project_in_batched", "project_out_batched", "whole_experts"]

Segment = tuple[int, int, int]


class StackSegments(NamedTuple):
    """Segments of one stack's experts that one batched call runs: their groups, rows and experts."""

    stack: ExpertTensors
    groups: list[int]
    starts: np.ndarray
    counts: np.ndarray
    experts: np.ndarray


def _by_stack(
    segments: list[Segment], owners: list[tuple[ExpertTensors, int]], keep: Callable[[int, int, int], bool]
) -> list[StackSegments]:
    """The segments ``keep(g, s, t)`` accepts, grouped by their experts' stack."""
    stacks: dict[int, tuple[ExpertTensors, list[tuple[int, int, int, int]]]] = {}
    for g, s, t in segments:
        if keep(g, s, t):
            stack, e = owners[g]
            stacks.setdefault(id(stack), (stack, []))[1].append((g, s, t, e))
    grouped = []
    for stack, picked in stacks.values():
        groups, starts, ends, experts = zip(*picked, strict=True)
        starts_, ends_ = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        grouped.append(
            StackSegments(stack, list(groups), starts_, ends_ - starts_, np.array(experts, dtype=np.int64))
        )
    return grouped


def whole_experts(
    x_ND: Tensor,
    segments: list[Segment],
    owners: list[tuple[ExpertTensors, int]],
    activation: str,
    row_weights_N: Tensor | None,
    y_ND: Tensor,
    apart: set[int],
) -> set[int]:
    """The groups whose rows the row kernels compute whole (``experts_bf16``), written into ``y_ND``.

    Decoding rows of a bf16 expert without biases, outside the groups ``apart``: both
    products and the activation in one call per stack for all its experts, each plain
    weight read once (faster than packed copies, which serve no rows the row kernels
    take).
    """
    most = bf16_max_rows()
    whole: set[int] = set()
    for part in _by_stack(segments, owners, lambda g, s, t: g not in apart and t - s <= most):
        stack = part.stack
        if stack.b_in is not None or stack.b_out is not None:
            continue
        if takes_experts_bf16(x_ND, part.counts, stack.w_in, stack.w_out, activation):
            experts_bf16(
                x_ND,
                part.starts,
                part.counts,
                stack.w_in,
                stack.w_out,
                part.experts,
                activation,
                row_weights_N,
                y_ND,
            )
            whole.update(part.groups)
    return whole


def decoding_segments(
    x_ND: Tensor,
    segments: list[Segment],
    owners: list[tuple[ExpertTensors, int]],
    skip: set[int],
    a_NF: Tensor,
) -> list[StackSegments]:
    """Per stack, its segments outside ``skip`` whose projections ``rows_bf16_segments`` runs.

    Decoding rows (at most ``bf16_max_rows``) of plain bf16 experts without biases or
    packed copies: each projection of all of them in one call (``a_NF``: the buffer the
    activations go to, the second projection's input).
    """
    most = bf16_max_rows()
    batched = []
    for part in _by_stack(segments, owners, lambda g, s, t: g not in skip and t - s <= most):
        stack = part.stack
        if stack.b_in is not None or stack.b_out is not None or stack.products is not None:
            continue
        if takes_bf16_segments(x_ND, part.counts, stack.w_in) and takes_bf16_segments(
            a_NF, part.counts, stack.w_out
        ):
            batched.append(part)
    return batched


def project_in_batched(x_ND: Tensor, batched: list[StackSegments], h_NH: Tensor) -> None:
    """The first projection of the ``batched`` segments into their rows of ``h_NH`` (gate and up together)."""
    for part in batched:
        rows_bf16_segments(x_ND, part.starts, part.counts, part.stack.w_in, part.experts, h_NH)


def project_out_batched(a_NF: Tensor, batched: list[StackSegments], y_ND: Tensor) -> None:
    """The second projection of the ``batched`` segments, into their rows of ``y_ND``."""
    for part in batched:
        rows_bf16_segments(a_NF, part.starts, part.counts, part.stack.w_out, part.experts, y_ND)
