"""``save_checkpoint``: collect and check, prepare, write, publish; every rank in step.

Each step runs on every rank (or on rank 0) and ends with the ranks agreeing that it
succeeded, so a failure on one rank makes every rank raise instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from flexmoe.checkpoint.directory import checkpoint_name, prepare_partial, prune, publish
from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.checkpoint.files import (
    fsync_dir,
    fsync_file,
    read_safetensors_header,
    safetensors_torch,
    write_json_atomic,
)
from flexmoe.checkpoint.layout import (
    expert_key,
    expert_params,
    expert_prefix,
    expert_rows,
    expert_tensor,
    layer_config,
    layer_expert_names,
    lora_derived_keys,
    moe_layers,
    optim_key,
    whole_experts,
)
from flexmoe.checkpoint.manifest import Manifest
from flexmoe.checkpoint.optimizer import CollectedOptimizer, collect_optimizer
from flexmoe.layer import MoELayer, flexmoe_state_names
from flexmoe.parallel import on_every_rank, rank_and_world

__all__ = ["save_checkpoint"]

T = TypeVar("T")


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save ``model`` (and ``optimizer``) as checkpoint ``step`` under ``directory``; returns its path.

    ``extra`` (a JSON-serialisable dict) is stored in the manifest, e.g. the model config
    and the training arguments. Afterwards ``keep`` checkpoints remain: this one, then
    the newest by step. A save of an existing step replaces it atomically. Every rank
    calls it (a collective when the model has distributed MoE layers).
    """
    _check_arguments(step, keep, extra)
    root, name = Path(directory), checkpoint_name(step)
    rank, world = rank_and_world()
    layers = moe_layers(model)
    # 1. Collect and check everything before touching the disk: a refusal leaves no trace.
    collected = _together("collecting the optimizer state", lambda: _collect(optimizer, model))
    experts = _expert_tensors(layers, collected)  # a collective for sharded experts
    # 2. Rank 0 finishes or removes interrupted saves and makes the partial directory.
    partial = root / f"{name}.partial"
    _together("preparing the directory", lambda: prepare_partial(root, name), rank0_only=True)
    # 3. Every rank writes the experts it holds, rank 0 everything else; all fsynced.
    _together("writing the tensors", lambda: _write_tensors(partial, rank, experts, model, layers, collected))
    # 4. Rank 0 writes the manifest, publishes the checkpoint, then prunes old ones.
    manifest = Manifest(
        step=step,
        world_size=world,
        layers={n: layer_config(layer) for n, layer in layers.items()},
        files={},
        optimizer=None if collected is None else collected.record,
        extra=extra or {},
    )
    _together("publishing", lambda: _publish(root, partial, name, manifest, keep), rank0_only=True)
    return root / name


def _check_arguments(step: object, keep: object, extra: object) -> None:
    """Refuse bad arguments before any work (``ValueError``, naming the argument)."""
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as error:
            raise ValueError(f"extra must be JSON-serialisable: {error}") from None


def _together(what: str, action: Callable[[], T], *, rank0_only: bool = False) -> T | None:
    """``action()`` on every rank (or rank 0 only); if it raised on any rank, every rank raises."""
    return on_every_rank(
        action,
        lambda: CheckpointError(f"saving a checkpoint: {what} failed on another rank"),
        rank0_only=rank0_only,
    )


def _collect(optimizer: torch.optim.Optimizer | None, model: nn.Module) -> CollectedOptimizer | None:
    """The optimizer's state by parameter name, checked (``None`` without an optimizer)."""
    return None if optimizer is None else collect_optimizer(optimizer, model)


def _expert_tensors(layers: dict[str, MoELayer], collected: CollectedOptimizer | None) -> dict[str, Tensor]:
    """The whole experts this rank writes: parameters (and adapters' factors), then their optimizer state."""
    state = {} if collected is None else collected.tensors
    out: dict[str, Tensor] = {}
    for lname, layer in layers.items():
        prefix = expert_prefix(lname)
        names = layer_expert_names(layer)
        params = {p: expert_rows(layer, p, expert_tensor(layer, p)) for p in names}
        for e, parts in whole_experts(layer, params).items():
            out.update({expert_key(prefix + p, e): t for p, t in parts.items()})
        # State shaped like the parameters goes the same way; scalars are written whole by rank 0.
        keys = {k for p in names for k, v in state.get(prefix + p, {}).items() if v.dim() > 0}
        for key in sorted(keys):  # the same order on every rank: gathers pair up
            held = {p for p in names if key in state.get(prefix + p, {})}
            like = {
                p: None
                if t is None
                else expert_rows(layer, p, state.get(prefix + p, {}).get(key, torch.zeros_like(t)))
                for p, t in ((p, expert_tensor(layer, p)) for p in names)
            }
            for e, parts in whole_experts(layer, like).items():
                out.update(
                    {expert_key(optim_key(prefix + p, key), e): t for p, t in parts.items() if p in held}
                )
    return out


def _dense_tensors(
    model: nn.Module, layers: dict[str, MoELayer], collected: CollectedOptimizer | None
) -> dict[str, Tensor]:
    """Everything but the whole experts: the other model tensors and the other optimizer state."""
    experts = expert_params(layers)
    derived = lora_derived_keys(layers)
    with flexmoe_state_names():  # converted transformers blocks: flexmoe's names, no collective
        state = model.state_dict()
    out = {k: v.detach().contiguous() for k, v in state.items() if k not in experts and k not in derived}
    for name, state in ({} if collected is None else collected.tensors).items():
        for key, value in state.items():
            if name not in experts or value.dim() == 0:
                out[optim_key(name, key)] = value.contiguous()
    return out


def _write_tensors(
    partial: Path,
    rank: int,
    experts: dict[str, Tensor],
    model: nn.Module,
    layers: dict[str, MoELayer],
    collected: CollectedOptimizer | None,
) -> None:
    """Write the rank's ``experts-rank<r>.safetensors`` (rank 0: and ``model.safetensors``), fsynced."""
    st = safetensors_torch()
    files = {f"experts-rank{rank}.safetensors": experts}
    if rank == 0:
        files["model.safetensors"] = _dense_tensors(model, layers, collected)
    for fname, tensors in files.items():
        st.save_file(tensors, str(partial / fname))
        fsync_file(partial / fname)


def _publish(root: Path, partial: Path, name: str, manifest: Manifest, keep: int) -> None:
    """Index the files, write the manifest last, publish the checkpoint, prune (rank 0)."""
    names = ["model.safetensors", *(f"experts-rank{r}.safetensors" for r in range(manifest.world_size))]
    files = {fname: sorted(read_safetensors_header(partial / fname)) for fname in names}
    write_json_atomic(partial / "manifest.json", dataclasses.replace(manifest, files=files).to_json())
    fsync_dir(partial)
    publish(root, partial, name)
    prune(root, keep, protect=name)
