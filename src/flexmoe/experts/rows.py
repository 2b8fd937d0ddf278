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
them (up to 32 rows at memory speed; ``tile_kernels``); int8 weights (one scale per
output row) on AVX512-VNNI integer ones, each row of ``x`` rounded to 16-bit fixed point
first (an error of at most ``max|x_row| / 65534`` per element, far below the weights'
int8 rounding and the bf16 output's).

``rows_bf16`` and ``rows_int8`` are one product; ``expert_bf16`` and ``expert_int8`` one
decoding expert in one call (both products and the activation, which is applied to the
fp32 sums and rounded once), which spares a decode step a few Python calls per expert;
``RowsLinear`` is an ``nn.Linear`` whose decoding products run on ``rows_bf16``.
``experts_bf16`` and ``rows_bf16_segments`` run many segments (a layer's decoding
experts) in one call, the loop over them in C. ``lora_add`` (from ``lora_rows.c``) adds
the LoRA terms of a multi-adapter batch in place: each slot's factors read once for its
rows (``flexmoe.adapters.woven``).

The library is compiled on first use with the system's C compiler (``$CC``, else
``cc``) into ``$XDG_CACHE_HOME/flexmoe/kernels`` (``~/.cache`` by default), once per
source, compiler and flags. Where the CPU lacks AVX512-BF16, the platform is not Linux,
no compiler works, or ``FLEXMOE_CPU_KERNELS=0`` is set, ``available()`` is false and the
callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.logs import log_once

__all__ = [
    "INT8_MAX_ROWS",
    "RowsLinear",
    "available",
    "bf16_max_rows",
    "decodes_plain",
    "expert_bf16",
    "expert_int8",
    "experts_bf16",
    "lora_add",
    "openmp_threads",
    "rows_bf16",
    "rows_bf16_segments",
    "rows_int8",
    "set_tile_kernels",
    "takes_bf16",
    "takes_bf16_segments",
    "takes_expert_bf16",
    "takes_expert_int8",
    "takes_experts_bf16",
    "takes_int8",
    "takes_lora",
    "tile_kernels",
]

logger = logging.getLogger(__name__)

# Beyond these row counts PyTorch's kernels are as fast (measured on an AVX512-BF16 CPU
# with weights larger than its caches: bf16 against the BLAS product on the plain weight,
# int8 against torch._weight_int8pack_mm). AMX tiles keep bf16 at memory speed further.
_VECTOR_BF16_MAX_ROWS = 2
_TILE_BF16_MAX_ROWS = 32  # AMX_MAX_ROWS of rows.c: two tiles of 16 rows
INT8_MAX_ROWS = 16
# The activation codes of rows.c (gated ones apply the base function to the gate half).
_ACTIVATION_KINDS = {"silu": 0, "swiglu": 0, "gelu": 1, "geglu": 1, "relu": 2}
# one library from both sources: the products of decoding, and the LoRA terms of adapters
_SOURCES = (Path(__file__).with_name("rows.c"), Path(__file__).with_name("lora_rows.c"))
_LORA_MAX_RANK = 1024  # LORA_MAX_RANK of lora_rows.c
_FLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vnni",
    "-fopenmp",
    "-shared",
    "-fPIC",
)
# a compiler without AMX support builds the vector kernels alone
_TILE_FLAGS = ("-mamx-tile", "-mamx-bf16")
_NO_TILE_FLAGS = ("-DFLEXMOE_NO_AMX",)
_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"})
_CPU_TILE_FLAGS = frozenset({"amx_tile", "amx_bf16"})
_ENABLE_VARIABLE = "FLEXMOE_CPU_KERNELS"
_TILES_VARIABLE = "FLEXMOE_CPU_TILES"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _kernel_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flexmoe" / "kernels"


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """The compiled library, built now unless an identical build is cached."""
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + " ".join(flags).encode() + _compiler_version(compiler).encode())
    target = _kernel_dir() / f"rows-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # built under a private name, then renamed: processes building at once never see half a file
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=".rows-", suffix=".so")
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *flags, *map(str, _SOURCES), "-o", partial],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_long
    library.flexmoe_rows_bf16.argtypes = [pointer, size, pointer, size, size, pointer]
    library.flexmoe_rows_bf16.restype = ctypes.c_int
    library.flexmoe_rows_int8.argtypes = [pointer, size, pointer, pointer, size, size, pointer]
    library.flexmoe_rows_int8.restype = ctypes.c_int
    # both experts' calls end with D, F, gated, the activation, the row weights and y
    flag = ctypes.c_int
    expert = (size, size, flag, flag, pointer, pointer)
    library.flexmoe_expert_bf16.argtypes = [pointer, size, pointer, pointer, *expert]
    library.flexmoe_expert_bf16.restype = ctypes.c_int
    library.flexmoe_expert_int8.argtypes = [pointer, size, pointer, pointer, pointer, pointer, *expert]
    library.flexmoe_expert_int8.restype = ctypes.c_int
    # n, then per-segment pointers and row counts (arrays of int64)
    library.flexmoe_rows_bf16_many.argtypes = [size, pointer, pointer, pointer, size, size, pointer]
    library.flexmoe_rows_bf16_many.restype = ctypes.c_int
    library.flexmoe_expert_bf16_many.argtypes = [size, pointer, pointer, pointer, pointer, *expert]
    library.flexmoe_expert_bf16_many.restype = ctypes.c_int
    library.flexmoe_rows_threads.argtypes = []
    library.flexmoe_rows_threads.restype = ctypes.c_int
    library.flexmoe_use_amx.argtypes = [ctypes.c_int]
    library.flexmoe_use_amx.restype = ctypes.c_int
    # is_bf16, x, its row stride, rows, starts, L, A^T, B^T, I, R, O, out, its row stride, width, block stride
    library.flexmoe_lora_add.argtypes = [flag, pointer, size, pointer, pointer, size, pointer, pointer]
    library.flexmoe_lora_add.argtypes += [size] * 3 + [pointer] + [size] * 3
    library.flexmoe_lora_add.restype = ctypes.c_int
    return library


def _load(compiler: str) -> ctypes.CDLL:
    """The library with AMX tile kernels, or without them where the compiler has none."""
    try:
        return _declare(ctypes.CDLL(str(_build(compiler, _FLAGS + _TILE_FLAGS))))
    except subprocess.CalledProcessError:
        return _declare(ctypes.CDLL(str(_build(compiler, _FLAGS + _NO_TILE_FLAGS))))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(_ENABLE_VARIABLE, "1") == "0" or not _cpu_flags() >= _CPU_FLAGS:
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        library = _load(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log_once(
            logger, logging.WARNING, "CPU row kernels unavailable (%s failed): %s", compiler, detail.strip()
        )
        return None
    _set_tiles(library, os.environ.get(_TILES_VARIABLE, "1") != "0")
    return library


_tiles_on = False  # mirrors rows.c's switch: takes_bf16 reads it on every decoding product


def _set_tiles(library: ctypes.CDLL, enabled: bool) -> bool:
    global _tiles_on
    _tiles_on = bool(library.flexmoe_use_amx(int(enabled and _cpu_flags() >= _CPU_TILE_FLAGS)))
    return _tiles_on


def available() -> bool:
    """Whether the row kernels run here (built, or cached from an earlier build)."""
    return _library() is not None


def openmp_threads() -> int:
    """The team size the kernels' parallel loops get on the calling thread (PyTorch's)."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU row kernels are not available here")
    return int(library.flexmoe_rows_threads())


def tile_kernels() -> bool:
    """Whether bf16 products run on AMX tiles (CPU, compiler and kernel permitting)."""
    return _library() is not None and _tiles_on


def set_tile_kernels(enabled: bool) -> bool:
    """Use the AMX tile kernels for bf16 where possible (or not); returns ``tile_kernels()``.

    On by default where the CPU has AMX; ``FLEXMOE_CPU_TILES=0`` turns them off at start.
    """
    library = _library()
    return library is not None and _set_tiles(library, enabled)


def bf16_max_rows() -> int:
    """The most rows ``rows_bf16`` and ``expert_bf16`` take: 32 on AMX tiles, else 2."""
    return _TILE_BF16_MAX_ROWS if tile_kernels() else _VECTOR_BF16_MAX_ROWS


def decodes_plain(dtype: torch.dtype) -> bool:
    """Whether a plain weight of ``dtype`` multiplies decoding rows here on the row kernels."""
    return dtype == torch.bfloat16 and available()


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
    library = _library()
    assert library is not None
    weights = [w_in_HD.data_ptr(), w_out_DF.data_ptr()]
    return _one_expert(library.flexmoe_expert_bf16, x_ND, weights, w_out_DF.shape, activation, row_weights_N)


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
    library = _library()
    assert library is not None
    scales = [scale.to(torch.float32).contiguous() for scale in (scale_in_H, scale_out_D)]
    weights = [q_in_HD.data_ptr(), scales[0].data_ptr(), q_out_DF.data_ptr(), scales[1].data_ptr()]
    return _one_expert(library.flexmoe_expert_int8, x_ND, weights, q_out_DF.shape, activation, row_weights_N)


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
    weights_N = None if row_weights_N is None else row_weights_N.to(torch.float32).contiguous()
    y_ND = torch.empty(rows, D, dtype=torch.bfloat16)
    gated = int(activation in GATED_ACTIVATIONS)
    kind = _ACTIVATION_KINDS[activation]
    row_pointer = None if weights_N is None else weights_N.data_ptr()
    status = function(x_ND.data_ptr(), rows, *weights, D, F, gated, kind, row_pointer, y_ND.data_ptr())
    if status != 0:
        raise MemoryError(f"{function.__name__}: no memory for the scratch copies of {rows} rows")
    return y_ND


def rows_bf16(x_NI: Tensor, w_OI: Tensor) -> Tensor:
    """``x @ w^T`` in bf16 (fp32 sums), ``[N, I] -> [N, O]``; check ``takes_bf16`` first."""
    library = _library()
    assert library is not None and takes_bf16(x_NI, w_OI)
    x_NI = x_NI.contiguous()
    rows, (outputs, inputs) = x_NI.shape[0], w_OI.shape
    y_NO = torch.empty(rows, outputs, dtype=torch.bfloat16)
    pointers = (x_NI.data_ptr(), rows, w_OI.data_ptr(), outputs, inputs, y_NO.data_ptr())
    status = library.flexmoe_rows_bf16(*pointers)
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
    library = _library()
    assert library is not None and takes_bf16_segments(x_NI, counts, w_EOI)
    _check_output("y_NO", y_NO, (x_NI.shape[0], w_EOI.shape[1]))
    _check_segments(starts, counts, index, x_NI.shape[0], w_EOI.shape[0])
    counts = counts.astype(np.int64)
    x, w, y = _row_pointers(x_NI, starts), _row_pointers(w_EOI, index), _row_pointers(y_NO, starts)
    outputs, inputs = w_EOI.shape[1:]
    status = library.flexmoe_rows_bf16_many(
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
    library = _library()
    assert library is not None and takes_experts_bf16(x_ND, counts, w_in_EHD, w_out_EDF, activation)
    _check_output("y_ND", y_ND, tuple(x_ND.shape))
    _check_segments(starts, counts, index, x_ND.shape[0], w_in_EHD.shape[0])
    counts = counts.astype(np.int64)
    x, y = _row_pointers(x_ND, starts), _row_pointers(y_ND, starts)
    w_in, w_out = _row_pointers(w_in_EHD, index), _row_pointers(w_out_EDF, index)
    weights = None
    if row_weights_N is not None:
        row_weights_N = row_weights_N.to(torch.float32).contiguous()
        weights = _row_pointers(row_weights_N, starts)
    D, F = w_out_EDF.shape[1:]
    status = library.flexmoe_expert_bf16_many(
        len(counts),
        x.ctypes.data,
        counts.ctypes.data,
        w_in.ctypes.data,
        w_out.ctypes.data,
        D,
        F,
        int(activation in GATED_ACTIVATIONS),
        _ACTIVATION_KINDS[activation],
        None if weights is None else weights.ctypes.data,
        y.ctypes.data,
    )
    if status != 0:
        raise MemoryError(f"experts_bf16: no memory for the scratch copies of {len(counts)} segments")


def rows_int8(x_NI: Tensor, q_OI: Tensor, scale_O: Tensor) -> Tensor:
    """``x @ (q * scale[:, None])^T`` in bf16, ``[N, I] -> [N, O]``; check ``takes_int8`` first."""
    library = _library()
    assert library is not None and takes_int8(x_NI, q_OI)
    x_NI = x_NI.contiguous()
    scale32_O = scale_O.to(torch.float32).contiguous()
    rows, (outputs, inputs) = x_NI.shape[0], q_OI.shape
    y_NO = torch.empty(rows, outputs, dtype=torch.bfloat16)
    status = library.flexmoe_rows_int8(
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
    library = _library()
    assert library is not None and takes_lora(x_NI, rows_n, A_LrI, B_LOr, out_PNO)
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
    status = library.flexmoe_lora_add(
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
