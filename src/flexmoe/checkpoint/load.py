"""``load_checkpoint``: check everything, read everything, then change the model and optimizer.

The order is what makes a refusal harmless: the manifest and every safetensors header are
checked against the model (and optimizer) first, dtype and shape of every tensor the
model needs, nothing missing, nothing extra; then the tensors are read into memory; only
then are the optimizer and the model loaded. No code runs on load (JSON and safetensors,
no pickle).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.checkpoint.directory import latest_checkpoint
from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.checkpoint.files import TensorInfo, read_safetensors_header, resolve_inside, safetensors_torch
from flexmoe.checkpoint.layout import (
    ExpertParam,
    adapted_rows,
    expert_key,
    expert_params,
    expert_tensor,
    layer_config,
    local_from_whole,
    lora_derived_keys,
    moe_layers,
    optim_key,
    unadapted_rows,
    whole_expert_shapes,
)
from flexmoe.checkpoint.manifest import Manifest, read_manifest
from flexmoe.checkpoint.optimizer import (
    Expect,
    check_param_groups,
    declared_state,
    expected_optimizer_tensors,
    optimizer_state_dict,
)
from flexmoe.layer import MoELayer, flexmoe_state_names
from flexmoe.parallel import all_ranks_ok

__all__ = ["load_checkpoint"]

Index = dict[str, tuple[str, TensorInfo]]  # stored tensor name -> (file, dtype and shape)


@dataclass(frozen=True)
class Staged:
    """A checkpoint checked and read into memory, not yet loaded."""

    manifest: dict[str, Any]
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load the newest checkpoint in ``directory`` into ``model`` (and ``optimizer``); returns its manifest.

    Refuses (``CheckpointError``, naming the file, field or tensor) a checkpoint that is
    corrupt or does not match the model, before anything is loaded. Works for any world
    size, whatever the world size that saved it; a collective when the model has
    distributed MoE layers (every rank refuses if one does).
    """
    layers = moe_layers(model)
    stage = functools.partial(_stage, Path(directory), model, optimizer, layers)
    distributed = any(layer.world_size > 1 for layer in layers.values())
    staged = _on_every_rank(stage) if distributed else stage()
    _apply(staged, model, optimizer)
    return staged.manifest


def _on_every_rank(stage: Callable[[], Staged]) -> Staged:
    """``stage()``, raising on every rank if it failed on any (none goes on alone)."""
    try:
        staged = stage()
    except Exception:
        all_ranks_ok(False)
        raise
    if not all_ranks_ok(True):
        raise CheckpointError("loading the checkpoint failed on another rank")
    return staged


def _stage(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, layers: dict[str, MoELayer]
) -> Staged:
    """Check the checkpoint against the model and optimizer, then read what this rank needs."""
    # 1. The manifest and the headers of its files.
    path = latest_checkpoint(directory)
    manifest, raw = read_manifest(path)
    index = _index_files(path, manifest)
    _check_layers(manifest, layers)
    # 2. Every tensor the model and optimizer need: present, with their dtype and shape; nothing else.
    expect = _expected_model_tensors(model, layers)
    declared: dict[str, list[str]] = {}
    if optimizer is not None:
        declared, expect_optimizer = _expected_optimizer(manifest, path, model, optimizer, layers, index)
        expect.update(expect_optimizer)
    _check_index(path, index, expect, optimizer is not None)
    # 3. Read.
    with ExitStack() as stack:
        read = _Reader(path, index, stack)
        state = _read_model_state(model, layers, read)
        optimizer_state = None
        if optimizer is not None:
            assert manifest.optimizer is not None  # checked by _expected_optimizer
            names = {id(p): n for n, p in model.named_parameters()}
            tensors = _read_optimizer_tensors(optimizer, names, layers, declared, set(index), read)
            optimizer_state = optimizer_state_dict(manifest.optimizer, optimizer, names, tensors)
    return Staged(raw, state, optimizer_state)


def _apply(staged: Staged, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load the checked state: the optimizer first, put back if the model then fails."""
    before = None if optimizer is None else optimizer.state_dict()
    if optimizer is not None and staged.optimizer_state is not None:
        optimizer.load_state_dict(staged.optimizer_state)
    try:
        with flexmoe_state_names():
            model.load_state_dict(staged.model_state, strict=True)
    except RuntimeError as error:  # not expected after the checks
        if optimizer is not None and before is not None:
            optimizer.load_state_dict(before)
        raise CheckpointError(f"the checkpoint does not fit this model: {error}") from error


# ------------------------------------------------------------------ checks


def _index_files(path: Path, manifest: Manifest) -> Index:
    """Where each stored tensor is, from the headers; the manifest's index must match them."""
    index: Index = {}
    for fname, keys in manifest.files.items():
        header = read_safetensors_header(resolve_inside(path, fname, f"{path / 'manifest.json'}"))
        listed = set(keys)
        if len(listed) != len(keys) or listed != set(header):
            raise CheckpointError(
                f"{path / fname}: the manifest lists {sorted(listed - set(header))} that the file lacks, "
                f"and the file holds {sorted(set(header) - listed)} that the manifest does not list"
                + (" (and lists a tensor twice)" if len(listed) != len(keys) else "")
            )
        for key in keys:
            if key in index:
                raise CheckpointError(f"{path}: tensor {key!r} is in both {index[key][0]} and {fname}")
            index[key] = (fname, header[key])
    return index


def _check_layers(manifest: Manifest, layers: dict[str, MoELayer]) -> None:
    """The checkpoint's MoE layers must be the model's, with the same settings."""
    if sorted(manifest.layers) != sorted(layers):
        raise CheckpointError(
            f"MoE layers differ: checkpoint has {sorted(manifest.layers)}, model has {sorted(layers)}"
        )
    for lname, layer in layers.items():
        mine = layer_config(layer)
        for key in sorted(mine.keys() | manifest.layers[lname].keys()):
            value = manifest.layers[lname].get(key)
            if mine.get(key) != value:
                raise CheckpointError(
                    f"MoE layer {lname!r}: {key} is {value} in the checkpoint "
                    f"but {mine.get(key)} in the model"
                )


def _expected_model_tensors(model: nn.Module, layers: dict[str, MoELayer]) -> dict[str, Expect]:
    """Every model tensor the checkpoint must hold: ``state_dict`` entries, experts whole."""
    experts = expert_params(layers)
    derived = lora_derived_keys(layers)
    with flexmoe_state_names():  # converted transformers blocks: flexmoe's names, no collective
        state = model.state_dict()
    expect = {
        key: Expect(TensorInfo(value.dtype, tuple(value.shape)))
        for key, value in state.items()
        if key not in experts and key not in derived
    }
    for name, (info, count) in _whole_expert_infos(layers).items():
        expect.update({expert_key(name, e): Expect(info) for e in range(count)})
    return expect


def _whole_expert_infos(layers: dict[str, MoELayer]) -> dict[str, tuple[TensorInfo, int]]:
    """Each expert parameter's single-device info per expert, and the expert count."""
    out = {}
    for name, param in expert_params(layers).items():
        layer = layers[param.layer]
        shape = whole_expert_shapes(layer)[param.name]
        stored = expert_tensor(layer, param.name)
        dtype = layer.experts.w_in.dtype if stored is None else stored.dtype
        assert isinstance(dtype, torch.dtype)
        out[name] = (TensorInfo(dtype, shape), layer.config.num_experts)
    return out


def _expected_optimizer(
    manifest: Manifest,
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layers: dict[str, MoELayer],
    index: Index,
) -> tuple[dict[str, list[str]], dict[str, Expect]]:
    """The optimizer's groups checked; its declared state keys, and every ``optim/`` tensor expected."""
    if manifest.optimizer is None:
        raise CheckpointError(f"{path} holds no optimizer state")
    params = dict(model.named_parameters())
    experts = expert_params(layers)
    names = {id(p): n for n, p in params.items()}
    check_param_groups(manifest.optimizer, optimizer, names, {n for n in experts if n not in params})
    declared = declared_state(manifest.optimizer, experts, set(index))
    dense = {n: TensorInfo(p.dtype, tuple(p.shape)) for n, p in params.items() if n not in experts}
    whole: dict[str, tuple[ExpertParam, TensorInfo, int]] = {
        n: (experts[n], info, count) for n, (info, count) in _whole_expert_infos(layers).items()
    }
    return declared, expected_optimizer_tensors(manifest.optimizer, declared, dense, whole, set(index))


def _check_index(path: Path, index: Index, expect: dict[str, Expect], with_optimizer: bool) -> None:
    """Every expected tensor is stored with an accepted dtype and shape; nothing else is stored."""
    for key, want in expect.items():
        if key not in index:
            raise CheckpointError(f"{path} has no tensor {key!r}")
        fname, got = index[key]
        if not want.accepts(got):
            raise CheckpointError(
                f"tensor {key!r}: dtype and shape are {got.describe()} in {path / fname}, "
                f"but the model needs {want.describe()}"
            )
    unexpected = sorted(
        k for k in index if k not in expect and (with_optimizer or not k.startswith("optim/"))
    )
    if unexpected:
        raise CheckpointError(
            f"{path} holds tensors this model lacks: {', '.join(map(repr, unexpected[:5]))}"
        )


# ------------------------------------------------------------------ reading


class _Reader:
    """``read(key)``: a stored tensor, from files opened once; checked again against its header."""

    def __init__(self, path: Path, index: Index, stack: ExitStack) -> None:
        self.path, self.index, self.stack = path, index, stack
        self.handles: dict[str, Any] = {}

    def __call__(self, key: str) -> Tensor:
        fname, info = self.index[key]
        st = safetensors_torch()
        try:
            if fname not in self.handles:
                self.handles[fname] = self.stack.enter_context(
                    st.safe_open(str(self.path / fname), framework="pt")
                )
            tensor: Tensor = self.handles[fname].get_tensor(key)
        except Exception as error:  # safetensors' own checks (SafetensorError) or I/O
            raise CheckpointError(f"{self.path / fname}: cannot read {key!r}: {error}") from error
        if TensorInfo(tensor.dtype, tuple(tensor.shape)) != info:
            raise CheckpointError(f"{self.path / fname}: {key!r} does not read back as its header says")
        return tensor


def _per_expert(read: Callable[[str], Tensor], name: str) -> Callable[[int], Tensor]:
    """``e -> read(<name>.e<e>)``: one whole expert's tensor."""
    return lambda e: read(expert_key(name, e))


def _read_model_state(
    model: nn.Module, layers: dict[str, MoELayer], read: Callable[[str], Tensor]
) -> dict[str, Tensor]:
    """The model's ``state_dict`` as stored: this rank's part of each expert parameter."""
    experts = expert_params(layers)
    derived = lora_derived_keys(layers)
    with flexmoe_state_names():
        current = model.state_dict()
    state = {key: read(key) for key in current if key not in experts and key not in derived}
    state.update({key: current[key] for key in derived})  # the model's own adapters' expert ids
    for name, param in experts.items():
        layer = layers[param.layer]
        if expert_tensor(layer, param.name) is None:
            continue  # a sharded expert's b_out off shard 0
        local = local_from_whole(layer, param.name, _per_expert(read, name))
        if local is None:
            continue
        if param.name.startswith("lora.") and unadapted_rows(layer, local).any():
            raise CheckpointError(
                f"{name}: the checkpoint's adapter has factors for experts this model's adapter "
                "does not adapt (attach the adapter with the same experts)"
            )
        state[name] = adapted_rows(layer, param.name, local)
    return state


def _read_optimizer_tensors(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    layers: dict[str, MoELayer],
    declared: dict[str, list[str]],
    stored: set[str],
    read: Callable[[str], Tensor],
) -> dict[str, dict[str, Tensor]]:
    """The tensor state of the optimizer's parameters, by name (expert state: this rank's part)."""
    experts = expert_params(layers)
    out: dict[str, dict[str, Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for state_key in declared.get(name, []):
                key = optim_key(name, state_key)
                if name in experts and key not in stored:
                    param = experts[name]
                    layer = layers[param.layer]
                    value = local_from_whole(layer, param.name, _per_expert(read, key))
                    value = None if value is None else adapted_rows(layer, param.name, value)
                else:
                    value = read(key)
                if value is not None:
                    out.setdefault(name, {})[state_key] = value
    return out
