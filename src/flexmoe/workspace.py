"""A small pool of reusable scratch buffers for the CPU hot path.

PyTorch's CUDA allocator caches freed blocks, but its CPU allocator hands large
tensors straight back to the C library, which returns them to the operating system;
the next step's buffers of the same size then pay a page fault per 4 KiB on first
touch: on a 2-core CPU VM an elementwise op producing a fresh 32 MiB tensor takes
20 ms, the same op into a reused buffer 3.5 ms. The pool keeps scratch buffers of the
MoE data path alive between calls, on CPU only; elsewhere ``take`` is ``torch.empty``.
The expert weights' gradients come from it too (``take_until_released``): once the
user drops them (``zero_grad``), the next backward reuses their memory.

The pool is bounded: at most ``max_per_key`` buffers per size and ``max_bytes`` in all
(``WORKSPACE.max_bytes``, 1 GiB by default; a layer step keeps a few hundred MiB). Calls
that change plan, batch size or top-k make buffers of new sizes; beyond the bound the
buffers pooled longest ago are dropped first, so a long run's pooled memory stays
bounded whatever it switches between. ``WORKSPACE.max_bytes = 0`` turns pooling off.

A buffer is ``take``-n by the code that owns it and offered back with ``give`` once that
code is done with it. ``give`` keeps it only if no other tensor shares its storage (a
view, a tensor saved for backward, a user's hook), so an offered buffer still in use
elsewhere is never handed out twice; a buffer never given back is simply freed.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, defaultdict

import torch
from torch import Tensor

__all__ = ["DEFAULT_MAX_BYTES", "WORKSPACE", "Workspace", "storage_unused"]


DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: a few steps' worth of the data path's largest buffers
_MAX_PENDING = 16  # released buffers still in use that wait to be pooled


class Workspace:
    """Free lists of CPU storages keyed by ``(bytes, dtype)``, bounded in bytes.

    Args:
        max_per_key: buffers kept per ``(bytes, dtype)``.
        max_bytes: bytes kept in all; offering a buffer beyond it evicts the buffers
            pooled longest ago first (plans, batch sizes and top-k that change from call
            to call make buffers of new sizes, and the old sizes must not pile up).
    """

    def __init__(self, max_per_key: int = 4, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_per_key = max_per_key
        self.max_bytes = max_bytes
        self._free: defaultdict[tuple[int, torch.dtype], list[torch.UntypedStorage]] = defaultdict(list)
        self._pooled: OrderedDict[int, tuple[int, torch.dtype]] = (
            OrderedDict()
        )  # data_ptr -> key, oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        # (storage, dtype) of buffers from take_until_released that were freed (appended by
        # a finalizer, at any time: list.append is atomic), pooled by the next take.
        self._pending: list[tuple[torch.UntypedStorage, torch.dtype]] = []

    @property
    def max_bytes(self) -> int:
        """The most bytes the pool keeps (setting it evicts down to the new bound)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {value!r}")
        self._max_bytes = value
        if hasattr(self, "_lock"):
            with self._lock:
                self._evict()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``: pooled on CPU, else ``torch.empty``."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = 1
        for size in shape:
            numel *= size
        self._pool_pending()
        with self._lock:
            free = self._free.get((numel * dtype.itemsize, dtype))
            storage = free.pop() if free else None
            if storage is not None:
                del self._pooled[storage.data_ptr()]
                self._bytes -= storage.nbytes()
        if storage is None:
            return torch.empty(shape, dtype=dtype, device=device)
        # set_ (not a view) so that the tensor is the storage's only user.
        tensor: Tensor = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)  # type: ignore[call-overload]
        return tensor

    def take_until_released(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """``take``, for a buffer whose users never ``give`` it back: it returns when it is freed.

        For the outputs of the expert operators under ``torch.compile``, which the compiled
        graph holds and drops. When the returned tensor is garbage-collected its storage
        goes to a pending list; the next ``take`` pools it if nothing else (a view) still
        uses it.
        """
        tensor = self.take(shape, dtype, device)
        if device.type == "cpu" and self.max_bytes:
            weakref.finalize(tensor, self._pending.append, (tensor.untyped_storage(), dtype))
        return tensor

    def give(self, *tensors: Tensor | None) -> None:
        """Offer buffers back; each is kept only if nothing else shares its storage."""
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
                continue
            if tensor.storage_offset() != 0 or not _sole_owner(tensor):
                continue
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                continue
            self._keep(tensor.untyped_storage(), tensor.dtype)

    def _keep(self, storage: torch.UntypedStorage, dtype: torch.dtype) -> None:
        """Pool ``storage`` (nothing else uses it) unless its size's list or the byte bound is full."""
        key = (storage.nbytes(), dtype)
        if key[0] > self.max_bytes:
            return
        with self._lock:
            free = self._free[key]
            pointer = storage.data_ptr()
            if len(free) < self.max_per_key and pointer not in self._pooled:
                free.append(storage)
                self._pooled[pointer] = key
                self._bytes += key[0]
                self._evict()

    def _pool_pending(self) -> None:
        """Pool the released storages (see ``take_until_released``) that nothing uses any more.

        One still used elsewhere (an alias the compiled graph keeps a little longer) waits
        for a later ``take``; at most ``_MAX_PENDING`` wait, the oldest are let go.
        """
        waiting = []
        while self._pending:
            storage, dtype = self._pending.pop(0)
            if storage_unused(storage):
                self._keep(storage, dtype)
            else:
                waiting.append((storage, dtype))
        self._pending.extend(waiting[-_MAX_PENDING:])

    def _evict(self) -> None:
        """Drop the buffers pooled longest ago until the pool fits ``max_bytes`` (lock held)."""
        while self._bytes > self._max_bytes:
            pointer, key = self._pooled.popitem(last=False)
            free = self._free[key]
            index = next(i for i, s in enumerate(free) if s.data_ptr() == pointer)
            self._bytes -= free.pop(index).nbytes()

    def clear(self) -> None:
        """Drop every pooled buffer (their memory goes back to the allocator)."""
        self._pending.clear()
        with self._lock:
            self._free.clear()
            self._pooled.clear()
            self._bytes = 0

    def pooled_bytes(self) -> int:
        """Bytes currently held in the free lists."""
        with self._lock:
            return self._bytes


def storage_unused(storage: torch.UntypedStorage) -> bool:
    """Whether nothing but this storage object (no tensor, no view) uses the storage.

    ``False`` where PyTorch cannot tell (its use count is a private API): never reuse then.
    """
    try:
        return bool(torch._C._storage_Use_Count(storage._cdata) <= 1)
    except (AttributeError, RuntimeError):  # private API gone: never pool
        return False


def _sole_owner(tensor: Tensor) -> bool:
    """Whether ``tensor`` is the only tensor using its storage."""
    try:
        # One reference from the tensor, one from the temporary storage object.
        return bool(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2)
    except (AttributeError, RuntimeError):  # private API gone: never pool
        return False


WORKSPACE = Workspace()
