"""The manifest (``manifest.json``): what a checkpoint holds, checked field by field on load.

Fields (format ``flexmoe-checkpoint`` version 1)::

    step, world_size      ints (the step saved, the ranks that saved it)
    layers                {MoE layer name: {dim, hidden_dim, num_experts, top_k, activation, bias}}
    files                 {file name: [tensor names in it]}  (plain names inside the checkpoint)
    optimizer             null, or {"param_groups": [{hyper-parameters, "params": [names]}],
                          "scalars": {"<param>/<key>": JSON value},
                          "tensors": {"<param>": [state keys stored as tensors]}}
    extra                 a JSON object of the caller's (e.g. training settings)

``optimizer.tensors`` was added later in version 1 (older readers ignore it); without it
the state keys are taken from the file index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.checkpoint.files import check_plain_name, read_json, resolve_inside

__all__ = ["FORMAT", "VERSION", "Manifest", "OptimizerRecord", "read_manifest"]

FORMAT = "flexmoe-checkpoint"
VERSION = 1
JSON_VALUE = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class OptimizerRecord:
    """The optimizer's part of a manifest: groups with parameter names, plain values, tensor keys."""

    param_groups: list[dict[str, Any]]
    scalars: dict[str, Any]  # "<param>/<key>" -> JSON value
    tensors: dict[str, list[str]] | None  # param -> state keys held as tensors (None: older manifest)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the manifest."""
        return {"param_groups": self.param_groups, "scalars": self.scalars, "tensors": self.tensors}


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's manifest, checked (see the module docstring for its fields)."""

    step: int
    world_size: int
    layers: dict[str, dict[str, Any]]
    files: dict[str, list[str]]
    optimizer: OptimizerRecord | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json``."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "layers": self.layers,
            "files": self.files,
            "optimizer": None if self.optimizer is None else self.optimizer.to_json(),
            "extra": self.extra,
        }


def read_manifest(path: Path) -> tuple[Manifest, dict[str, Any]]:
    """The checked manifest of checkpoint ``path``, and its raw JSON object."""
    where = f"{path / 'manifest.json'}"
    raw = read_json(resolve_inside(path, "manifest.json", str(path)), where)
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} v{VERSION} checkpoint (its manifest says otherwise)")
    manifest = Manifest(
        step=_int(raw, "step", 0, where),
        world_size=_int(raw, "world_size", 1, where),
        layers=_layers(_field(raw, "layers", dict, where), where),
        files=_files(_field(raw, "files", dict, where), where),
        optimizer=_optimizer(raw.get("optimizer"), where),
        extra=_field(raw, "extra", dict, where),
    )
    return manifest, raw


def _field(raw: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """Field ``name`` of the manifest, which must be of JSON type ``kind``."""
    value = raw.get(name)
    if not isinstance(value, kind):
        kind_name = "object" if kind is dict else kind.__name__
        raise CheckpointError(f"{where}: field {name!r} must be a JSON {kind_name}, got {value!r}")
    return value


def _int(raw: dict[str, Any], name: str, minimum: int, where: str) -> int:
    """Field ``name``: an int (not a bool, not a float) of at least ``minimum``."""
    value = raw.get(name)
    if type(value) is not int or value < minimum:
        raise CheckpointError(f"{where}: field {name!r} must be an int >= {minimum}, got {value!r}")
    return value


def _strings(value: object, what: str) -> list[str]:
    """``value`` if it is a list of strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{what} must be a list of strings, got {value!r}")
    return value


def _layers(value: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Field ``layers``: an object per MoE layer (its settings are compared with the model's on load)."""
    for name, config in value.items():
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: field 'layers' entry {name!r} must be an object, got {config!r}")
    return value


def _files(value: dict[str, Any], where: str) -> dict[str, list[str]]:
    """Field ``files``: plain file names, each with a list of tensor names."""
    for name, keys in value.items():
        check_plain_name(name, f"{where} (field 'files')")
        _strings(keys, f"{where}: field 'files' entry {name!r}")
    return value


def _optimizer(value: object, where: str) -> OptimizerRecord | None:
    """Field ``optimizer``: null, or groups naming their parameters, plain values and tensor keys."""
    if value is None:
        return None
    what = f"{where}: field 'optimizer'"
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} must be null or an object, got {value!r}")
    groups = value.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{what}: 'param_groups' must be a list of objects")
    for i, group in enumerate(groups):
        _strings(group.get("params"), f"{what}: param_groups[{i}]['params']")
    scalars = value.get("scalars")
    if not isinstance(scalars, dict) or not all(isinstance(v, JSON_VALUE) for v in scalars.values()):
        raise CheckpointError(f"{what}: 'scalars' must be an object of plain JSON values")
    tensors = value.get("tensors")
    if tensors is not None:
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{what}: 'tensors' must be an object, got {tensors!r}")
        for name, keys in tensors.items():
            _strings(keys, f"{what}: 'tensors' entry {name!r}")
    return OptimizerRecord(groups, scalars, tensors)
