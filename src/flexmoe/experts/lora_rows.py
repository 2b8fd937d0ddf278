"""The LoRA terms of a multi-adapter batch on CPU, summed in place (``lora_rows.c``).

Legend: L slots (an adapter's version of one expert), r rank, I input and O output
channels, P output blocks, N rows.

``lora_add`` runs every slot of a LoRA stack in one call over PyTorch's OpenMP team:
each slot's factors are read once for blocks of up to 8 of its rows and the sums go
straight into the output rows (S-LoRA's and Punica's segmented product), fp32 or bf16
with fp32 sums. ``flexmoe.adapters.woven`` uses it for inference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flexmoe.experts.kernels import available, library

__all__ = ["lora_add", "takes_lora"]

_LORA_MAX_RANK = 1024  # LORA_MAX_RANK of lora_rows.c: the low-rank vectors live on the stack


def takes_lora(x_NI: Tensor, rows_n: Tensor, A_LrI: Tensor, B_LOr: Tensor, out_PNO: Tensor) -> bool:
    """Whether ``lora_add`` adds these LoRA terms.

    On CPU, fp32 or bf16 throughout, rank at most 1024, rows as int64, unit column
    strides, and each slot's factors stored transposed (``A^T [I, r]`` and ``B^T [r, O]``
    contiguous: ``flexmoe.adapters.woven.bag_layout``).
    """
    dtype = x_NI.dtype
    tensors = (x_NI, A_LrI, B_LOr, out_PNO)
    return (
        dtype in (torch.float32, torch.bfloat16)
        and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and rows_n.device.type == "cpu"
        and rows_n.dtype == torch.int64
        and rows_n.dim() == 1
        and x_NI.dim() == 2
        and out_PNO.dim() == 3
        and A_LrI.dim() == 3
        and B_LOr.dim() == 3
        and A_LrI.shape[0] == B_LOr.shape[0]
        and 1 <= A_LrI.shape[1] == B_LOr.shape[2] <= _LORA_MAX_RANK
        and A_LrI.shape[2] == x_NI.shape[1]
        and B_LOr.shape[1] == out_PNO.shape[0] * out_PNO.shape[2]
        and x_NI.stride(1) == 1
        and out_PNO.stride(2) == 1
        and A_LrI.transpose(1, 2).is_contiguous()
        and B_LOr.transpose(1, 2).is_contiguous()
        and available()
    )


def lora_add(
    x_NI: Tensor, rows_n: Tensor, counts_L: np.ndarray, A_LrI: Tensor, B_LOr: Tensor, out_PNO: Tensor
) -> None:
    """``out[:, row] += B[l] A[l] x[row]`` for each row of each slot ``l``; check ``takes_lora`` first.

    ``rows_n`` lists the rows slot by slot (``counts_L[l]`` rows of slot ``l``); each row
    appears once and indexes both ``x_NI`` and ``out_PNO``. The ``O`` outputs of a row are
    ``out``'s ``P`` blocks of ``O / P`` columns (``P = 1``: a plain ``[1, N, O]`` view).
    Sums in fp32; a bf16 ``out`` is rounded once.
    """
    kernels = library()
    assert kernels is not None and takes_lora(x_NI, rows_n, A_LrI, B_LOr, out_PNO)
    rows_n = rows_n.contiguous()
    starts = np.zeros(len(counts_L) + 1, dtype=np.int64)
    np.cumsum(counts_L, out=starts[1:])
    if starts[-1] != rows_n.shape[0] or len(counts_L) != A_LrI.shape[0]:
        raise ValueError(
            f"counts_L: {len(counts_L)} slots of {int(starts[-1])} rows in all expected for "
            f"{A_LrI.shape[0]} slots of factors and {rows_n.shape[0]} rows"
        )
    limit = min(x_NI.shape[0], out_PNO.shape[1])
    if rows_n.numel() and not (int(rows_n.min()) >= 0 and int(rows_n.max()) < limit):
        raise IndexError(f"rows_n: row indices in [0, {limit}) expected")
    slots, rank, width_in = A_LrI.shape
    status = kernels.flexmoe_lora_add(
        int(x_NI.dtype == torch.bfloat16),
        x_NI.data_ptr(),
        x_NI.stride(0),
        rows_n.data_ptr(),
        starts.ctypes.data,
        slots,
        A_LrI.data_ptr(),
        B_LOr.data_ptr(),
        width_in,
        rank,
        B_LOr.shape[1],
        out_PNO.data_ptr(),
        out_PNO.stride(1),
        out_PNO.shape[2],
        out_PNO.stride(0),
    )
    assert status == 0, "takes_lora admitted a rank or block width lora_rows.c refuses"
