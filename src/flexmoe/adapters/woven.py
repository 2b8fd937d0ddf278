"""The expert FFN of a multi-adapter batch: base experts with LoRA terms on sub-segments.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E base experts, L LoRA slots of one stack, r rank, G groups.

In a multi-adapter batch the rows of base expert ``j`` are sorted as ``[base rows of j,
rows of adapter a1's LoRA version of j, rows of a2's, ...]``, so one grouped GEMM over
the ``E`` base-expert groups (the base weights as they are, never copied or gathered)
computes every row's base projection, and each adapter's low-rank term is added on its
own sub-segment: the rows of a LoRA stack's slots are gathered, run as two grouped GEMMs
over the slots' factors, and added back (``index_add``). Plain autograd throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flexmoe.experts.activations import activate
from flexmoe.experts.backends import contiguous_grad
from flexmoe.experts.ffn import resolve_backend

__all__ = ["Groups", "LoRAPart", "segment_matmul", "woven_ffn"]


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
        """Each row's group ``[N]`` (on the device)."""
        device = self.counts_device.device
        groups = torch.arange(len(self.counts_G), device=device)
        return torch.repeat_interleave(groups, self.counts_device, output_size=num_rows)


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
        """``(x_rows A^T) B^T`` slot by slot, ``[n, O]``."""
        u = segment_matmul(x_NI.index_select(0, self.rows_n), self.A, self.slots, backend)
        return segment_matmul(u, self.B, self.slots, backend)


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
    (``grouped_mm`` or a loop over the groups); the LoRA GEMMs use ``torch._grouped_mm``
    where it runs unless ``backend`` is ``"loop"``.
    """
    # The thin LoRA GEMMs run over many small slots (adapters x experts): one
    # torch._grouped_mm wherever it runs beats a Python loop over them, also on CPU
    # (where the base GEMMs keep the experts' backend); "loop" stays the plain reference.
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
