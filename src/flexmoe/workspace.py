"""A small pool of reusable scratch buffers for the CPU hot path.

PyTorch's CUDA allocator caches freed blocks, but its CPU allocator hands large
tensors straight back to the C library, which returns them to the operating system;
the next step's buffers of the same size then pay a page fault per 4 KiB on first
touch: on a 2-core CPU VM an elementwise op producing a fresh 32 MiB tensor takes
20 ms, the same op into a reused buffer 3.5 ms. The pool keeps scratch buffers of the MoE data path
alive between calls, on CPU only; elsewhere ``take`` is ``torch.empty``.

A buffer is ``take``-n by the code that owns it and offered back with ``give`` once that
code is done with it. ``give`` keeps it only if no other tensor shares its storage (a
view, a tensor saved for backward, a user's hook), so an offered buffer still in use
elsewhere is never handed out twice; a buffer never given back is simply freed.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["WORKSPACE", "Workspace"]


class Workspace:
    """Free lists of CPU storages keyed by ``(bytes, dtype)``."""

    def __init__(self, max_per_key: int = 4) -> None:
        self.max_per_key = max_per_key
        self._free: defaultdict[tuple[int, torch.dtype], list[torch.UntypedStorage]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``: pooled on CPU, else ``torch.empty``."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = 1
        for size in shape:
            numel *= size
        with self._lock:
            free = self._free.get((numel * dtype.itemsize, dtype))
            storage = free.pop() if free else None
        if storage is None:
            return torch.empty(shape, dtype=dtype, device=device)
        # set_ (not a view) so that the tensor is the storage's only user.
        tensor: Tensor = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)  # type: ignore[call-overload]
        return tensor

    def give(self, *tensors: Tensor | None) -> None:
        """Offer buffers back; each is kept only if nothing else shares its storage."""
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
                continue
            if tensor.storage_offset() != 0 or not _sole_owner(tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.nbytes(), tensor.dtype)
            if key[0] != tensor.numel() * tensor.element_size():
                continue
            with self._lock:
                free = self._free[key]
                pointer = storage.data_ptr()
                if len(free) < self.max_per_key and all(s.data_ptr() != pointer for s in free):
                    free.append(storage)

    def clear(self) -> None:
        """Drop every pooled buffer (their memory goes back to the allocator)."""
        with self._lock:
            self._free.clear()

    def pooled_bytes(self) -> int:
        """Bytes currently held in the free lists."""
        with self._lock:
            return sum(storage.nbytes() for free in self._free.values() for storage in free)


def _sole_owner(tensor: Tensor) -> bool:
    """Whether ``tensor`` is the only tensor using its storage."""
    try:
        # One reference from the tensor, one from the temporary storage object.
        return bool(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2)
    except (AttributeError, RuntimeError):  # private API gone: never pool
        return False


WORKSPACE = Workspace()
