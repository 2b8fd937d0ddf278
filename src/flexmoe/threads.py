"""How many threads the calling thread's PyTorch CPU ops use, set for that thread alone.

flexmoe runs some work on background threads: expert reads (and packing) for the
offloaded experts' cache, collectives overlapped with compute, and expert GEMMs spread
over cores. Such a thread must run its PyTorch ops on one thread. With PyTorch's OpenMP
backend, a background thread that runs one parallel op gets its own team of OpenMP
workers; once a process has more OpenMP workers than cores, GNU OpenMP makes every
team, the main thread's included, stop spinning between parallel regions almost at
once, so each of the main thread's many small ops pays a wake-up (on a 2-core CPU, one
idle background thread that had packed one weight made a 25-layer bf16 decode step
35 % slower).

``torch.set_num_threads`` changes a process-wide value too (what new threads start
with, the size of PyTorch's other thread pool), so ``set_thread_intraop_threads`` sets
the calling thread's OpenMP value directly, through the OpenMP runtime PyTorch is
linked with, and falls back to ``torch.set_num_threads`` where that runtime is not
reachable.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

__all__ = ["one_thread_worker", "set_thread_intraop_threads", "uses_openmp"]


@functools.cache
def _openmp_setter() -> Callable[[int], object] | None:
    """``omp_set_num_threads`` of the OpenMP runtime PyTorch uses, where one is reachable."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # torch._C's own dependencies: its OpenMP runtime, not some other library's
        setter: Callable[[int], object] = ctypes.CDLL(torch._C.__file__).omp_set_num_threads
    except (OSError, AttributeError, TypeError):
        return None
    return setter


def uses_openmp() -> bool:
    """Whether PyTorch's CPU ops run on an OpenMP runtime this process can reach."""
    return _openmp_setter() is not None


def set_thread_intraop_threads(threads: int) -> None:
    """Make the calling thread's PyTorch CPU ops use ``threads`` threads; other threads keep theirs.

    Falls back to ``torch.set_num_threads`` (process-wide for new threads) where
    PyTorch's OpenMP runtime cannot be reached.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    setter = _openmp_setter()
    torch.get_num_threads()  # PyTorch sets each thread's count when it first asks: let it, first
    if setter is not None:
        setter(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def one_thread_worker() -> None:
    """A ``ThreadPoolExecutor`` initializer: the worker's PyTorch CPU ops run on one thread."""
    set_thread_intraop_threads(1)
