"""A few rows times a plain bf16 or int8 weight, read once: the decoding products on CPUs.

Legend: N rows, O output channels, I input channels.

Decoding multiplies one row (or a few) by each weight it uses, and the time is the time
to stream the weight from memory. PyTorch's CPU kernels for that case either need the
weight repacked first (oneDNN's packed layout: a conversion whose fresh memory faults in
on first touch, milliseconds per expert read from disk) or compute slower than memory
delivers (``torch._weight_int8pack_mm``). ``rows.c`` streams the plain row-major weight
and splits its output rows over PyTorch's own OpenMP threads. Both kernels take bf16
rows: bf16 weights run on AVX512-BF16 dot products with fp32 sums (up to 2 rows; beyond
that the vector units, not memory, set the pace), or on AMX tiles where the CPU has
them (up to 32 rows at memory speed; ``flexmoe.experts.kernels.tile_kernels``); int8 weights (one scale per
output row) on AVX512-VNNI integer ones, each row of ``x`` rounded to 16-bit fixed point
first (an error of at most ``max|x_row| / 65534`` per element, far below the weights'
int8 rounding and the bf16 output's).

``rows_bf16`` and ``rows_int8`` are one product; ``expert_bf16`` and ``expert_int8`` one
decoding expert in one call (both products and the activation, which is applied to the
fp32 sums and rounded once), which spares a decode step a few Python calls per expert;
``RowsLinear`` is an ``nn.Linear`` whose decoding products run on ``rows_bf16``.
``experts_bf16`` and ``rows_bf16_segments`` run many segments (a layer's decoding
experts) in one call, the loop over them in C.

The kernels are C, compiled on first use (``flexmoe.experts.kernels``); where they do
not run here (``available()`` is false) the callers keep PyTorch's kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.experts.kernels import available, bf16_max_rows, library

__all__ = [
    "FP32_LARGE_BYTES",
    "FP32_MAX_ROWS",
    "FP32_MAX_ROWS_LARGE",
    "INT8_MAX_ROWS",
    "RowsLinear",
    "expert_bf16",
    "expert_int8",
    "experts_bf16",
    "experts_bf16_at",
    "experts_int8_at",
    "rows_bf16",
    "rows_bf16_segments",
    "rows_fp32",
    "rows_int8",
    "takes_bf16",
    "takes_bf16_segments",
    "takes_expert_bf16",
    "takes_expert_int8",
    "takes_experts_bf16",
    "takes_experts_bf16_at",
    "takes_experts_int8_at",
    "takes_fp32",
    "takes_int8",
]

# Up to these row counts the fp32 row kernel beats PyTorch's fp32 GEMM on one thread: 4 rows
# of any weight, 12 rows of a weight of at least FP32_LARGE_BYTES. Measured on this CPU with
# weights larger than its caches: [2048, 768] 2.1x at 3 rows, 2.0x at 6, 1.6x at 12;
# [1536, 2048] 1.1x, 1.8x, 1.5x; [384, 512] 1.3x at 4 rows, 0.9x at 8 (the kernel avoids the
# GEMM's cliff past 3 rows, and falls behind it where the weight fits the caches).
FP32_MAX_ROWS = 4
FP32_MAX_ROWS_LARGE = 12
FP32_LARGE_BYTES = 4 << 20
# Beyond this row count torch._weight_int8pack_mm is as fast (measured on an AVX512-VNNI
# CPU with weights larger than its caches).
INT8_MAX_ROWS = 16
# The activation codes of rows.c (gated ones apply the base function to the gate half).
_ACTIVATION_KINDS = {"silu": 0, "swiglu": 0, "gelu": 1, "geglu": 1, "relu": 2}


def _takes(x_NI: Tensor, weight: Tensor, dtype: torch.dtype, max_rows: int) -> bool:
    return (
        x_NI.device.type == "cpu"
        and weight.device.type == "cpu"
        and x_NI.dim() == 2
        and 1 <= x_NI.shape[0] <= max_rows
        and weight.dim() == 2
        and weight.dtype == dtype
        and weight.shape[1] == x_NI.shape[1]
        and weight.shape[0] > 0
        and weight.is_contiguous()
        and available()
    )


def takes_bf16(x_NI: Tensor, w_OI: Tensor) -> bool:
    """Whether ``rows_bf16`` computes ``x @ w^T``: bf16 on CPU, ``1..bf16_max_rows()`` rows, plain ``w``."""
    return x_NI.dtype == torch.bfloat16 and _takes(x_NI, w_OI, torch.bfloat16, bf16_max_rows())


def takes_int8(x_NI: Tensor, q_OI: Tensor) -> bool:
    """Whether ``rows_int8`` computes ``x @ (q * scale)^T``: bf16 ``x`` on CPU, ``1..INT8_MAX_ROWS`` rows.

    Not fp32 ``x``: its 16-bit fixed-point rounding would be coarser than fp32 outputs.
    """
    return x_NI.dtype == torch.bfloat16 and _takes(x_NI, q_OI, torch.int8, INT8_MAX_ROWS)


def _takes_expert(
    x_ND: Tensor, w_in_HD: Tensor, w_out_DF: Tensor, activation: str, dtype: torch.dtype, max_rows: int
) -> bool:
    if activation not in _ACTIVATION_KINDS or w_out_DF.dim() != 2 or x_ND.dtype != torch.bfloat16:
        return False
    D, F = w_out_DF.shape
    return (
        _takes(x_ND, w_in_HD, dtype, max_rows)
        and w_in_HD.shape[0] == F * (2 if activation in GATED_ACTIVATIONS else 1)
        and x_ND.shape[1] == D
        and F > 0
        and w_out_DF.dtype == dtype
        and w_out_DF.device.type == "cpu"
        and w_out_DF.is_contiguous()
    )


def takes_expert_bf16(x_ND: Tensor, w_in_HD: Tensor, w_out_DF: Tensor, activation: str) -> bool:
    """Whether ``expert_bf16`` computes this expert: ``takes_bf16`` for both products, a known activation."""
    return _takes_expert(x_ND, w_in_HD, w_out_DF, activation, torch.bfloat16, bf16_max_rows())


def takes_expert_int8(x_ND: Tensor, q_in_HD: Tensor, q_out_DF: Tensor, activation: str) -> bool:
    """Whether ``expert_int8`` computes this expert: ``takes_int8`` for both products, a known activation."""
    return _takes_expert(x_ND, q_in_HD, q_out_DF, activation, torch.int8, INT8_MAX_ROWS)


def expert_bf16(
    x_ND: Tensor, w_in_HD: Tensor, w_out_DF: Tensor, activation: str, row_weights_N: Tensor | None = None
) -> Tensor:
    """One expert on a few bf16 rows in one call: ``(act(x @ w_in^T) * row_weight) @ w_out^T``.

    ``w_in`` is ``[H, D]`` (``[gate; up]`` for gated activations), ``w_out`` ``[D, F]``;
    check ``takes_expert_bf16`` first. The activation, its product with ``up`` and the
    row weight are applied to the fp32 sums and rounded to bf16 once, before the second
    product.
    """
    kernels = library()
    assert kernels is not None
    weights = [w_in_HD.data_ptr(), w_out_DF.data_ptr()]
    return _one_expert(kernels.flexmoe_expert_bf16, x_ND, weights, w_out_DF.shape, activation, row_weights_N)


def expert_int8(
    x_ND: Tensor,
    q_in_HD: Tensor,
    scale_in_H: Tensor,
    q_out_DF: Tensor,
    scale_out_D: Tensor,
    activation: str,
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """``expert_bf16`` for int8 weights with one scale per output channel; check ``takes_expert_int8``.

    ``x`` and the activations are rounded to 16-bit fixed point before each product
    (as ``rows_int8`` does).
    """
    kernels = library()
    assert kernels is not None
    scales = [_fp32(scale) for scale in (scale_in_H, scale_out_D)]
    weights = [q_in_HD.data_ptr(), scales[0].data_ptr(), q_out_DF.data_ptr(), scales[1].data_ptr()]
    return _one_expert(kernels.flexmoe_expert_int8, x_ND, weights, q_out_DF.shape, activation, row_weights_N)


def _one_expert(
    function: Any,
    x_ND: Tensor,
    weights: list[int],
    shape_DF: torch.Size,
    activation: str,
    row_weights_N: Tensor | None,
) -> Tensor:
    """Call ``flexmoe_expert_*`` with the pointers of ``weights`` (kept alive by the caller)."""
    x_ND = x_ND.contiguous()
    rows, (D, F) = x_ND.shape[0], shape_DF
    weights_N = None if row_weights_N is None else _fp32(row_weights_N)
    y_ND = torch.empty(rows, D, dtype=torch.bfloat16)
    gated = int(activation in GATED_ACTIVATIONS)
    kind = _ACTIVATION_KINDS[activation]
    row_pointer = None if weights_N is None else weights_N.data_ptr()
    status = function(x_ND.data_ptr(), rows, *weights, D, F, gated, kind, row_pointer, y_ND.data_ptr())
    if status != 0:
        raise MemoryError(f"{function.__name__}: no memory for the scratch copies of {rows} rows")
    return y_ND


def takes_fp32(x_NI: Tensor, w_OI: Tensor) -> bool:
    """Whether ``rows_fp32`` computes ``x @ w^T``: fp32 on CPU, a few rows (FP32_MAX_ROWS), plain ``w``."""
    large = w_OI.numel() * w_OI.element_size() >= FP32_LARGE_BYTES
    most = FP32_MAX_ROWS_LARGE if large else FP32_MAX_ROWS
    return x_NI.dtype == torch.float32 and x_NI.is_contiguous() and _takes(x_NI, w_OI, torch.float32, most)


def rows_fp32(x_NI: Tensor, w_OI: Tensor, out: Tensor | None = None) -> Tensor:
    """``x @ w^T`` in fp32, ``[N, I] -> [N, O]``, into a contiguous ``out`` if given; check ``takes_fp32``."""
    kernels = library()
    assert kernels is not None and takes_fp32(x_NI, w_OI)
    rows, (outputs, inputs) = x_NI.shape[0], w_OI.shape
    y_NO = torch.empty(rows, outputs, dtype=torch.float32) if out is None else out
    if y_NO.shape != (rows, outputs) or not y_NO.is_contiguous() or y_NO.dtype != torch.float32:
        raise ValueError(
            f"out: a contiguous fp32 tensor of shape {[rows, outputs]} expected, got {list(y_NO.shape)}"
        )
    kernels.flexmoe_rows_fp32(x_NI.data_ptr(), rows, w_OI.data_ptr(), outputs, inputs, y_NO.data_ptr())
    return y_NO


def rows_bf16(x_NI: Tensor, w_OI: Tensor) -> Tensor:
    """``x @ w^T`` in bf16 (fp32 sums), ``[N, I] -> [N, O]``; check ``takes_bf16`` first."""
    kernels = library()
    assert kernels is not None and takes_bf16(x_NI, w_OI)
    x_NI = x_NI.contiguous()
    rows, (outputs, inputs) = x_NI.shape[0], w_OI.shape
    y_NO = torch.empty(rows, outputs, dtype=torch.bfloat16)
    pointers = (x_NI.data_ptr(), rows, w_OI.data_ptr(), outputs, inputs, y_NO.data_ptr())
    status = kernels.flexmoe_rows_bf16(*pointers)
    if status != 0:
        raise MemoryError(f"rows_bf16: no memory for the packed copy of {rows} x {inputs} rows")
    return y_NO


def _row_pointers(t: Tensor, first: np.ndarray) -> np.ndarray:
    """The addresses of entries ``first`` along ``t``'s first dimension (int64)."""
    return t.data_ptr() + first.astype(np.int64) * (t.stride(0) * t.element_size())


def _segments_fit(x_NI: Tensor, counts: np.ndarray) -> bool:
    return (
        x_NI.dim() == 2
        and x_NI.is_contiguous()
        and len(counts) > 0
        and int(counts.min()) >= 1
        and int(counts.max()) <= bf16_max_rows()
        and int(counts.sum()) <= x_NI.shape[0]
    )


def _check_output(name: str, y: Tensor, shape: tuple[int, ...]) -> None:
    if y.shape != shape or not y.is_contiguous() or y.dtype != torch.bfloat16 or y.device.type != "cpu":
        raise ValueError(
            f"{name}: a contiguous bf16 CPU tensor of shape {list(shape)} expected, got "
            f"{y.dtype} {list(y.shape)} on {y.device}"
        )


def _check_segments(
    starts: np.ndarray, counts: np.ndarray, index: np.ndarray, rows: int, experts: int
) -> None:
    """Segments inside the rows and experts inside the stack: the C loop reads what it is given."""
    if not len(starts) == len(counts) == len(index):
        raise ValueError(
            f"starts, counts, index: one entry per segment, got {len(starts)}, {len(counts)}, {len(index)}"
        )
    if int(starts.min()) < 0 or int((starts + counts).max()) > rows:
        raise IndexError(f"starts: segments within the {rows} rows expected")
    if int(index.min()) < 0 or int(index.max()) >= experts:
        raise IndexError(f"index: experts in [0, {experts}) expected")


def takes_bf16_segments(x_NI: Tensor, counts: np.ndarray, w_EOI: Tensor) -> bool:
    """Whether ``rows_bf16_segments`` computes these: ``takes_bf16`` for each segment, contiguous rows."""
    return (
        w_EOI.dim() == 3
        and w_EOI.is_contiguous()
        and _segments_fit(x_NI, counts)
        and takes_bf16(x_NI[: int(counts.max())], w_EOI[0])
    )


def rows_bf16_segments(
    x_NI: Tensor, starts: np.ndarray, counts: np.ndarray, w_EOI: Tensor, index: np.ndarray, y_NO: Tensor
) -> None:
    """``y[s : s + c] = x[s : s + c] @ w[i]^T`` for every segment ``(s, c, i)``, in one call.

    ``rows_bf16`` on each segment (``starts``, ``counts`` and ``index`` into ``w``'s
    first dimension: one entry per segment), without returning to Python in between;
    check ``takes_bf16_segments`` first.
    """
    kernels = library()
    assert kernels is not None and takes_bf16_segments(x_NI, counts, w_EOI)
    _check_output("y_NO", y_NO, (x_NI.shape[0], w_EOI.shape[1]))
    _check_segments(starts, counts, index, x_NI.shape[0], w_EOI.shape[0])
    counts = counts.astype(np.int64)
    x, w, y = _row_pointers(x_NI, starts), _row_pointers(w_EOI, index), _row_pointers(y_NO, starts)
    outputs, inputs = w_EOI.shape[1:]
    status = kernels.flexmoe_rows_bf16_many(
        len(counts), x.ctypes.data, counts.ctypes.data, w.ctypes.data, outputs, inputs, y.ctypes.data
    )
    if status != 0:
        raise MemoryError(f"rows_bf16_segments: no memory for the packed copies of {len(counts)} segments")


def takes_experts_bf16(
    x_ND: Tensor, counts: np.ndarray, w_in_EHD: Tensor, w_out_EDF: Tensor, activation: str
) -> bool:
    """Whether ``experts_bf16`` computes these: ``takes_expert_bf16`` for each segment, contiguous rows."""
    return (
        w_in_EHD.dim() == 3
        and w_out_EDF.dim() == 3
        and w_in_EHD.is_contiguous()
        and w_out_EDF.is_contiguous()
        and _segments_fit(x_ND, counts)
        and takes_expert_bf16(x_ND[: int(counts.max())], w_in_EHD[0], w_out_EDF[0], activation)
    )


def experts_bf16(
    x_ND: Tensor,
    starts: np.ndarray,
    counts: np.ndarray,
    w_in_EHD: Tensor,
    w_out_EDF: Tensor,
    index: np.ndarray,
    activation: str,
    row_weights_N: Tensor | None,
    y_ND: Tensor,
) -> None:
    """``expert_bf16`` of expert ``i`` on rows ``[s, s + c)`` into ``y``, per segment ``(s, c, i)``: one call.

    ``row_weights_N`` (or ``None``) holds every row's weight; check ``takes_experts_bf16``
    first.
    """
    assert takes_experts_bf16(x_ND, counts, w_in_EHD, w_out_EDF, activation)
    _check_segments(starts, counts, index, x_ND.shape[0], w_in_EHD.shape[0])
    kernels = library()
    assert kernels is not None
    weights = [_row_pointers(w_in_EHD, index), _row_pointers(w_out_EDF, index)]
    function = kernels.flexmoe_expert_bf16_many
    _experts_call(
        function, x_ND, starts, counts, weights, w_out_EDF.shape[1:], activation, row_weights_N, y_ND
    )


def takes_experts_bf16_at(
    x_ND: Tensor, counts: np.ndarray, weights: Sequence[tuple[Tensor, Tensor]], activation: str
) -> bool:
    """Whether ``experts_bf16_at`` computes these: ``takes_expert_bf16`` for each pair, one shape."""
    if not weights or len(weights) != len(counts) or not _segments_fit(x_ND, counts):
        return False
    w_in, w_out = weights[0]
    if not takes_expert_bf16(x_ND[: int(counts.max())], w_in, w_out, activation):
        return False
    return _like_the_first(weights, (0, 1))


def _like_the_first(weights: Sequence[Sequence[Tensor]], positions: tuple[int, ...]) -> bool:
    """Whether every expert's tensors at ``positions`` match the first expert's in shape, dtype, device."""
    first = weights[0]
    return all(
        w[i].shape == first[i].shape
        and w[i].dtype == first[i].dtype
        and w[i].device == first[i].device
        and w[i].is_contiguous()
        for w in weights[1:]
        for i in positions
    )


def experts_bf16_at(
    x_ND: Tensor,
    starts: np.ndarray,
    counts: np.ndarray,
    weights: Sequence[tuple[Tensor, Tensor]],
    activation: str,
    row_weights_N: Tensor | None,
    y_ND: Tensor,
) -> bool:
    """``experts_bf16`` for experts held apart: segment ``k`` runs on ``weights[k] = (w_in, w_out)``.

    The experts of an offloaded layer live in separate cache entries, not in one stack.
    Returns False, computing nothing, where the kernels do not take these
    (``takes_experts_bf16_at``): checked here once, not by the caller first.
    """
    if not takes_experts_bf16_at(x_ND, counts, weights, activation):
        return False
    kernels = library()
    assert kernels is not None
    _check_starts(starts, counts, x_ND.shape[0])
    function = kernels.flexmoe_expert_bf16_many
    pointers = _addresses(weights)
    _experts_call(
        function, x_ND, starts, counts, pointers, weights[0][1].shape, activation, row_weights_N, y_ND
    )
    return True


def takes_experts_int8_at(
    x_ND: Tensor,
    counts: np.ndarray,
    weights: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
    activation: str,
) -> bool:
    """Whether ``experts_int8_at`` computes these: ``takes_expert_int8`` for each expert, one shape."""
    if not weights or len(weights) != len(counts) or not _segments_fit(x_ND, counts):
        return False
    q_in, _, q_out, _ = weights[0]
    if not takes_expert_int8(x_ND[: int(counts.max())], q_in, q_out, activation):
        return False
    return _like_the_first(weights, (0, 2))


def experts_int8_at(
    x_ND: Tensor,
    starts: np.ndarray,
    counts: np.ndarray,
    weights: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
    activation: str,
    row_weights_N: Tensor | None,
    y_ND: Tensor,
) -> bool:
    """``expert_int8`` of segment ``k`` on ``weights[k] = (q_in, scale_in, q_out, scale_out)``: one call.

    Returns False, computing nothing, where the kernels do not take these
    (``takes_experts_int8_at``), as ``experts_bf16_at`` does.
    """
    if not takes_experts_int8_at(x_ND, counts, weights, activation):
        return False
    kernels = library()
    assert kernels is not None
    _check_starts(starts, counts, x_ND.shape[0])
    fp32 = [tuple(t if i % 2 == 0 else _fp32(t) for i, t in enumerate(w)) for w in weights]
    function = kernels.flexmoe_expert_int8_many
    pointers = _addresses(fp32)  # fp32 holds the scales' copies alive through the call
    _experts_call(
        function, x_ND, starts, counts, pointers, weights[0][2].shape, activation, row_weights_N, y_ND
    )
    return True


def _fp32(t: Tensor) -> Tensor:
    """``t`` as contiguous fp32: itself where it is (checked, not dispatched: it runs per expert per call)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _addresses(weights: Sequence[Sequence[Tensor]]) -> list[np.ndarray]:
    """Per position of the tuples in ``weights``, the tensors' addresses (int64), one per expert."""
    return [np.array([w[i].data_ptr() for w in weights], dtype=np.int64) for i in range(len(weights[0]))]


def _check_starts(starts: np.ndarray, counts: np.ndarray, rows: int) -> None:
    if int(starts.min()) < 0 or int((starts + counts).max()) > rows:
        raise IndexError(f"starts: segments within the {rows} rows expected")


def _experts_call(
    function: Any,
    x_ND: Tensor,
    starts: np.ndarray,
    counts: np.ndarray,
    weights: list[np.ndarray],
    shape_DF: torch.Size,
    activation: str,
    row_weights_N: Tensor | None,
    y_ND: Tensor,
) -> None:
    """``flexmoe_expert_*_many`` on the segments, given the experts' weight addresses (one array each)."""
    _check_output("y_ND", y_ND, tuple(x_ND.shape))
    counts = counts.astype(np.int64)
    x, y = _row_pointers(x_ND, starts), _row_pointers(y_ND, starts)
    rows = None
    if row_weights_N is not None:
        row_weights_N = _fp32(row_weights_N)
        rows = _row_pointers(row_weights_N, starts)
    D, F = shape_DF
    status = function(
        len(counts),
        x.ctypes.data,
        counts.ctypes.data,
        *(w.ctypes.data for w in weights),
        D,
        F,
        int(activation in GATED_ACTIVATIONS),
        _ACTIVATION_KINDS[activation],
        None if rows is None else rows.ctypes.data,
        y.ctypes.data,
    )
    if status != 0:
        raise MemoryError(f"{function.__name__}: no memory for the scratch copies of {len(counts)} segments")


def rows_int8(x_NI: Tensor, q_OI: Tensor, scale_O: Tensor) -> Tensor:
    """``x @ (q * scale[:, None])^T`` in bf16, ``[N, I] -> [N, O]``; check ``takes_int8`` first."""
    kernels = library()
    assert kernels is not None and takes_int8(x_NI, q_OI)
    x_NI = x_NI.contiguous()
    scale32_O = _fp32(scale_O)
    rows, (outputs, inputs) = x_NI.shape[0], q_OI.shape
    y_NO = torch.empty(rows, outputs, dtype=torch.bfloat16)
    status = kernels.flexmoe_rows_int8(
        x_NI.data_ptr(),
        rows,
        q_OI.data_ptr(),
        scale32_O.data_ptr(),
        outputs,
        inputs,
        y_NO.data_ptr(),
    )
    if status != 0:
        raise MemoryError(f"rows_int8: no memory for the {rows} x {inputs} fixed-point rows")
    return y_NO


class RowsLinear(nn.Linear):
    """An ``nn.Linear`` whose decoding products run on the row kernels.

    A few bf16 rows with no gradient to compute (``takes_bf16``) are multiplied by the
    plain weight on ``rows_bf16``, read once; everything else (prefill, training, other
    dtypes) is ``F.linear``. ``RowsLinear.of(linear)`` shares ``linear``'s Parameters,
    so a weight tied to another module stays tied.
    """

    @classmethod
    def of(cls, linear: nn.Linear) -> RowsLinear:
        """A ``RowsLinear`` holding ``linear``'s own weight and bias."""
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T + b`` over the last dimension of ``x``."""
        x_NI = x.reshape(-1, self.in_features)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad or not takes_bf16(x_NI, self.weight):
            return F.linear(x, self.weight, self.bias)
        y_NO = rows_bf16(x_NI, self.weight)
        if self.bias is not None:
            y_NO += self.bias
        return y_NO.view(*x.shape[:-1], self.out_features)
