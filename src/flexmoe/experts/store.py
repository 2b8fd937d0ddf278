"""Expert weights read directly from ``safetensors`` files, one expert at a time.

Legend: D model dim, F expert hidden dim, H first-projection width (2F gated, else F), E experts.

A ``safetensors`` file is an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw bytes. One expert of a stacked
``[E, ...]`` tensor is one contiguous byte range, so ``SafetensorsFile.read`` reads just
those bytes (``os.preadv`` straight into a tensor, or into a buffer given as ``out``):
no memory map, so the process holds only what it read, and reads from several threads
need no lock.

The store reads an expert without allocating fresh memory once the cache is full (a
fresh buffer's pages fault in on first touch: thousands of faults for a 10 MB expert,
and glibc keeps freed buffers in each reading thread's own malloc arena):

- Weights kept as read (plain float experts in the file's dtype, int8 experts and
  their scales; on CPU) are read into ``ReadBuffers``: spare buffers keyed by byte size.
  When a weight the store returned becomes garbage (the cache evicted it and no caller
  or view still holds it), its memory becomes a spare buffer for a later read.
- Weights that are converted after a read through the page cache (packed by oneDNN,
  cast to another dtype, or copied to another device) are read into a scratch buffer
  of the reading thread, reused by its next read; only the converted copy is new
  memory. Packing keeps no reference to its input, so overwriting the scratch never
  changes a packed expert.

A weight stored in one piece, in the dtype it is used in, is read past the page cache
where the file system allows (``SafetensorsFile.read_direct``, ``O_DIRECT``): the
storage writes into a spare buffer, and the read costs the CPU almost nothing. One to be
kept as read but off a ``WEIGHT_ALIGN`` boundary in the file is copied once into an
aligned buffer. Weights read through the page cache are asked for all at once first
(``posix_fadvise(POSIX_FADV_WILLNEED)``).

Int8 experts (``flexmoe.experts.int8``) are int8 tensors with their per-output-channel
scales beside them (``name + "_scale"``, one fp32 number per row): the store reads both
and returns ``Int8Weight`` pairs, half the bytes of bf16.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flexmoe.experts.cache import ExpertKey, ExpertWeights
from flexmoe.experts.int8 import Int8Weight
from flexmoe.experts.packed import PackedWeight, packed_inference_supported
from flexmoe.safetensors_dtypes import SAFETENSORS_DTYPES
from flexmoe.workspace import storage_unused

__all__ = [
    "DIRECT_ALIGN",
    "DTYPES",
    "WEIGHT_ALIGN",
    "ExpertPieces",
    "Int8MemoryStore",
    "ReadBuffers",
    "SafetensorsExpertStore",
    "SafetensorsFile",
    "TensorInfo",
    "TensorSlice",
    "direct_read_bytes",
]

DTYPES = SAFETENSORS_DTYPES
MAX_SPARE_PER_SIZE = 4  # spare buffers kept per byte size (a burst of prefetches on 4 I/O threads)
DIRECT_ALIGN = 4096  # direct reads: file offsets, lengths and memory aligned to this (>= the block size)
# Weights handed out as stored start at this alignment, as PyTorch's own allocations do: some
# CPU kernels assume it (torch 2.13's ``_weight_int8pack_mm`` crashes on a weight 4 bytes off).
WEIGHT_ALIGN = 64
_MAX_WAITING = 64  # released buffers something still uses, waiting to become spare


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a ``safetensors`` file: dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _direct_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_DIRECT)


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
        self._direct = hasattr(os, "O_DIRECT")  # until the file system refuses it

    def read_direct(self, name: str, index: int | None, take: Callable[[int], Tensor]) -> Tensor | None:
        """Tensor ``name`` (or its row ``index``) read past the page cache (``O_DIRECT``), or ``None``.

        The storage's DMA writes into memory from ``take(direct_read_bytes(nbytes))`` (a
        uint8 CPU tensor; the result is a view of it), so the read costs the CPU almost
        nothing: a read through the page cache copies every byte and inserts every page
        into the cache, CPU time that a decode step on a few cores misses. ``None`` where
        the platform or the file system has no direct reads (then use ``read``).
        """
        fd = self._direct_fd()
        if fd is None:
            return None
        shape, begin, end = self._extent(name, index)
        start = begin - begin % DIRECT_ALIGN
        length = -(-(end - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        buffer = take(direct_read_bytes(end - begin))
        skip = -buffer.data_ptr() % DIRECT_ALIGN
        view = memoryview(buffer.numpy())[skip : skip + length]  # type: ignore[arg-type]
        done = 0
        try:
            while done < end - start:
                got = os.preadv(fd, [view[done:]], start + done)
                if got <= 0 or (got % DIRECT_ALIGN and done + got < end - start):
                    raise OSError(f"{self.path}: unexpected end of file reading {name!r}")
                done += got
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self._direct = False  # alignment the device does not accept: read through the cache
            return None
        first = skip + begin - start
        return buffer[first : first + end - begin].view(self.tensors[name].dtype).reshape(shape)

    def read(self, name: str, index: int | None = None, out: Tensor | None = None) -> Tensor:
        """Tensor ``name``, or its row ``index`` (``name[index]``), as a CPU tensor.

        ``out``: a contiguous 1-d uint8 CPU tensor of exactly the bytes read (``nbytes``);
        the result is then a view of it. Else the bytes go to a new tensor.
        """
        shape, begin, end = self._extent(name, index)
        if out is None:
            out = torch.empty(end - begin, dtype=torch.uint8)
        elif not (
            out.dtype == torch.uint8
            and out.device.type == "cpu"
            and out.dim() == 1
            and out.is_contiguous()
            and out.numel() == end - begin
        ):
            raise ValueError(
                f"out must be a contiguous 1-d uint8 CPU tensor of {end - begin} bytes, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if end > begin:
            view = memoryview(out.numpy())  # type: ignore[arg-type]
            done = 0
            while done < len(view):  # preadv may return fewer bytes than asked
                got = os.preadv(self._fd(), [view[done:]], begin + done)
                if got <= 0:
                    raise OSError(f"{self.path}: unexpected end of file reading {name!r}")
                done += got
        return out.view(self.tensors[name].dtype).reshape(shape)

    def will_need(self, name: str, index: int | None = None) -> None:
        """Ask the OS to start reading tensor ``name`` (or its row ``index``) into the page cache.

        A large read of a cold file otherwise goes to storage a readahead window at a time;
        asked ahead, the whole range is requested at once (a cold 9 MB read from a virtual
        disk: 8.6 ms against 14 ms). Where ``posix_fadvise`` does not exist, nothing happens.
        """
        _, begin, end = self._extent(name, index)
        if end > begin and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(), begin, end - begin, os.POSIX_FADV_WILLNEED)

    def offset(self, name: str, index: int | None = None) -> int:
        """Where tensor ``name`` (or its row ``index``) starts in the file, in bytes."""
        return self._extent(name, index)[1]

    def nbytes(self, name: str, index: int | None = None) -> int:
        """Bytes of tensor ``name``, or of its row ``index``."""
        _, begin, end = self._extent(name, index)
        return end - begin

    def _extent(self, name: str, index: int | None) -> tuple[tuple[int, ...], int, int]:
        """``(shape, begin, end)`` of tensor ``name`` or of its row ``index`` (absolute byte offsets)."""
        if name in self.unsupported:
            raise ValueError(f"{self.path}: tensor {name!r} has a dtype this reader does not support")
        info = self.tensors[name]
        shape, begin, end = info.shape, info.begin, info.end
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{self.path}: row {index} of {name!r} with shape {shape}")
            row = (end - begin) // shape[0]
            shape, begin, end = shape[1:], begin + index * row, begin + (index + 1) * row
        return shape, begin, end

    def _fd(self) -> int:
        """The file descriptor of the calling thread (opened on first use, closed with the thread)."""
        handle = getattr(self._local, "file", None)
        if handle is None:
            handle = self._local.file = open(self.path, "rb")  # noqa: SIM115 (lives with the thread)
        return int(handle.fileno())

    @property
    def reads_direct(self) -> bool:
        """Whether ``read_direct`` may read (until the file system or the device refuses it)."""
        return self._direct

    def _direct_fd(self) -> int | None:
        """The calling thread's ``O_DIRECT`` descriptor, or ``None`` where direct reads are off."""
        if not self._direct:
            return None
        handle = getattr(self._local, "direct", None)
        if handle is None:
            try:
                # lives with the thread, as ``_fd``'s file does
                handle = open(self.path, "rb", buffering=0, opener=_direct_opener)  # noqa: SIM115
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._direct = False  # a file system without direct I/O (tmpfs)
                return None
            self._local.direct = handle
        return int(handle.fileno())


def direct_read_bytes(nbytes: int) -> int:
    """The buffer ``SafetensorsFile.read_direct`` takes for ``nbytes``: room to align both ends."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN + 2 * DIRECT_ALIGN


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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype stored in the file."""
        return self.file.tensors[self.name].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the slice in the file."""
        return self.file.nbytes(self.name, self.index)

    def read(self, out: Tensor | None = None) -> Tensor:
        """The slice, read from its file (into ``out``: see ``SafetensorsFile.read``)."""
        return self.file.read(self.name, self.index, out)

    def read_direct(self, take: Callable[[int], Tensor]) -> Tensor | None:
        """The slice read past the page cache, or ``None`` (see ``SafetensorsFile.read_direct``)."""
        return self.file.read_direct(self.name, self.index, take)

    def will_need(self) -> None:
        """Start reading the slice (and its scales) into the page cache (``SafetensorsFile.will_need``)."""
        self.file.will_need(self.name, self.index)
        if self.scale is not None:
            self.scale.will_need()


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


class ReadBuffers:
    """Spare CPU byte buffers, keyed by size: the memory of weights nothing uses any more.

    ``take(nbytes)`` hands out a spare buffer of that size, else a new one.
    ``reuse_when_freed(weight)`` marks a weight built on such a buffer: once the weight
    is garbage (no Python reference; a finalizer tells) its memory is released here, and
    it becomes spare only when no tensor at all uses it (PyTorch's storage use count: an
    alias of the weight may outlive it), so memory someone still reads is never handed
    out. Thread-safe. At most ``max_per_size`` spare buffers of each size are kept; the
    others are freed.

    Attributes:
        taken: buffers handed out; ``reused`` of them were spare (the rest new memory).
    """

    def __init__(self, max_per_size: int = MAX_SPARE_PER_SIZE) -> None:
        if not (isinstance(max_per_size, int) and max_per_size >= 0):
            raise ValueError(f"max_per_size must be an int >= 0, got {max_per_size!r}")
        self.max_per_size = max_per_size
        self.taken = 0
        self.reused = 0
        self._spare: dict[int, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()
        # Appended by finalizers, which may run at any moment (even inside ``take`` on this
        # thread): a deque's append and popleft need no lock.
        self._released: deque[torch.UntypedStorage] = deque()

    def take(self, nbytes: int) -> Tensor:
        """A contiguous uint8 CPU tensor of ``nbytes``, uninitialised: spare memory where there is some."""
        self._collect_released()
        with self._lock:
            self.taken += 1
            spare = self._spare.get(nbytes)
            storage = spare.pop() if spare else None
            self.reused += storage is not None
        if storage is None:
            return torch.empty(nbytes, dtype=torch.uint8)
        # set_ (not a view of another tensor) so that the result is the storage's only user
        buffer: Tensor = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))  # type: ignore[call-overload]
        return buffer

    def reuse_when_freed(self, weight: Tensor) -> None:
        """Release ``weight``'s memory (its whole storage, a buffer from ``take``) once it is garbage."""
        finalizer = weakref.finalize(weight, self._released.append, weight.untyped_storage())
        finalizer.atexit = False

    def spare_bytes(self) -> int:
        """Bytes of the spare buffers held now (released ones still in use not counted)."""
        self._collect_released()
        with self._lock:
            return sum(storage.nbytes() for spare in self._spare.values() for storage in spare)

    def _collect_released(self) -> None:
        """Make the released buffers nothing uses any more spare; the others wait (the oldest let go)."""
        waiting = []
        for _ in range(len(self._released)):
            try:
                storage = self._released.popleft()
            except IndexError:  # another thread took the last one
                break
            if storage_unused(storage):
                with self._lock:
                    spare = self._spare.setdefault(storage.nbytes(), [])
                    if len(spare) < self.max_per_size:
                        spare.append(storage)
            else:
                waiting.append(storage)
        self._released.extend(waiting[-_MAX_WAITING:])


class SafetensorsExpertStore:
    """An ``ExpertStore`` over ``safetensors`` files: each expert's pieces, read and cast on demand.

    Args:
        pieces: ``(layer, expert) -> ExpertPieces``.
        dtype: the dtype the weights are returned in (cast after reading).
        device: where the weights are returned.
        pack: return float experts as ``PackedWeight`` (``read`` packs on the reading
            thread, ``read_stored`` leaves it to ``convert``); only where
            ``packed_inference_supported(device, dtype)``.
        direct: read weights kept as stored (one piece each, as the file has them) past
            the page cache (``SafetensorsFile.read_direct``) where the file system allows.

    Weights returned on CPU unconverted (not packed, the file's dtype) are built on
    ``buffers``, where their memory returns once they are garbage; converted ones are
    read through one scratch buffer per reading thread (see the module docstring).
    """

    def __init__(
        self,
        pieces: dict[ExpertKey, ExpertPieces],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pack: bool = False,
        direct: bool = True,
    ) -> None:
        self.pieces = pieces
        self.dtype = dtype
        self.device = torch.device(device)
        self.direct = direct
        if pack and not packed_inference_supported(self.device, dtype):
            raise ValueError(
                f"pack: packed experts need a CPU with oneDNN {dtype} matmuls, got {self.device}"
            )
        self.pack = pack
        self.buffers = ReadBuffers()
        self._local = threading.local()  # each reading thread's scratch buffers

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
        if self.pack and self.direct:  # past the page cache into spare buffers, then packed
            return self.convert(self.read_stored(key))
        self._will_need(pieces)
        if pieces.quantized:
            return self._read_int8(pieces.w_in), self._read_int8((pieces.w_out,))
        if self.pack:
            # one after the other: both are read into this thread's scratch buffer
            w_in = PackedWeight.pack(self._stacked(pieces.w_in, self.dtype, scratch=True))
            w_out = PackedWeight.pack(self._stacked((pieces.w_out,), self.dtype, scratch=True))
            return w_in, w_out
        return self._stacked(pieces.w_in, self.dtype), self._stacked((pieces.w_out,), self.dtype)

    def read_stored(self, key: ExpertKey) -> ExpertWeights:
        """What ``read`` returns, but not packed: the I/O part, for a background thread.

        ``convert`` then packs it where ``pack`` is on, on the thread that computes: a
        packing is compute, and on a CPU whose cores all run the model's ops a background
        thread packing beside them only slows them down.
        """
        pieces = self.pieces[key]
        if pieces.quantized or not self.pack:
            return self.read(key)
        self._will_need(pieces)
        w_in = self._stacked(pieces.w_in, self.dtype, packing=True)
        return w_in, self._stacked((pieces.w_out,), self.dtype, packing=True)

    def convert(self, stored: ExpertWeights) -> ExpertWeights:
        """``read_stored``'s result as ``read`` returns it (packed where ``pack`` is on)."""
        w_in, w_out = stored
        if self.pack and isinstance(w_in, Tensor) and isinstance(w_out, Tensor):
            return PackedWeight.pack(w_in), PackedWeight.pack(w_out)
        return stored

    def scratch_bytes(self) -> int:
        """Bytes of the calling thread's scratch buffers."""
        scratch: dict[str, Tensor] = getattr(self._local, "scratch", {})
        return sum(buffer.numel() for buffer in scratch.values())

    def _read_int8(self, pieces: tuple[TensorSlice, ...]) -> Int8Weight:
        """The int8 pieces stacked on dim 0, with their scales (fp32)."""
        scales = [piece.scale for piece in pieces if piece.scale is not None]
        return Int8Weight(self._stacked(pieces, torch.int8), self._stacked(scales, torch.float32))

    def _stacked(
        self, slices: Sequence[TensorSlice], dtype: torch.dtype, scratch: bool = False, packing: bool = False
    ) -> Tensor:
        """The slices read and stacked on dim 0 as one tensor of ``dtype`` on ``device``.

        ``scratch``: the result lives in the calling thread's scratch buffer, valid until its
        next read (for packing); else it is the caller's, on CPU built on ``buffers``.
        """
        if self._reads_direct(slices, dtype, scratch):
            weight = slices[0].read_direct(self.buffers.take)
            if weight is not None:
                if not packing and weight.data_ptr() % WEIGHT_ALIGN:
                    weight = self._aligned_copy(weight)
                self.buffers.reuse_when_freed(weight)
                return weight
        shape = (sum(piece.shape[0] for piece in slices), *slices[0].shape[1:])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out_bytes: Tensor | None = None
        if self.device.type != "cpu":
            out = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            nbytes = shape[0] * row_bytes
            out_bytes = self._scratch("out", nbytes) if scratch else self.buffers.take(nbytes)
            out = out_bytes.view(dtype).view(shape)
        row = 0
        for piece in slices:
            rows = piece.shape[0]
            if out_bytes is not None and piece.dtype == dtype:
                piece.read(out_bytes[row * row_bytes : (row + rows) * row_bytes])
            else:  # read as stored, then cast or copied to the device
                out[row : row + rows].copy_(piece.read(self._scratch("raw", piece.nbytes)))
            row += rows
        if out_bytes is not None and not scratch:
            self.buffers.reuse_when_freed(out)
        return out

    def _reads_direct(self, slices: Sequence[TensorSlice], dtype: torch.dtype, scratch: bool) -> bool:
        """Whether ``_stacked`` reads ``slices`` past the page cache: one piece, stored dtype, on CPU."""
        if not (self.direct and not scratch and self.device.type == "cpu" and len(slices) == 1):
            return False
        return slices[0].dtype == dtype and slices[0].file.reads_direct

    def _aligned_copy(self, weight: Tensor) -> Tensor:
        """``weight`` copied into a spare buffer, which starts at ``WEIGHT_ALIGN`` as every allocation does.

        A direct read's weight starts where the file has it, modulo ``DIRECT_ALIGN``; one
        kept as read must start aligned (its read buffer becomes spare again at once).
        """
        self.buffers.reuse_when_freed(weight)
        out = self.buffers.take(weight.numel() * weight.element_size()).view(weight.dtype).view(weight.shape)
        return out.copy_(weight)

    def _will_need(self, pieces: ExpertPieces) -> None:
        """Ask for the pieces read through the page cache, all at once (a direct read needs no hint)."""
        dtype = torch.int8 if pieces.quantized else self.dtype
        for slices in (pieces.w_in, (pieces.w_out,)):
            if not self._reads_direct(slices, dtype, scratch=False):
                for piece in slices:
                    piece.will_need()

    def _scratch(self, role: str, nbytes: int) -> Tensor:
        """The calling thread's buffer for ``role`` (grown when too small), its first ``nbytes``."""
        scratch: dict[str, Tensor] | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = {}
        buffer = scratch.get(role)
        if buffer is None or buffer.numel() < nbytes:
            buffer = scratch[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes]


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
