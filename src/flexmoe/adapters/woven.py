"""The expert FFN of a multi-adapter batch: base experts with LoRA terms on sub-segments.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E base experts, L LoRA slots of one stack, r rank, G groups,
n rows of one LoRA stack, P first-projection blocks (2 gated, else 1).

In a multi-adapter batch the rows of base expert ``j`` are sorted as ``[base rows of j,
rows of adapter a1's LoRA version of j, rows of a2's, ...]``, so one grouped GEMM over
the ``E`` base-expert groups (the base weights as they are, never copied or gathered)
computes every row's base projection, and each adapter's low-rank term is added on its
own sub-segment: the rows of a LoRA stack's slots are gathered and their terms computed
for all slots at once (``LoRAPart.delta``), then added back.

Two forms of the same math: ``woven_ffn`` under plain autograd (the reference, and the
``grouped_mm`` path), and ``woven_inference`` without autograd on the fused backend's
layout, which also runs the ESFT experts' groups in the same pass and adds the LoRA
terms in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.experts.activations import activate
from flexmoe.experts.backends import contiguous_grad, stacked_inference
from flexmoe.experts.ffn import resolve_backend
from flexmoe.experts.lora_rows import lora_add, takes_lora
from flexmoe.experts.segments import for_each_segment
from flexmoe.experts.stacks import ExpertTensors

__all__ = [
    "BAG_INDICES",
    "BAG_SLOT_WIDTHS",
    "GATHER_BYTES_PER_SLOT",
    "GATHER_ROWS_PER_SLOT",
    "Groups",
    "LoRAPart",
    "bag_layout",
    "bagged_lora",
    "gathered_lora",
    "in_bag_layout",
    "segment_matmul",
    "woven_ffn",
    "woven_inference",
]

# A LoRA stack's rows read their own factors (BGMV) while they average few rows per
# non-empty slot, else the slots run as grouped GEMMs (a pair of small GEMMs per slot).
# On CPU, with the factors in ``bag_layout``, the rows sum them in place with
# ``embedding_bag`` (``bagged_lora``) while rows x (I + O) per non-empty slot stay under
# BAG_SLOT_WIDTHS. Measured at rank 8 over 640 slots against the grouped GEMMs, the
# forms break even at about 16 rows per slot with 512 / 384 wide projections, 14 with
# 192 / 512 and 7 with 2048 / 1536 (rank 32 and 64: about 32 with 512 / 384); at 8 rows
# and 512 / 384 the sums take 0.55x the time. Elsewhere each row gathers copies of
# its factors for two batched products (``gathered_lora``) while they average at most
# GATHER_ROWS_PER_SLOT rows or GATHER_BYTES_PER_SLOT bytes of gathered factors: decode
# sizes ran 2-5x faster so, and both forms broke even at about 3 rows per slot with
# 512 / 384 wide projections and 6 with 128 / 128. Without autograd on CPU (fp32, bf16),
# factors in ``bag_layout`` go to ``flexmoe.experts.lora_rows.lora_add`` instead (each slot's
# factors read once for all its rows, summed into the output in place): at rank 8 over
# 640 slots, 3.2-3.9x faster than ``bagged_lora`` plus its ``index_add_`` at 8 rows per
# slot, 1.7-2.0x at one row (benchmarks/lora_rows.py).
BAG_SLOT_WIDTHS = 8192
GATHER_ROWS_PER_SLOT = 2
GATHER_BYTES_PER_SLOT = 32 * 1024
# bagged_lora takes rows in chunks of about this many indices: a larger index tensor (and
# its gathered rows) cost more in fresh pages than the sums themselves
BAG_INDICES = 1 << 18


class Groups:
    """Consecutive row groups: their sizes on the host (``counts_G``) and on the device (``counts_device``).

    The loops read the host sizes; ``torch._grouped_mm`` and the bias gathers read the
    device ones, computed there from the dispatch's counts, so that no host-to-device copy
    (on CUDA a stream synchronisation) happens per call. The end offsets are built once
    and shared by every GEMM over these groups.
    """

    def __init__(self, counts_G: np.ndarray, counts_device: Tensor) -> None:
        self.counts_G = counts_G
        self.counts_device = counts_device
        self._ends: Tensor | None = None
        self._nonempty: tuple[Tensor, Tensor] | None = None
        self._group_of_row: Tensor | None = None

    @property
    def ends(self) -> Tensor:
        """``cumsum(counts)`` as int32 on the device (``torch._grouped_mm``'s ``offs``)."""
        if self._ends is None:
            self._ends = self.counts_device.cumsum(0, dtype=torch.int32)
        return self._ends

    def nonempty(self) -> tuple[Tensor, Tensor]:
        """The non-empty groups' indices and their ``cumsum`` end offsets (int32), on the device."""
        if self._nonempty is None:
            index = torch.from_numpy(np.flatnonzero(self.counts_G)).to(self.counts_device.device)
            ends = self.counts_device.index_select(0, index).cumsum(0, dtype=torch.int32)
            self._nonempty = (index, ends)
        return self._nonempty

    def group_of_row(self, num_rows: int) -> Tensor:
        """Each row's group ``[N]`` (on the device; built once, ``num_rows`` must be ``sum(counts)``)."""
        if self._group_of_row is None:
            device = self.counts_device.device
            groups = torch.arange(len(self.counts_G), device=device)
            self._group_of_row = torch.repeat_interleave(groups, self.counts_device, output_size=num_rows)
        return self._group_of_row


def segment_matmul(x_NI: Tensor, w_GOI: Tensor, groups: Groups, backend: str = "auto") -> Tensor:
    """``x[rows of group g] @ w[g]^T`` for the consecutive row ``groups``: ``[N, O]``.

    One ``torch._grouped_mm`` where ``backend`` resolves to ``grouped_mm`` for these widths
    (see ``flexmoe.experts.ffn.resolve_backend``), else one GEMM per non-empty group.
    """
    N = x_NI.shape[0]
    if N == 0:
        return x_NI.new_zeros(0, w_GOI.shape[1])
    widths = (w_GOI.shape[2], w_GOI.shape[1])
    if resolve_backend(backend, x_NI.device, x_NI.dtype, widths) == "grouped_mm":
        w, ends = w_GOI, groups.ends
        if x_NI.device.type == "cpu" and not groups.counts_G.all():
            # On CPU torch._grouped_mm steps through every group, empty ones included:
            # many adapters x experts, few rows each, leave most of them empty.
            index, ends = groups.nonempty()
            w = w_GOI.index_select(0, index)
        y: Tensor = torch._grouped_mm(x_NI.contiguous(), w.transpose(-2, -1), offs=ends)
        return contiguous_grad(y)
    counts = groups.counts_G
    starts = np.cumsum(counts) - counts
    outputs = [
        F.linear(x_NI[int(starts[g]) : int(starts[g] + counts[g])], w_GOI[g])
        for g in np.flatnonzero(counts).tolist()
    ]
    return torch.cat(outputs)


def gathered_lora(x_nI: Tensor, A_LrI: Tensor, B_LOr: Tensor, slots: Groups) -> Tensor:
    """``(x_n A[l]^T) B[l]^T`` for every row ``n`` of slot ``l``, ``[n, O]``, as two batched products.

    Punica's and S-LoRA's BGMV: each row gathers its slot's factors, then one batched
    matrix-vector product per factor runs all rows at once (no per-slot GEMM). The
    gathers copy ``r (I + O)`` values per row: cheap while slots hold a row or two.
    """
    slot_n = slots.group_of_row(x_nI.shape[0])
    u_n1r = torch.bmm(x_nI[:, None, :], A_LrI.index_select(0, slot_n).transpose(1, 2))
    return torch.bmm(u_n1r, B_LOr.index_select(0, slot_n).transpose(1, 2))[:, 0]


def bag_layout(A_LrI: Tensor, B_LOr: Tensor) -> tuple[Tensor, Tensor]:
    """The factors with each slot's ``A^T [I, r]`` and ``B^T [r, O]`` contiguous (same shapes, views).

    In this layout ``bagged_lora`` reads each row's factors as rows of two embedding
    tables, and the grouped GEMMs take the transposed views as they are.
    """
    A_LIr = A_LrI.transpose(1, 2).contiguous()
    B_LrO = B_LOr.transpose(1, 2).contiguous()
    return A_LIr.transpose(1, 2), B_LrO.transpose(1, 2)


def in_bag_layout(A_LrI: Tensor, B_LOr: Tensor) -> bool:
    """Whether the factors are stored as ``bag_layout`` makes them."""
    return A_LrI.transpose(1, 2).is_contiguous() and B_LOr.transpose(1, 2).is_contiguous()


def bagged_lora(x_NI: Tensor, rows_n: Tensor, A_LrI: Tensor, B_LOr: Tensor, slots: Groups) -> Tensor:
    """``gathered_lora`` of the rows ``rows_n`` of ``x_NI``: sums over factors in ``bag_layout``.

    ``u_n = sum_i x_n[i] A^T[slot_n][i]`` (a bag of the ``I`` rows of the slot's ``A^T``,
    weighted by the row's values), then ``sum_j u_n[j] B^T[slot_n][j]``: each row reads
    its factors where they lie, no copies of them. Rows go in chunks of about
    ``BAG_INDICES`` indices.
    """
    L, rank, width_in = A_LrI.shape
    width_out = B_LOr.shape[1]
    A_table = A_LrI.transpose(1, 2).view(L * width_in, rank)
    B_table = B_LOr.transpose(1, 2).view(L * rank, width_out)
    device = x_NI.device
    cols_I = torch.arange(width_in, device=device, dtype=torch.int32)
    cols_r = torch.arange(rank, device=device, dtype=torch.int32)
    # int32: half the index bytes of int64
    slot_n1 = slots.group_of_row(rows_n.shape[0]).to(torch.int32)[:, None]
    chunk = max(1, BAG_INDICES // width_in)
    deltas = []
    for start in range(0, rows_n.shape[0], chunk):
        slot_c1 = slot_n1[start : start + chunk]
        x_cI = x_NI.index_select(0, rows_n[start : start + chunk])
        u_cr = F.embedding_bag(slot_c1 * width_in + cols_I, A_table, mode="sum", per_sample_weights=x_cI)
        delta = F.embedding_bag(slot_c1 * rank + cols_r, B_table, mode="sum", per_sample_weights=u_cr)
        deltas.append(delta)
    return deltas[0] if len(deltas) == 1 else torch.cat(deltas)


@dataclass(frozen=True)
class LoRAPart:
    """One LoRA stack's share of a call: its slots' rows and factors.

    ``rows_n``: the rows (of the main part) of the stack's slots, slot by slot;
    ``slots``: rows per slot; ``A [L, r, I]`` and ``B [L, O, r]`` the slots' factors
    (``B`` already scaled by ``alpha / r``); ``target``: ``"w_in"`` or ``"w_out"``.
    """

    target: str
    rows_n: Tensor
    slots: Groups
    A: Tensor
    B: Tensor

    def delta(self, x_NI: Tensor, backend: str) -> Tensor:
        """``(x_rows A^T) B^T`` slot by slot, ``[n, O]``.

        ``backend="loop"``: one GEMM per slot (the reference); otherwise each row reads
        its own factors where the slots hold few rows each (``bagged_lora`` on CPU with
        factors in ``bag_layout``, else ``gathered_lora``), else grouped GEMMs over the
        slots with rows.
        """
        if backend != "loop" and self.bags():
            return bagged_lora(x_NI, self.rows_n, self.A, self.B, self.slots)
        x_nI = x_NI.index_select(0, self.rows_n)
        if backend != "loop" and self.gathers():
            return gathered_lora(x_nI, self.A, self.B, self.slots)
        u = segment_matmul(x_nI, self.A, self.slots, backend)
        return segment_matmul(u, self.B, self.slots, backend)

    def add_to(self, x_NI: Tensor, out_PNO: Tensor, backend: str = "grouped_mm") -> None:
        """``out[:, rows] += (x_rows A^T) B^T`` slot by slot, in place (each row's outputs as ``P`` blocks).

        ``out_PNO``: ``[P, N, O / P]`` (a gated expert's pre-activation keeps gate and up
        apart; ``P = 1`` for a plain ``[N, O]`` output, viewed as ``[1, N, O]``). On CPU,
        where nothing needs a gradient, ``flexmoe.experts.lora_rows.lora_add`` sums each slot's
        rows straight into ``out`` (each slot's factors read once for all its rows);
        otherwise ``delta`` with ``backend``, added with ``index_add_``.
        """
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_NI, self.A, self.B))
        if backend != "loop" and not needs_grad and takes_lora(x_NI, self.rows_n, self.A, self.B, out_PNO):
            lora_add(x_NI, self.rows_n, self.slots.counts_G, self.A, self.B, out_PNO)
            return
        P, _, width = out_PNO.shape
        out_PNO.index_add_(1, self.rows_n, self.delta(x_NI, backend).view(-1, P, width).transpose(0, 1))

    def split(self, pieces: int) -> list[LoRAPart]:
        """The part as at most ``pieces`` parts over consecutive slots, with about equal rows each."""
        counts = self.slots.counts_G
        ends = np.cumsum(counts)
        n = int(ends[-1]) if len(ends) else 0
        if pieces <= 1 or n == 0:
            return [self]
        # each piece ends after the first slot whose rows reach its share of all rows
        cuts = np.searchsorted(ends, np.arange(1, pieces) * n / pieces) + 1
        bounds = [0, *sorted({min(int(c), len(counts)) for c in cuts}), len(counts)]
        split = []
        for l0, l1 in itertools.pairwise(bounds):
            r0, r1 = int(ends[l0 - 1]) if l0 else 0, int(ends[l1 - 1]) if l1 else 0
            if r1 > r0:
                slots = Groups(counts[l0:l1], self.slots.counts_device[l0:l1])
                split.append(LoRAPart(self.target, self.rows_n[r0:r1], slots, self.A[l0:l1], self.B[l0:l1]))
        return split

    def bags(self) -> bool:
        """Whether the rows sum their factors in place (``bagged_lora``).

        On CPU, with the factors in ``bag_layout``, while ``rows x (I + O)`` per non-empty
        slot averages at most ``BAG_SLOT_WIDTHS``.
        """
        if self.A.device.type != "cpu" or not in_bag_layout(self.A, self.B):
            return False
        widths = self.A.shape[2] + self.B.shape[1]
        nonempty = int(np.count_nonzero(self.slots.counts_G))
        return self.rows_n.shape[0] * widths <= BAG_SLOT_WIDTHS * nonempty

    def gathers(self) -> bool:
        """Whether the rows read their own factors, in place (``bags``) or gathered.

        Gathered: at most ``GATHER_ROWS_PER_SLOT`` rows, or ``GATHER_BYTES_PER_SLOT``
        bytes of factors, per non-empty slot.
        """
        if self.bags():
            return True
        nonempty = int(np.count_nonzero(self.slots.counts_G))
        n = self.rows_n.shape[0]
        _, rank, width_in = self.A.shape
        row_bytes = rank * (width_in + self.B.shape[1]) * self.A.element_size()
        return n <= GATHER_ROWS_PER_SLOT * nonempty or n * row_bytes <= GATHER_BYTES_PER_SLOT * nonempty


def woven_ffn(
    x_ND: Tensor,
    groups: Groups,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor,
    parts: list[LoRAPart],
    backend: str = "auto",
) -> Tensor:
    """``w * FFN_j(x)`` per row with its base expert ``j`` (the groups) plus its slot's LoRA terms.

    The rows of base expert ``j`` (group ``j`` of ``groups``) follow each other (base and
    LoRA rows alike); ``parts`` add each LoRA slot's terms to its rows: ``w_in`` parts to the
    pre-activation, ``w_out`` parts to the output (of the routing-weighted activation,
    as the backends do). ``backend``: the experts' backend for the base GEMMs
    (``grouped_mm`` or a loop over the groups); the LoRA terms use ``LoRAPart.delta``'s
    batched forms unless ``backend`` is ``"loop"``. Plain autograd throughout.
    """
    # The thin LoRA GEMMs run over many small slots (adapters x experts): batched forms
    # beat a Python loop over them, also on CPU (where the base GEMMs keep the experts'
    # backend); "loop" stays the plain reference.
    lora_backend = "loop" if backend == "loop" else "grouped_mm"
    # 1. first projection over the base-expert groups, plus the LoRA terms of w_in
    h_NH = segment_matmul(x_ND, w_in, groups, backend)
    group_N = None if b_in is None and b_out is None else groups.group_of_row(x_ND.shape[0])
    if b_in is not None and group_N is not None:
        h_NH = h_NH + b_in[group_N]
    for part in parts:
        if part.target == "w_in":
            h_NH = h_NH.index_add(0, part.rows_n, part.delta(x_ND, lora_backend))
    # 2. the routing-weighted activation (the backends' convention: weights before w_out)
    a_NF = activate(h_NH, activation) * row_weights_N[:, None]
    # 3. second projection, plus the LoRA terms of w_out
    y_ND = segment_matmul(a_NF, w_out, groups, backend)
    if b_out is not None and group_N is not None:
        y_ND = y_ND + b_out[group_N] * row_weights_N[:, None]
    for part in parts:
        if part.target == "w_out":
            y_ND = y_ND.index_add(0, part.rows_n, part.delta(a_NF, lora_backend))
    return y_ND


def woven_inference(
    x_ND: Tensor,
    counts: list[int],
    stacks: Sequence[ExpertTensors],
    activation: str,
    row_weights_N: Tensor,
    parts: list[LoRAPart],
    lora_groups: Collection[int] | None = None,
) -> Tensor:
    """``woven_ffn`` without autograd, on the fused backend's inference layout, over several stacks.

    ``flexmoe.experts.backends.stacked_inference`` runs the groups on the experts of
    ``stacks`` (the base experts, then the ESFT experts: one pass over every row); the
    LoRA terms of ``parts`` (rows of the base groups) are computed for all their rows at
    once and added in place, into the first projection and into the output.
    ``lora_groups``: the groups holding the parts' rows (``None``: any may), the only
    ones that need their projections apart.
    """

    def add_in(h_1NH: Tensor) -> None:
        add_lora_terms(parts, "w_in", x_ND, h_1NH)

    def add_out(a_NF: Tensor, y_ND: Tensor) -> None:
        add_lora_terms(parts, "w_out", a_NF, y_ND[None])

    return stacked_inference(x_ND, counts, stacks, activation, row_weights_N, add_in, add_out, lora_groups)


def add_lora_terms(parts: list[LoRAPart], target: str, x_NI: Tensor, out_PNO: Tensor) -> None:
    """Add the LoRA terms of the parts of ``target`` into ``out_PNO`` in place (``LoRAPart.add_to``).

    A part the CPU kernel takes (``flexmoe.experts.lora_rows.takes_lora``), or whose rows read
    their own factors (``gathers``), is one call (threaded inside). A part of grouped
    GEMMs is one tiny GEMM per slot, which gains nothing from splitting each GEMM over
    threads (on 2 threads of a busy machine it ran 4-5x slower than on one); on CPU it is
    split into pieces of consecutive slots spread over the threads instead, like the base
    experts' segments, each on one thread (each piece adds into its own rows).
    """
    pieces: list[LoRAPart] = []
    threads = torch.get_num_threads() if x_NI.device.type == "cpu" else 1
    for part in parts:
        if part.target != target:
            continue
        if takes_lora(x_NI, part.rows_n, part.A, part.B, out_PNO) or part.gathers():
            part.add_to(x_NI, out_PNO)
        else:
            pieces += part.split(4 * threads)

    def run(i: int, start: int, end: int) -> None:
        pieces[i].add_to(x_NI, out_PNO)

    for_each_segment(
        [(i, 0, len(piece.rows_n)) for i, piece in enumerate(pieces)], run, x_NI.device, x_NI.dtype
    )
