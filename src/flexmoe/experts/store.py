"""Expert weights read directly from ``safetensors`` files, one expert at a time.

Legend: D model dim, F expert hidden dim, H first-projection width (2F gated, else F), E experts.

A ``safetensors`` file is an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw bytes. One expert of a stacked
``[E, ...]`` tensor is one contiguous byte range, so ``SafetensorsFile.read`` reads just
those bytes (``os.preadv`` straight into a new tensor): no memory map, so the process
holds only what it read, and reads from several threads need no lock.

Int8 experts (``flexmoe.experts.int8``) are int8 tensors with their per-output-channel
scales beside them (``name + "_scale"``, one fp32 number per row): the store reads both
and returns ``Int8Weight`` pairs, half the bytes of bf16.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flexmoe.experts.cache import ExpertKey, ExpertWeights
from flexmoe.experts.int8 import Int8Weight
from flexmoe.experts.packed import PackedWeight, packed_inference_supported
from flexmoe.safetensors_dtypes import SAFETENSORS_DTYPES

__all__ = [
    "DTYPES",
    "ExpertPieces",
    "Int8MemoryStore",
    "SafetensorsExpertStore",
    "SafetensorsFile",
    "TensorInfo",
    "TensorSlice",
]

DTYPES = SAFETENSORS_DTYPES


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a ``safetensors`` file: dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """The header of one ``safetensors`` file, and reads of whole tensors or of one row of a tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                continue  # a dtype this reader does not know; reading the tensor raises below
            begin, end = info["data_offsets"]
            self.tensors[name] = TensorInfo(
                DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, 8 + length + end
            )
        # tensors of a dtype this reader does not know (reading one raises)
        self.unsupported = frozenset(name for name in header if header[name]["dtype"] not in DTYPES)
        self._local = threading.local()

    def read(self, name: str, index: int | None = None) -> Tensor:
        """Tensor ``name``, or its row ``index`` (``name[index]``), as a new CPU tensor."""
        if name in self.unsupported:
            raise ValueError(f"{self.path}: tensor {name!r} has a dtype this reader does not support")
        info = self.tensors[name]
        shape, begin, end = info.shape, info.begin, info.end
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{self.path}: row {index} of {name!r} with shape {shape}")
            row = (end - begin) // shape[0]
            shape, begin, end = shape[1:], begin + index * row, begin + (index + 1) * row
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view = memoryview(out.numpy())  # type: ignore[arg-type]
            done = 0
            while done < len(view):  # preadv may return fewer bytes than asked
                got = os.preadv(self._fd(), [view[done:]], begin + done)
                if got <= 0:
                    raise OSError(f"{self.path}: unexpected end of file reading {name!r}")
                done += got
        return out.view(info.dtype).reshape(shape)

    def _fd(self) -> int:
        """The file descriptor of the calling thread (opened on first use, closed with the thread)."""
        handle = getattr(self._local, "file", None)
        if handle is None:
            handle = self._local.file = open(self.path, "rb")  # noqa: SIM115 (lives with the thread)
        return int(handle.fileno())


@dataclass(frozen=True)
class TensorSlice:
    """A tensor in a file, or one row of it (``index``: the expert of a stacked ``[E, ...]`` tensor).

    ``scale``: for an int8 tensor, its per-output-channel scales (the same row of them).
    """

    file: SafetensorsFile
    name: str
    index: int | None = None
    scale: TensorSlice | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The slice's shape."""
        shape = self.file.tensors[self.name].shape
        return shape[1:] if self.index is not None else shape

    def read(self) -> Tensor:
        """The slice, read from its file."""
        return self.file.read(self.name, self.index)


@dataclass(frozen=True)
class ExpertPieces:
    """Where one expert's weights are: ``w_in``'s pieces (stacked on dim 0: ``[gate; up]``), ``w_out``."""

    w_in: tuple[TensorSlice, ...]
    w_out: TensorSlice

    @property
    def w_in_shape(self) -> tuple[int, int]:
        """``(H, D)`` of the assembled ``w_in``."""
        shapes = [piece.shape for piece in self.w_in]
        return sum(s[0] for s in shapes), shapes[0][1]

    @property
    def quantized(self) -> bool:
        """Whether the weights are int8 with scales (else plain floating-point tensors)."""
        return all(piece.scale is not None for piece in (*self.w_in, self.w_out))


class SafetensorsExpertStore:
    """An ``ExpertStore`` over ``safetensors`` files: each expert's pieces, read and cast on demand.

    Args:
        pieces: ``(layer, expert) -> ExpertPieces``.
        dtype: the dtype the weights are returned in (cast after reading).
        device: where the weights are returned.
        pack: return float experts as ``PackedWeight`` (packed on the reading thread);
            only where ``packed_inference_supported(device, dtype)``.
    """

    def __init__(
        self,
        pieces: dict[ExpertKey, ExpertPieces],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pack: bool = False,
    ) -> None:
        self.pieces = pieces
        self.dtype = dtype
        self.device = torch.device(device)
        if pack and not packed_inference_supported(self.device, dtype):
            raise ValueError(
                f"pack: packed experts need a CPU with oneDNN {dtype} matmuls, got {self.device}"
            )
        self.pack = pack

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of the expert's ``w_in`` and ``w_out`` in ``dtype`` (int8 ones: int8 and fp32 scales)."""
        pieces = self.pieces[key]
        (H, D), F = pieces.w_in_shape, pieces.w_out.shape[1]
        numel = H * D + D * F
        if pieces.quantized:
            return numel + (H + D) * torch.float32.itemsize
        return numel * self.dtype.itemsize

    def read(self, key: ExpertKey) -> ExpertWeights:
        """The expert's ``(w_in [H, D], w_out [D, F])`` on ``device``: in ``dtype``, packed, or int8."""
        pieces = self.pieces[key]
        if pieces.quantized:
            return _read_int8(pieces.w_in, self.device), _read_int8((pieces.w_out,), self.device)
        w_in = _cat([piece.read() for piece in pieces.w_in]).to(self.device, self.dtype)
        w_out = pieces.w_out.read().to(self.device, self.dtype)
        if self.pack:
            return PackedWeight.pack(w_in), PackedWeight.pack(w_out)
        return w_in, w_out


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _read_int8(pieces: tuple[TensorSlice, ...], device: torch.device) -> Int8Weight:
    """The int8 pieces stacked on dim 0, with their scales (fp32)."""
    scales = [piece.scale.read() for piece in pieces if piece.scale is not None]
    q = _cat([piece.read() for piece in pieces])
    return Int8Weight(q.to(device), _cat(scales).to(device, torch.float32))


class Int8MemoryStore:
    """An ``ExpertStore`` of int8 experts held in memory: ``read`` hands them out as they are.

    Args:
        weights: per layer, the float experts ``(w_in [E, H, D], w_out [E, D, F])``;
            each expert's weights are quantized per output channel (``Int8Weight``).
    """

    def __init__(self, weights: list[tuple[Tensor, Tensor]]) -> None:
        self.experts: list[list[tuple[Int8Weight, Int8Weight]]] = [
            [(Int8Weight.quantize(w_in[e]), Int8Weight.quantize(w_out[e])) for e in range(w_in.shape[0])]
            for w_in, w_out in weights
        ]

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of the expert's int8 weights and scales."""
        w_in, w_out = self.experts[key[0]][key[1]]
        return w_in.nbytes + w_out.nbytes

    def read(self, key: ExpertKey) -> ExpertWeights:
        """The expert's ``Int8Weight`` pair (no copy)."""
        return self.experts[key[0]][key[1]]

    @property
    def total_bytes(self) -> int:
        """Bytes of every expert held."""
        return sum(w_in.nbytes + w_out.nbytes for layer in self.experts for w_in, w_out in layer)
