"""``quantize_experts``: a copy of a checkpoint directory with its routed experts in int8.

Each expert weight ``w [..., O, I]`` becomes ``w`` int8 and ``w_scale [..., O]`` fp32
(per output channel, ``flexmoe.experts.int8``), in the same file under the same name;
every other tensor is copied as it is. ``load_offloaded`` reads such a copy and computes
its experts from the int8 values: half the bytes of bf16 read per expert. The copy is
written tensor by tensor (``write_safetensors``): no file is ever held in memory whole.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flexmoe.experts.int8 import SCALE_SUFFIX, quantize_int8
from flexmoe.experts.store import SafetensorsFile
from flexmoe.hf.offload import expert_tensor_names
from flexmoe.safetensors_dtypes import SAFETENSORS_DTYPES

__all__ = ["QuantizedCopy", "TensorSpec", "quantize_experts", "write_safetensors"]

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class QuantizedCopy:
    """What ``quantize_experts`` wrote: the directory, and the experts' bytes before and after."""

    path: Path
    tensors: int
    expert_bytes_before: int
    expert_bytes_after: int


def write_safetensors(
    path: str | Path,
    specs: list[TensorSpec],
    tensors: Iterable[Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a ``safetensors`` file whose tensors come one at a time, in the order of ``specs``.

    The header is written first from ``specs``; each tensor of ``tensors`` must then have
    its spec's dtype and shape. Only one tensor is in memory at a time, so files larger
    than memory can be written.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        if spec.dtype not in _NAMES:
            raise ValueError(
                f"write_safetensors: {spec.name} has dtype {spec.dtype}, which safetensors lacks"
            )
        header[spec.name] = {
            "dtype": _NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    given = iter(tensors)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for written, spec in enumerate(specs):
            tensor = next(given, None)
            if tensor is None:
                raise ValueError(f"write_safetensors: {len(specs)} tensors in the header, {written} given")
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"write_safetensors: {spec.name} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"the header says {spec.dtype} {spec.shape}"
                )
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            file.write(raw.numpy().tobytes())  # one tensor's bytes at a time
    if next(given, None) is not None:
        raise ValueError(f"write_safetensors: {len(specs)} tensors in the header, more given")


def quantize_experts(src: str | Path, dst: str | Path) -> QuantizedCopy:
    """Copy the ``save_pretrained`` directory ``src`` to ``dst`` with its routed experts in int8.

    The experts are those ``load_offloaded`` offloads (per expert or stacked; shared
    experts and everything else are copied unchanged, as are ``config.json``, the
    tokenizer and every other file). ``dst`` must not exist or be empty. Read the copy
    with ``flexmoe.hf.load_offloaded(dst, ...)``; ``transformers`` itself cannot load it.
    """
    source, target = Path(src), Path(dst)
    experts = expert_tensor_names(source)  # checks that src is a loadable checkpoint directory
    if target.resolve() == source.resolve():
        raise ValueError(f"dst must differ from src, got {target}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"dst must be a new or empty directory, got {target}")
    target.mkdir(parents=True, exist_ok=True)
    before = after = count = 0
    weight_map: dict[str, str] = {}
    for path, names in experts.items():
        file = SafetensorsFile(path)
        if file.unsupported:
            raise ValueError(
                f"{path} has tensors of a dtype this copy cannot write: {sorted(file.unsupported)}"
            )
        specs = _quantized_specs(file, names)
        write_safetensors(target / path.name, specs, _quantized_tensors(file, names), file.metadata or None)
        weight_map |= dict.fromkeys((spec.name for spec in specs), path.name)
        quantized = [spec for spec in specs if spec.name in names or spec.name[: -len(SCALE_SUFFIX)] in names]
        before += sum(file.tensors[name].end - file.tensors[name].begin for name in names)
        after += sum(spec.nbytes for spec in quantized)
        count += len(names)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != _INDEX:
            shutil.copy2(item, target / item.name)
    if (source / _INDEX).is_file():
        index = json.loads((source / _INDEX).read_text())
        total = sum((target / name).stat().st_size for name in set(weight_map.values()))
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (target / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return QuantizedCopy(target, count, before, after)


def _quantized_specs(file: SafetensorsFile, names: set[str]) -> list[TensorSpec]:
    """The tensors of the copy of ``file``, in file order; an expert ``w``: ``w`` int8 and its scales."""
    specs = []
    for name, info in sorted(file.tensors.items(), key=lambda item: item[1].begin):
        if name not in names:
            specs.append(TensorSpec(name, info.dtype, info.shape))
            continue
        if not info.dtype.is_floating_point or len(info.shape) < 2:
            raise ValueError(f"{name} in {file.path} is {info.dtype} {info.shape}, not a float expert weight")
        specs.append(TensorSpec(name, torch.int8, info.shape))
        specs.append(TensorSpec(name + SCALE_SUFFIX, torch.float32, info.shape[:-1]))
    return specs


def _quantized_tensors(file: SafetensorsFile, names: set[str]) -> Iterator[Tensor]:
    """The tensors of ``_quantized_specs``, read and quantized one at a time."""
    for name in sorted(file.tensors, key=lambda name: file.tensors[name].begin):
        tensor = file.read(name)
        if name not in names:
            yield tensor
        elif tensor.dim() > 2:  # stacked [E, O, I]: one expert at a time bounds the fp32 temporaries
            pairs = [quantize_int8(row) for row in tensor]
            yield torch.stack([q for q, _ in pairs])
            yield torch.stack([scale for _, scale in pairs])
        else:
            yield from quantize_int8(tensor)
