"""The CPU kernel library: built from C on first use, loaded with ctypes, and its switches.

``rows.c`` (the few-row products of decoding, ``flexmoe.experts.rows``), ``lora_rows.c``
(the LoRA terms of a multi-adapter batch, ``flexmoe.experts.lora_rows``), ``swiglu.c``
(the experts' gated SiLU in one pass, ``flexmoe.experts.swiglu``) and ``team.c``
(``on_team``: Python work on PyTorch's OpenMP threads) are compiled together with the
system's C compiler (``$CC``, else ``cc``) into ``$XDG_CACHE_HOME/flexmoe/kernels``
(``~/.cache`` by default), once per source, compiler and flags (built under a private
name, then renamed, so that processes building at once never see half a file). The
library is linked against ``libgomp.so.1``, so its parallel loops run on PyTorch's own
OpenMP threads. Where the CPU lacks AVX512-BF16, the platform is not Linux, no compiler
works, or ``FLEXMOE_CPU_KERNELS=0`` is set, ``available()`` is false and the callers
keep PyTorch's kernels. AMX tiles (for bf16 products of up to 32 rows) are used where
the CPU and compiler have them, unless ``FLEXMOE_CPU_TILES=0``.
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
from collections.abc import Callable
from pathlib import Path

import torch

from flexmoe.logs import log_once
from flexmoe.threads import uses_openmp

__all__ = [
    "available",
    "bf16_max_rows",
    "decodes_plain",
    "library",
    "on_team",
    "openmp_threads",
    "set_tile_kernels",
    "tile_kernels",
]

logger = logging.getLogger(__name__)

# Beyond these row counts PyTorch's kernels are as fast (measured on an AVX512-BF16 CPU
# with weights larger than its caches, against the BLAS product on the plain weight).
# AMX tiles keep bf16 at memory speed further.
_VECTOR_BF16_MAX_ROWS = 2
_TILE_BF16_MAX_ROWS = 32  # AMX_MAX_ROWS of rows.c: two tiles of 16 rows
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("rows.c", "lora_rows.c", "swiglu.c", "team.c"))
_HEADERS = (Path(__file__).with_name("vector_math.h"),)
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
_TEAM_WORK = ctypes.CFUNCTYPE(None)  # team.c's flexmoe_work


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
    source = b"".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
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
    library.flexmoe_rows_fp32.argtypes = [pointer, size, pointer, size, size, pointer]
    library.flexmoe_rows_fp32.restype = ctypes.c_int
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
    library.flexmoe_expert_int8_many.argtypes = [
        size,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        *expert,
    ]
    library.flexmoe_expert_int8_many.restype = ctypes.c_int
    library.flexmoe_rows_threads.argtypes = []
    library.flexmoe_rows_threads.restype = ctypes.c_int
    library.flexmoe_use_amx.argtypes = [ctypes.c_int]
    library.flexmoe_use_amx.restype = ctypes.c_int
    # is_bf16, x, its row stride, rows, starts, L, A^T, B^T, I, R, O, out, its row stride, width, block stride
    library.flexmoe_lora_add.argtypes = [flag, pointer, size, pointer, pointer, size, pointer, pointer]
    library.flexmoe_lora_add.argtypes += [size] * 3 + [pointer] + [size] * 3
    library.flexmoe_lora_add.restype = ctypes.c_int
    # is_bf16, gate, up, their row stride, rows, cols, then the forward's w, per, out, its row stride;
    # the backward's d, its row stride, rows, cols, w, per, a_w, its row stride, grad_w, d_gate, d_up,
    # their row stride
    library.flexmoe_swiglu_forward.argtypes = [flag, pointer, pointer, size, size, size, pointer, flag]
    library.flexmoe_swiglu_forward.argtypes += [pointer, size]
    library.flexmoe_swiglu_forward.restype = ctypes.c_int
    library.flexmoe_swiglu_backward.argtypes = [flag, pointer, pointer, size, pointer, size, size, size]
    library.flexmoe_swiglu_backward.argtypes += [pointer, flag, pointer, size, pointer, pointer, pointer]
    library.flexmoe_swiglu_backward.argtypes += [size]
    library.flexmoe_swiglu_backward.restype = ctypes.c_int
    library.flexmoe_on_team.argtypes = [_TEAM_WORK, flag]
    library.flexmoe_on_team.restype = ctypes.c_int
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


def library() -> ctypes.CDLL | None:
    """The loaded library (built on first use), or ``None`` where the kernels do not run here."""
    return _library()


def available() -> bool:
    """Whether the row kernels run here (built, or cached from an earlier build)."""
    return _library() is not None


def on_team(work: Callable[[], object], threads: int) -> bool:
    """Call ``work()`` on each of ``threads`` of PyTorch's OpenMP threads (the caller's team), then return.

    The caller runs one of the calls. Returns ``False``, having called nothing, where
    this cannot be done here (no kernel library, or a PyTorch not built on OpenMP):
    the caller then spreads its work some other way. The first exception a call raised
    is raised here, after all calls have returned.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    library = _library()
    if library is None or not uses_openmp():
        return False
    errors: list[BaseException] = []

    def call() -> None:
        try:
            work()
        except BaseException as error:  # a ctypes callback cannot raise: carried to the caller
            errors.append(error)

    library.flexmoe_on_team(_TEAM_WORK(call), threads)
    if errors:
        raise errors[0]
    return True


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
