"""Files of a checkpoint, written durably and read without trusting them.

Writing: every file is fsynced before it is renamed into place, and its directory after
(a rename is durable only once its directory is). Reading: names must be plain file names
that stay inside their directory (symbolic links included), JSON must be an object without
duplicate keys, and a safetensors header is parsed and checked here (dtype, shape and byte
range of every tensor, no duplicate names) so that a tensor's dtype and shape are known
before any data is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.safetensors_dtypes import SAFETENSORS_DTYPES

__all__ = [
    "TensorInfo",
    "check_plain_name",
    "fsync_dir",
    "fsync_file",
    "read_json",
    "read_safetensors_header",
    "resolve_inside",
    "safetensors_torch",
    "write_json_atomic",
    "write_text_atomic",
]

MAX_JSON_BYTES = 256 << 20  # a manifest indexes tensor names: far below this
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

DTYPES = SAFETENSORS_DTYPES


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape as a safetensors header declares them."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def describe(self) -> str:
        """``float32 [4, 16]``: for error messages."""
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"


def check_plain_name(name: object, what: str) -> str:
    """``name`` if it is a plain file name (no directory part, not ``.``/``..``, no NUL), else refuse.

    ``what`` says where the name comes from, for the error.
    """
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise CheckpointError(f"{what}: file name {name!r} is not a plain name inside the checkpoint")
    return name


def resolve_inside(directory: Path, name: str, what: str) -> Path:
    """``directory / name`` after checking that it exists and, links resolved, stays in ``directory``."""
    path = directory / check_plain_name(name, what)
    if not path.exists():
        raise CheckpointError(f"{what}: {name!r} is missing from {directory}")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{what}: {name!r} links outside {directory} (to {path.resolve()})")
    return path


def safetensors_torch() -> Any:
    """The ``safetensors.torch`` module (an optional dependency: the ``train`` extra)."""
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - the train extra installs it
        raise ImportError("checkpoints need safetensors: pip install 'flexmoe[train]'") from error
    return safetensors.torch


# ------------------------------------------------------------------ durable writes


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the renames and new entries in directory ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: readers see the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    """``write_text_atomic`` of ``value`` as indented JSON."""
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))


# ------------------------------------------------------------------ untrusted reads


def _refuse_duplicates(what: str) -> Any:
    """A ``json`` ``object_pairs_hook`` that refuses a repeated key (parsers disagree on which wins)."""

    def object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{what}: duplicate key {key!r}")
            out[key] = value
        return out

    return object_pairs


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as a JSON object (UTF-8, no duplicate keys), else ``CheckpointError`` naming ``what``."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_duplicates(what))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{what} is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} must hold a JSON object, not {type(value).__name__}")
    return value


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in file ``path`` (at most ``MAX_JSON_BYTES``)."""
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    return parse_json_object(data, what)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of safetensors file ``path``, checked, without reading its data.

    The checks: the header fits the file; every entry has a known dtype, a shape of
    non-negative ints and a byte range of exactly ``numel * itemsize`` bytes; the ranges
    tile the data section with no gap, overlap or tail (so a truncated file is refused);
    no tensor name appears twice.
    """
    what = f"{path.name} (in {path.parent})"
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{what}: the header length {length} does not fit the file ({size} bytes)")
        header = parse_json_object(f.read(length), f"{what} header")
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        info, begin, end = _header_entry(entry, f"{what}: tensor {key!r}")
        tensors[key] = info
        ranges.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            raise CheckpointError(f"{what}: tensor {key!r} starts at byte {begin}, expected {position}")
        position = end
    if position != size - 8 - length:
        raise CheckpointError(
            f"{what}: the tensors cover {position} bytes of a {size - 8 - length}-byte data section"
        )
    return tensors


def _header_entry(entry: object, what: str) -> tuple[TensorInfo, int, int]:
    """One header entry as ``(info, begin, end)``, checked."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{what}: malformed header entry {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{what}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CheckpointError(f"{what}: shape {shape!r} is not a list of ints >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise CheckpointError(f"{what}: data_offsets {offsets!r} is not two ints")
    begin, end = offsets
    nbytes = DTYPES[dtype].itemsize
    for n in shape:
        nbytes *= n  # Python ints: a huge claimed shape cannot overflow, only mismatch
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(
            f"{what}: {dtype} {shape} needs {nbytes} bytes, its data_offsets give {end - begin}"
        )
    return TensorInfo(DTYPES[dtype], tuple(shape)), begin, end
