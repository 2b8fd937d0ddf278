"""Decoding segments on the row kernels, a stack's experts at a time (``flexmoe.experts.rows``).

Legend: N rows, D model dim, F expert hidden dim, P first-projection blocks (2 gated, else
1), a segment ``(group, start, end)``: a group's consecutive rows.

``stacked_inference`` hands its decoding segments here first: the experts whose rows need
nothing added between the projections run whole (``whole_experts``: both products and the
activation), the others' projections run one call per projection (``decoding_segments``,
``project_in_batched``, ``project_out_batched``); each call covers every segment of a
stack, the loop over them in C, so no Python runs between experts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor

from flexmoe.experts.kernels import bf16_max_rows
from flexmoe.experts.rows import experts_bf16, rows_bf16_segments, takes_bf16_segments, takes_experts_bf16
from flexmoe.experts.stacks import ExpertTensors

__all__ = ["Picked", "decoding_segments", "project_in_batched", "project_out_batched", "whole_experts"]

Segment = tuple[int, int, int]
Stack = object  # an ExpertTensors (w_in [E, H, D], w_out [E, D, F], b_in, b_out, products)

# (group, start, end, expert) of the segments one stack's batched call runs
Picked = list[tuple[int, int, int, int]]


def _by_stack(
    segments: list[Segment], owners: list[tuple[ExpertTensors, int]], keep: Callable[[int, int, int], bool]
) -> list[tuple[ExpertTensors, Picked]]:
    """The segments ``keep(g, s, t)`` accepts, grouped by their experts' stack."""
    stacks: dict[int, tuple[ExpertTensors, Picked]] = {}
    for g, s, t in segments:
        if keep(g, s, t):
            stack, e = owners[g]
            stacks.setdefault(id(stack), (stack, []))[1].append((g, s, t, e))
    return list(stacks.values())


def _columns(picked: Picked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, counts, experts)`` of the picked segments."""
    _, starts, ends, experts = (np.array(column, dtype=np.int64) for column in zip(*picked, strict=True))
    return starts, ends - starts, experts


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
    for stack, picked in _by_stack(segments, owners, lambda g, s, t: g not in apart and t - s <= most):
        if stack.b_in is not None or stack.b_out is not None:
            continue
        starts, counts, experts = _columns(picked)
        if takes_experts_bf16(x_ND, counts, stack.w_in, stack.w_out, activation):
            experts_bf16(
                x_ND, starts, counts, stack.w_in, stack.w_out, experts, activation, row_weights_N, y_ND
            )
            whole.update(g for g, *_ in picked)
    return whole


def decoding_segments(
    x_ND: Tensor,
    segments: list[Segment],
    owners: list[tuple[ExpertTensors, int]],
    skip: set[int],
    h_PNF: Tensor,
) -> list[tuple[ExpertTensors, Picked]]:
    """Per stack, its segments outside ``skip`` whose projections ``rows_bf16_segments`` runs.

    Decoding rows (at most ``bf16_max_rows``) of plain bf16 experts without biases or
    packed copies: each projection of all of them in one call.
    """
    most = bf16_max_rows()
    batched = []
    for stack, picked in _by_stack(segments, owners, lambda g, s, t: g not in skip and t - s <= most):
        if stack.b_in is not None or stack.b_out is not None or stack.products is not None:
            continue
        if not stack.w_in.is_contiguous():
            continue
        counts = _columns(picked)[1]
        blocks = _blocks(stack.w_in, h_PNF.shape[2])
        if takes_bf16_segments(x_ND, counts, blocks) and takes_bf16_segments(h_PNF[0], counts, stack.w_out):
            batched.append((stack, picked))
    return batched


def project_in_batched(x_ND: Tensor, batched: list[tuple[ExpertTensors, Picked]], h_PNF: Tensor) -> None:
    """The first projection of the ``batched`` segments, block by block of ``h_PNF`` (gate, then up)."""
    P, _, F = h_PNF.shape
    for stack, picked in batched:
        starts, counts, experts = _columns(picked)
        for p in range(P):
            rows_bf16_segments(x_ND, starts, counts, _blocks(stack.w_in, F), experts * P + p, h_PNF[p])


def _blocks(w_in_EHD: Tensor, F: int) -> Tensor:
    """``w_in`` as ``[E * P, F, D]``: expert ``e``'s block ``p`` (gate, then up) is entry ``e * P + p``."""
    return w_in_EHD.view(-1, F, w_in_EHD.shape[2])


def project_out_batched(a_NF: Tensor, batched: list[tuple[ExpertTensors, Picked]], y_ND: Tensor) -> None:
    """The second projection of the ``batched`` segments, into their rows of ``y_ND``."""
    for stack, picked in batched:
        starts, counts, experts = _columns(picked)
        rows_bf16_segments(a_NF, starts, counts, stack.w_out, experts, y_ND)
