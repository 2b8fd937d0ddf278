"""Grouped-GEMM backends for the routed experts' FFN over expert-major segments.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E local experts.

Every backend computes, for each expert ``e`` and its rows ``x_e`` (with optional
per-row routing weights ``w``):
``y_e = (w_e * act(x_e @ w_in[e]^T + b_in[e])) @ w_out[e]^T + w_e * b_out[e]``,
i.e. ``w * FFN_e(x)``, and returns the rows in the same order. Scaling the hidden
activation instead of the output touches ``F`` instead of ``D`` values per row and
lets the backward get the routing-weight gradient without storing the output.

``loop`` is the plain-autograd version (also the clean fallback); ``fused`` has a
hand-written backward that writes every GEMM into preallocated buffers and recomputes
the activation instead of storing it; ``grouped_mm`` calls ``torch._grouped_mm``.

With LoRA adapters (``lora``, see ``flexmoe.experts.lora``) every backend adds the
low-rank terms on the same segments: ``loop`` under plain autograd, ``fused`` inside its
segment loops with their gradients in its hand-written backward, ``grouped_mm`` as two
more ``torch._grouped_mm`` calls per projection.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.experts.activations import (
    activate,
    activation_backward_into,
    activation_into,
    base_activation,
    is_gated_silu,
    weighted_activation_into,
)
from flexmoe.experts.decoding import decoding_segments, project_in_batched, project_out_batched, whole_experts
from flexmoe.experts.lora import LoRATerms, SegmentLoRA, lora_masks
from flexmoe.experts.rows import rows_bf16, rows_fp32, takes_bf16, takes_fp32
from flexmoe.experts.segments import SERIAL_16BIT_ROWS, for_each_segment, segments_of
from flexmoe.experts.stacks import ExpertTensors
from flexmoe.experts.swiglu import swiglu_backward_into, takes_swiglu
from flexmoe.workspace import WORKSPACE

__all__ = [
    "contiguous_grad",
    "few_row_product",
    "fused_backward",
    "fused_forward",
    "fused_inference",
    "grouped_ffn",
    "grouped_ffn_fused",
    "grouped_ffn_grouped_mm",
    "grouped_ffn_grouped_mm_rows",
    "grouped_ffn_loop",
    "grouped_mm_available",
    "stacked_inference",
]


def _expert_of_row(counts: list[int], device: torch.device) -> Tensor:
    return torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
    )


def grouped_ffn_loop(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
    lora: LoRATerms | None = None,
) -> Tensor:
    """Per-expert loop under plain autograd (the LoRA terms too: the reference path)."""
    outputs = []
    mask_in_ND, mask_out_NF = (None, None)
    if lora is not None:
        mask_in_ND, mask_out_NF = lora_masks(lora, x_ND.shape[0], x_ND.shape[1], w_out.shape[2], x_ND)
    for e, start, end in segments_of(counts):
        x_e = x_ND[start:end]
        h = F.linear(x_e, w_in[e], None if b_in is None else b_in[e])
        k = -1 if lora is None else lora.slot_of_expert[e]
        if lora is not None and k >= 0 and lora.A_in is not None and lora.B_in is not None:
            x_lora = x_e if mask_in_ND is None else x_e * mask_in_ND[start:end]
            h = h + lora.scaling * F.linear(F.linear(x_lora, lora.A_in[k]), lora.B_in[k])
        a = activate(h, activation)
        w = None if row_weights_N is None else row_weights_N[start:end, None]
        if w is not None:
            a = a * w
        y = F.linear(a, w_out[e], None if b_out is None or w is not None else b_out[e])
        if b_out is not None and w is not None:
            y = y + w * b_out[e]
        if lora is not None and k >= 0 and lora.A_out is not None and lora.B_out is not None:
            a_lora = a if mask_out_NF is None else a * mask_out_NF[start:end]
            y = y + lora.scaling * F.linear(F.linear(a_lora, lora.A_out[k]), lora.B_out[k])
        outputs.append(y)
    if not outputs:
        return x_ND.new_zeros(0, w_out.shape[1])
    return torch.cat(outputs)


Segment = tuple[int, int, int]
Grads = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def fused_forward(
    x_ND: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_N: Tensor | None,
    segments: list[Segment],
    activation: str,
    y_ND: Tensor,
    h_NH: Tensor,
    lora: SegmentLoRA | None = None,
) -> None:
    """The fused forward, into ``y_ND`` and ``h_NH``.

    Each expert's first projection is one GEMM ``x_e @ w_in[e]^T`` into the rows
    ``[s:t]`` of ``h_NH`` (gated units: gate columns ``[:F]``, up ``[F:]``), its second
    one GEMM from the rows of the activation, all row-major (every GEMM form and its
    gradients at its fastest; the activation runs in one pass over the two halves,
    ``flexmoe.experts.swiglu``, where it can). ``h_NH`` (the pre-activation) is what the
    backward needs besides ``x``; the activation output is recomputed there. ``lora``
    adds its terms segment by segment next to each projection.
    """
    N = x_ND.shape[0]
    F = w_out.shape[2]
    device, dtype = x_ND.device, x_ND.dtype

    def project_in(e: int, s: int, t: int) -> None:
        if b_in is None:
            torch.mm(x_ND[s:t], w_in[e].t(), out=h_NH[s:t])
        else:
            torch.addmm(b_in[e], x_ND[s:t], w_in[e].t(), out=h_NH[s:t])
        if lora is not None:
            lora.add_in(e, s, t, h_NH)

    for_each_segment(segments, project_in, device, dtype)
    up_NF = h_NH[:, F:] if h_NH.shape[1] == 2 * F else None
    a_NF = weighted_activation_into(
        activation, h_NH[:, :F], up_NF, row_weights_N, WORKSPACE.take((N, F), dtype, device)
    )

    def project_out(e: int, s: int, t: int) -> None:
        if b_out is None:
            torch.mm(a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
        elif row_weights_N is None:
            torch.addmm(b_out[e], a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
        else:
            torch.mm(a_NF[s:t], w_out[e].t(), out=y_ND[s:t])
            y_ND[s:t].addcmul_(row_weights_N[s:t, None], b_out[e])
        if lora is not None:
            lora.add_out(e, s, t, y_ND)

    if lora is not None:
        lora.set_activation(a_NF)
    for_each_segment(segments, project_out, device, dtype)
    if lora is not None:
        lora.release_activation()
    WORKSPACE.give(a_NF)


def fused_backward(
    grad_y_ND: Tensor,
    x_ND: Tensor,
    h_NH: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    row_weights_N: Tensor | None,
    segments: list[Segment],
    activation: str,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    grad_x_ND: Tensor | None = None,
    lora: SegmentLoRA | None = None,
) -> Grads:
    """Gradients ``(x, w_in, w_out, b_in, b_out, row_weights)`` of ``fused_forward``.

    ``needs`` says which to compute (the rest are ``None``; ``b_in``'s only when asked
    for). ``grad_x_ND``: where to write the input gradient (a pooled buffer if ``None``).
    ``lora`` (the forward's) adds its paths to these and keeps its factors' gradients
    in ``lora.grads``.
    """
    need_x, need_w_in, need_w_out, need_b_in, need_b_out, need_rw = needs
    grad_y_ND = grad_y_ND.contiguous()
    N, H = h_NH.shape
    F = w_out.shape[2]
    gated = H == 2 * F
    device, dtype = x_ND.device, x_ND.dtype
    base = base_activation(activation)
    rw_N1 = None if row_weights_N is None else row_weights_N[:, None]

    grad_a_NF = WORKSPACE.take((N, F), dtype, device)
    # one pass for silu-gated units on CPU: the weighted activation, the row weights'
    # gradient and the first projection's gradient together, after the down projection
    one_pass = one_pass_swiglu(activation, h_NH, grad_a_NF)
    grad_h_NH = WORKSPACE.take((N, H), dtype, device) if one_pass else None
    a_NF: Tensor | None = None

    # 1. Recompute the activation: a = act(gate) * up (gated) or act(h).
    if not one_pass:
        act_gate_NF = activation_into(base, h_NH[:, :F], WORKSPACE.take((N, F), dtype, device))
        a_NF = act_gate_NF
        if gated:
            a_NF = torch.mul(act_gate_NF, h_NH[:, F:], out=WORKSPACE.take((N, F), dtype, device))

    # 2. Through the down projection: the gradient of the (weighted) activation.
    if lora is not None:
        lora.start_backward(grad_y_ND)

    def project_out_backward(e: int, s: int, t: int) -> None:
        torch.mm(grad_y_ND[s:t], w_out[e], out=grad_a_NF[s:t])
        if lora is not None:
            lora.backward_out(e, s, t, grad_y_ND, grad_a_NF)

    for_each_segment(segments, project_out_backward, device, dtype)
    if lora is not None:
        lora.finish_backward_out(grad_a_NF)
    grad_rw = None
    if one_pass:
        assert grad_h_NH is not None
        # the weighted activation is what the output projection's weight gradient reads
        a_NF = WORKSPACE.take((N, F), dtype, device) if need_w_out or lora is not None else None
        grad_rw32 = None if row_weights_N is None or not need_rw else torch.empty(N, device=device)
        swiglu_backward_into(
            h_NH[:, :F], h_NH[:, F:], grad_a_NF, row_weights_N, grad_h_NH[:, :F], grad_h_NH[:, F:], a_NF,
            grad_rw32, None if row_weights_N is None else "row",
        )  # fmt: skip
        if grad_rw32 is not None:
            grad_rw = grad_rw32.to(dtype)
    elif rw_N1 is not None:
        assert a_NF is not None
        if need_rw:
            # d/dw of w * (a @ W^T + b) = <grad_a, a> + <grad_y, b>.
            product = torch.mul(grad_a_NF, a_NF, out=WORKSPACE.take((N, F), dtype, device))
            grad_rw = product.sum(1)
            WORKSPACE.give(product)
        a_NF.mul_(rw_N1)
        grad_a_NF.mul_(rw_N1)
    if grad_rw is not None and b_out is not None:
        for e, s, t in segments:
            grad_rw[s:t] += grad_y_ND[s:t] @ b_out[e]
    if lora is not None:
        assert a_NF is not None
        lora.set_activation(a_NF)
        for_each_segment(segments, lora.backward_out_A, device, dtype)
        lora.release_activation()
    grad_w_out = None
    if need_w_out:
        assert a_NF is not None
        grad_w_out = _empty_grad_like(w_out, segments)
        weighted_a_NF = a_NF
        for_each_segment(
            segments,
            lambda e, s, t: torch.mm(grad_y_ND[s:t].t(), weighted_a_NF[s:t], out=grad_w_out[e]),
            device,
            dtype,
        )
    if one_pass:
        if a_NF is not None:
            WORKSPACE.give(a_NF)
        WORKSPACE.give(grad_a_NF)
    else:
        if gated:
            WORKSPACE.give(a_NF)
        # 3. Through the activation, into the [N, H] gradient of the first projection.
        grad_h_NH = WORKSPACE.take((N, H), dtype, device)
        if gated:
            torch.mul(grad_a_NF, act_gate_NF, out=grad_h_NH[:, F:])
            torch.mul(grad_a_NF, h_NH[:, F:], out=grad_h_NH[:, :F])
            activation_backward_into(base, grad_h_NH[:, :F], h_NH[:, :F], grad_h_NH[:, :F])
        else:
            activation_backward_into(base, grad_a_NF, h_NH, grad_h_NH)
        WORKSPACE.give(grad_a_NF, act_gate_NF)
    assert grad_h_NH is not None

    # 4. Through the first projection: one GEMM per expert for each gradient.
    grad_w_in = _empty_grad_like(w_in, segments) if need_w_in else None
    if need_x and grad_x_ND is None:
        grad_x_ND = WORKSPACE.take(tuple(x_ND.shape), dtype, device)
    if not need_x:
        grad_x_ND = None

    def project_in_backward(e: int, s: int, t: int) -> None:
        if grad_w_in is not None:
            torch.mm(grad_h_NH[s:t].t(), x_ND[s:t], out=grad_w_in[e])
        if grad_x_ND is not None:
            torch.mm(grad_h_NH[s:t], w_in[e], out=grad_x_ND[s:t])
        if lora is not None:
            lora.backward_in(e, s, t, grad_h_NH, grad_x_ND)

    for_each_segment(segments, project_in_backward, device, dtype)
    grad_b_in = None
    if need_b_in:
        grad_b_in = w_in.new_zeros(w_in.shape[:2])
        for e, s, t in segments:
            grad_b_in[e] = grad_h_NH[s:t].sum(0)
    grad_b_out = None
    if b_out is not None and need_b_out:
        weighted = grad_y_ND if row_weights_N is None else grad_y_ND * row_weights_N[:, None]
        grad_b_out = _segment_sums(weighted, segments, w_out.shape[:2])
    WORKSPACE.give(grad_h_NH)
    return grad_x_ND, grad_w_in, grad_w_out, grad_b_in, grad_b_out, grad_rw


class _FusedGroupedFFN(torch.autograd.Function):
    """``fused_forward`` / ``fused_backward`` under autograd, on pooled buffers.

    Only ``x`` and the pre-activation are kept for backward; the scratch buffers come
    from the workspace pool and go back to it after the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_ND: Tensor,
        w_in: Tensor,
        w_out: Tensor,
        b_in: Tensor | None,
        b_out: Tensor | None,
        row_weights_N: Tensor | None,
        A_in: Tensor | None,
        B_in: Tensor | None,
        A_out: Tensor | None,
        B_out: Tensor | None,
        counts: list[int],
        activation: str,
        lora_terms: LoRATerms | None,
    ) -> Tensor:
        segments = segments_of(counts)
        N, D = x_ND.shape
        H = w_in.shape[1]
        h_NH = WORKSPACE.take((N, H), x_ND.dtype, x_ND.device)
        y_ND = WORKSPACE.take((N, D), x_ND.dtype, x_ND.device)
        lora = None
        if lora_terms is not None:
            lora = SegmentLoRA(lora_terms.with_tensors((A_in, B_in, A_out, B_out)), x_ND, w_out.shape[2])
        fused_forward(x_ND, w_in, w_out, b_in, b_out, row_weights_N, segments, activation, y_ND, h_NH, lora)
        ctx.lora = lora
        # x is kept as an attribute, not through save_for_backward, so that backward can
        # hand its buffer back to the pool once done (nothing else modifies it: it is the
        # dispatcher's private expert-major copy).
        ctx.x_ND = x_ND
        ctx.save_for_backward(h_NH, w_in, w_out, b_out, row_weights_N)
        ctx.segments = segments
        ctx.activation = activation
        ctx.has_b_in = b_in is not None
        ctx.released = False
        return y_ND

    @staticmethod
    def backward(ctx: Any, grad_y_ND: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.released:
            raise RuntimeError(
                "the fused expert backend frees its saved buffers after one backward; "
                "use backend='loop' to backpropagate through the same graph twice"
            )
        h_NH, w_in, w_out, b_out, row_weights_N = ctx.saved_tensors
        x_ND = ctx.x_ND
        needs = ctx.needs_input_grad[:6]
        needs = (needs[0], needs[1], needs[2], needs[3] and ctx.has_b_in, needs[4], needs[5])
        lora: SegmentLoRA | None = ctx.lora
        grads = fused_backward(
            grad_y_ND,
            x_ND,
            h_NH,
            w_in,
            w_out,
            b_out,
            row_weights_N,
            ctx.segments,
            ctx.activation,
            needs,
            lora=lora,
        )
        lora_grads = (None, None, None, None) if lora is None else tuple(lora.grads)
        del ctx.x_ND, ctx.lora
        WORKSPACE.give(h_NH, grad_y_ND, x_ND)
        ctx.released = True
        return (*grads, *lora_grads, None, None, None)


def _empty_grad_like(weight: Tensor, segments: list[Segment]) -> Tensor:
    """Uninitialised per-expert gradient, zeroed only for experts that get no rows.

    From the workspace pool, to which it returns once freed (``zero_grad`` setting it to
    ``None``): the next step's gradient reuses its memory instead of page-faulting a
    fresh one in (as large as the expert weights).
    """
    grad = WORKSPACE.take_until_released(tuple(weight.shape), weight.dtype, weight.device)
    active = {e for e, _, _ in segments}
    for e in range(weight.shape[0]):
        if e not in active:
            grad[e].zero_()
    return grad


def _segment_sums(rows_NX: Tensor, segments: list[Segment], shape: torch.Size) -> Tensor:
    sums = rows_NX.new_zeros(shape)
    for e, s, t in segments:
        sums[e] = rows_NX[s:t].sum(0)
    return sums


def fused_inference(
    x_ND: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_N: Tensor | None,
    counts: list[int],
    activation: str,
) -> Tensor:
    """The forward without autograd, in token-major layout (``stacked_inference`` on one stack).

    Decode-sized segments (a few rows per expert) stream each expert's weights once;
    BLAS does that best as ``x_e @ W^T`` into contiguous rows: each expert's first
    projection is one GEMM into the row-major ``[N, H]`` pre-activation (gate and up side
    by side, as the training path keeps them).
    """
    stack = ExpertTensors(w_in, w_out, b_in, b_out)
    return stacked_inference(x_ND, counts, [stack], activation, row_weights_N)


def stacked_inference(
    x_ND: Tensor,
    counts: list[int],
    stacks: Sequence[ExpertTensors],
    activation: str,
    row_weights_N: Tensor | None,
    add_in: Callable[[Tensor], object] | None = None,
    add_out: Callable[[Tensor, Tensor], object] | None = None,
    apart: Collection[int] | None = None,
) -> Tensor:
    """``fused_inference`` over the experts of several stacks taken one after the other.

    Group ``g`` (``counts[g]`` consecutive rows) runs on the ``g``-th expert of
    ``stacks`` concatenated (the base experts, then an adapter's: one pass over every
    row, nothing copied). ``add_in(h_1NH)`` may add to the first projection (``[1, N, H]``:
    each row's ``[gate; up]``) before the activation, ``add_out(a_NF, y_ND)`` to the
    output (the LoRA terms of a multi-adapter batch, ``flexmoe.adapters.woven``), into
    the rows of the groups ``apart`` only (all groups where ``None``): those run
    projection by projection, the others may run whole (the row kernels' one-call
    experts, whose pre-activation is never stored).
    """
    N, D = x_ND.shape
    if N == 0:
        return x_ND.new_zeros(0, D)
    x_ND = x_ND.contiguous()
    F = stacks[0].w_out.shape[2]
    H = stacks[0].w_in.shape[1]
    device, dtype = x_ND.device, x_ND.dtype
    owners = [(stack, e) for stack in stacks for e in range(stack.w_in.shape[0])]
    segments = segments_of(counts)
    # beside a pool of Python threads, oneDNN's packed products run best one at a time (see for_each_segment)
    serial_16bit_rows = 0 if any(stack.products is not None for stack in stacks) else SERIAL_16BIT_ROWS
    y_ND = WORKSPACE.take((N, D), dtype, device)
    # rows that get terms added to the first projection or the output (LoRA) need the projections apart
    has_terms = add_in is not None or add_out is not None
    with_terms = set(range(len(counts)) if apart is None else apart) if has_terms else set()
    whole = whole_experts(x_ND, segments, owners, activation, row_weights_N, y_ND, with_terms)
    if len(whole) == len(segments):
        return y_ND
    # one GEMM per segment for the first projection, gate and up together: row-major [N, H]
    h_NH = WORKSPACE.take((N, H), dtype, device)
    a_NF = WORKSPACE.take((N, F), dtype, device)
    # the other decoding segments on plain bf16 weights: one call per projection and stack
    batched = decoding_segments(x_ND, segments, owners, whole, a_NF)
    project_in_batched(x_ND, batched, h_NH)
    done = whole.union(*(part.groups for part in batched))
    segments = [segment for segment in segments if segment[0] not in done]

    def project_in(g: int, s: int, t: int) -> None:
        stack, e = owners[g]
        x_nD, h_nH, w = x_ND[s:t], h_NH[s:t], stack.w_in[e]
        packed = None if stack.products is None else partial(stack.products.project_in, x_nD, e)
        if few_row_product(x_nD, w, packed, h_nH):
            if stack.b_in is not None:
                h_nH += stack.b_in[e]
        elif stack.b_in is None:
            torch.mm(x_nD, w.t(), out=h_nH)
        else:
            torch.addmm(stack.b_in[e], x_nD, w.t(), out=h_nH)

    for_each_segment(segments, project_in, device, dtype, serial_16bit_rows)
    if add_in is not None:
        add_in(h_NH[None])
    gated = H == 2 * F
    weighted_activation_into(activation, h_NH[:, :F], h_NH[:, F:] if gated else None, row_weights_N, a_NF)

    def project_out(g: int, s: int, t: int) -> None:
        stack, e = owners[g]
        a_nF, y_nD, w = a_NF[s:t], y_ND[s:t], stack.w_out[e]
        packed = None if stack.products is None else partial(stack.products.project_out, a_nF, e)
        if not few_row_product(a_nF, w, packed, y_nD):
            torch.mm(a_nF, w.t(), out=y_nD)
        if stack.b_out is not None:
            if row_weights_N is None:
                y_nD += stack.b_out[e]
            else:
                y_nD.addcmul_(row_weights_N[s:t, None], stack.b_out[e])

    for_each_segment(segments, project_out, device, dtype, serial_16bit_rows)
    project_out_batched(a_NF, batched, y_ND)
    if add_out is not None:
        add_out(a_NF, y_ND)
    WORKSPACE.give(a_NF, h_NH)
    return y_ND


def few_row_product(
    x_nI: Tensor, w_OI: Tensor, packed: Callable[[], Tensor | None] | None, out_nO: Tensor
) -> bool:
    """``x @ w^T`` into ``out`` on a few-row path; False (nothing written) where none takes it.

    Few fp32 rows go to the fp32 row kernel, which streams the plain weight faster than
    BLAS or the packed copy; then the packed copy (``packed()``: ``None`` where it does
    not pay); then the bf16 row kernels.
    """
    if takes_fp32(x_nI, w_OI):
        rows_fp32(x_nI, w_OI, out=out_nO)
        return True
    y_nO = None if packed is None else packed()
    if y_nO is None and takes_bf16(x_nI, w_OI):
        y_nO = rows_bf16(x_nI, w_OI)
    if y_nO is None:
        return False
    out_nO.copy_(y_nO)
    return True


def one_pass_swiglu(activation: str, h_NH: Tensor, *grids: Tensor) -> bool:
    """Whether the fused backend's silu-gated activation of ``h_NH`` runs in one pass.

    ``flexmoe.experts.swiglu`` on the gate and up halves and the ``[N, F]`` ``grids``.
    """
    F = h_NH.shape[1] // 2
    return is_gated_silu(activation) and takes_swiglu(h_NH[:, :F], h_NH[:, F:], *grids)


def grouped_ffn_fused(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
    lora: LoRATerms | None = None,
) -> Tensor:
    """Per-expert GEMMs into preallocated buffers with a hand-written backward.

    Saves only ``x`` and the pre-activation for backward (the activation output is
    recomputed), and never materialises per-expert temporaries. With ``lora``, a
    forward without autograd runs the training layout (``fused_forward``), not the
    token-major inference one.
    """
    factors = (None, None, None, None) if lora is None else lora.tensors
    inputs = (x_ND, w_in, w_out, b_in, b_out, row_weights_N, *factors)
    will_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not will_backward and lora is None:
        return fused_inference(x_ND.contiguous(), w_in, w_out, b_in, b_out, row_weights_N, counts, activation)
    if not will_backward:
        return _fused_forward_only(
            x_ND.contiguous(), w_in, w_out, b_in, b_out, row_weights_N, counts, activation, lora
        )
    return _FusedGroupedFFN.apply(  # type: ignore[no-any-return]
        x_ND.contiguous(), w_in, w_out, b_in, b_out, row_weights_N, *factors, counts, activation, lora
    )


def _fused_forward_only(
    x_ND: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    row_weights_N: Tensor | None,
    counts: list[int],
    activation: str,
    lora: LoRATerms | None,
) -> Tensor:
    """``fused_forward`` without autograd, into a pooled output (its scratch goes back to the pool)."""
    N, D = x_ND.shape
    h_NH = WORKSPACE.take((N, w_in.shape[1]), x_ND.dtype, x_ND.device)
    y_ND = WORKSPACE.take((N, D), x_ND.dtype, x_ND.device)
    segment_lora = None if lora is None else SegmentLoRA(lora, x_ND, w_out.shape[2])
    segments = segments_of(counts)
    fused_forward(
        x_ND, w_in, w_out, b_in, b_out, row_weights_N, segments, activation, y_ND, h_NH, segment_lora
    )
    WORKSPACE.give(h_NH)
    return y_ND


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and dtype == torch.bfloat16
    return device.type == "cpu"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    ``_grouped_mm``'s backward rejects the stride-0 gradients that ``sum()`` produces.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """``x``, whose gradient is made contiguous (for ``torch._grouped_mm`` outputs)."""
    y: Tensor = _ContiguousGrad.apply(x)
    return y


def grouped_ffn_grouped_mm(
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
    lora: LoRATerms | None = None,
) -> Tensor:
    """``torch._grouped_mm`` over the segments (its autograd formula does the backward)."""
    offsets = torch.tensor(counts, device=x_ND.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    expert_of_row = _expert_of_row(counts, x_ND.device) if (b_in is not None or b_out is not None) else None
    mask_in_ND, mask_out_NF = (None, None)
    if lora is not None:
        mask_in_ND, mask_out_NF = lora_masks(lora, x_ND.shape[0], x_ND.shape[1], w_out.shape[2], x_ND)
    h_NH = torch._grouped_mm(x_ND, w_in.transpose(-2, -1), offs=offsets)
    if lora is not None and lora.A_in is not None and lora.B_in is not None:
        h_NH = h_NH + _lora_grouped_mm(x_ND, mask_in_ND, lora.A_in, lora.B_in, lora, offsets)
    if b_in is not None:
        h_NH = h_NH + b_in[expert_of_row]
    a_NF = activate(h_NH, activation)
    if row_weights_N is not None:
        a_NF = a_NF * row_weights_N[:, None]
    y_ND: Tensor = contiguous_grad(torch._grouped_mm(a_NF, w_out.transpose(-2, -1), offs=offsets))
    if lora is not None and lora.A_out is not None and lora.B_out is not None:
        y_ND = y_ND + _lora_grouped_mm(a_NF, mask_out_NF, lora.A_out, lora.B_out, lora, offsets)
    if b_out is not None:
        bias_ND = b_out[expert_of_row]
        y_ND = y_ND + (bias_ND if row_weights_N is None else bias_ND * row_weights_N[:, None])
    return y_ND


def _lora_grouped_mm(
    x_NI: Tensor, mask_NI: Tensor | None, A: Tensor, B: Tensor, lora: LoRATerms, offsets: Tensor
) -> Tensor:
    """``s * (x A^T) B^T`` per segment as two ``torch._grouped_mm`` (``I``: the projection's input width).

    The factors are spread to one per expert (zero for experts without an adapter):
    ``E r (I + O)`` values, small next to the weights.
    """
    slots = torch.tensor(lora.slot_of_expert, device=x_NI.device)
    has_adapter_E = (slots >= 0).to(A.dtype)[:, None, None]
    A_E, B_E = A[slots.clamp(min=0)] * has_adapter_E, B[slots.clamp(min=0)] * has_adapter_E
    x_lora = x_NI if mask_NI is None else x_NI * mask_NI
    u_Nr = torch._grouped_mm(x_lora, A_E.transpose(-2, -1), offs=offsets)
    delta: Tensor = contiguous_grad(torch._grouped_mm(u_Nr, B_E.transpose(-2, -1), offs=offsets))
    return delta * lora.scaling


def grouped_ffn_grouped_mm_rows(
    x_SD: Tensor,
    counts_E: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_S: Tensor | None = None,
) -> Tensor:
    """``grouped_ffn_grouped_mm`` on the first ``sum(counts_E)`` rows, zero after them (no host sync).

    The rows after the kept ones join the last expert's group (``_grouped_mm`` leaves
    rows outside every group undefined) with a routing weight of zero, so they add
    exactly nothing to the output or to any gradient.
    """
    S = x_SD.shape[0]
    ends = counts_E.cumsum(0, dtype=torch.int32)
    row_ids = torch.arange(S, device=x_SD.device, dtype=torch.int32)
    kept_S = row_ids < ends[-1]
    offsets = torch.cat([ends[:-1], ends.new_full((1,), S)])
    expert_of_row = torch.searchsorted(ends, row_ids, right=True).clamp(max=len(counts_E) - 1)
    h_SH = torch._grouped_mm(x_SD, w_in.transpose(-2, -1), offs=offsets)
    if b_in is not None:
        h_SH = h_SH + b_in[expert_of_row]
    scale_S = kept_S.to(x_SD.dtype) if row_weights_S is None else row_weights_S * kept_S
    a_SF = activate(h_SH, activation) * scale_S[:, None]
    y_SD: Tensor = contiguous_grad(torch._grouped_mm(a_SF, w_out.transpose(-2, -1), offs=offsets))
    if b_out is not None:
        y_SD = y_SD + b_out[expert_of_row] * scale_S[:, None]
    return y_SD


_BACKENDS = {"loop": grouped_ffn_loop, "fused": grouped_ffn_fused, "grouped_mm": grouped_ffn_grouped_mm}


def grouped_ffn(
    backend: str,
    x_ND: Tensor,
    counts: list[int],
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
    lora: LoRATerms | None = None,
) -> Tensor:
    """Run the named backend (``auto`` is resolved by the caller); ``lora`` adds adapters' terms."""
    return _BACKENDS[backend](x_ND, counts, w_in, w_out, b_in, b_out, activation, row_weights_N, lora)
