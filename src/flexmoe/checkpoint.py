"""Checkpoints: ``safetensors`` files plus a JSON manifest, re-shardable and written atomically.

Layout of a checkpoint directory ``DIR``::

    DIR/LATEST                      name of the newest complete checkpoint (atomically replaced)
    DIR/step-000120/manifest.json   format, step, world size, MoE layer configs, file index, extra
    DIR/step-000120/model.safetensors         every non-expert tensor (written by rank 0)
    DIR/step-000120/experts-rank0.safetensors expert tensors, one entry per expert

Experts are stored per expert and whole (``<layer>.experts.w_in.e<expert>`` with the
single-device shape of that expert), whatever the world size that wrote them, so a
checkpoint written by ``W`` ranks loads on ``W'`` ranks (or one device): each rank
reads the experts it owns under the new layout and keeps its slice. Optimizer state
(e.g. AdamW's moments) is stored the same way, keyed ``optim/<parameter>/<state>``.

Atomicity: a save writes into ``step-N.partial/``, fsyncs every file and the directory,
renames it to ``step-N/`` and only then replaces ``LATEST`` (write a temporary file,
fsync, ``os.replace``). A save interrupted at any point leaves ``LATEST`` naming the
previous complete checkpoint, which is never modified.

Every rank calls ``save_checkpoint`` / ``load_checkpoint`` (they are collectives when
the model has distributed MoE layers).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.experts import GroupedExperts
from flexmoe.layer import MoELayer
from flexmoe.parallel import all_ranks_ok, barrier, rank_and_world

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "flexmoe-checkpoint"
VERSION = 1
EXPERT_NAMES = ("w_in", "w_out", "b_in", "b_out")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model (missing, corrupt or mismatched)."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - the train extra installs it
        raise ImportError("checkpoints need safetensors: pip install 'flexmoe[train]'") from error
    return safetensors.torch


def _moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    for name, layer in layers.items():
        if not isinstance(layer.experts, GroupedExperts):
            raise CheckpointError(
                f"MoE layer {name or '<root>'!r} has custom experts; checkpoints need the built-in ones"
            )
    return layers


def _layer_config(layer: MoELayer) -> dict[str, Any]:
    cfg = layer.config
    return {
        "dim": cfg.dim,
        "hidden_dim": cfg.hidden_dim,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "activation": cfg.experts.activation,
        "bias": cfg.experts.bias,
    }


def _expert_prefix(layer_name: str) -> str:
    return f"{layer_name}.experts." if layer_name else "experts."


def _whole_experts(layer: MoELayer, tensors: tuple[Tensor | None, ...]) -> dict[int, dict[str, Tensor]]:
    """Whole experts (single-device shapes) that this rank writes.

    From tensors shaped like the layer's stored expert parameters. A collective for
    sharded experts: every rank calls it.
    """
    experts = layer.experts
    assert isinstance(experts, GroupedExperts)
    ep = layer._ep
    stored = layer.stored_experts  # logical expert of each stored row (any placement)
    if ep is None or not ep.placement.sharded:
        whole = tensors
    else:
        # Gather the expert's S shards (r=1: one group per expert); shard 0's rank writes it.
        gathered = ep.gather_like(tensors, experts, 1, has_bias=experts.b_in is not None)  # type: ignore[arg-type]
        if ep.placement.shard_index != 0:
            return {}
        whole = gathered
    out: dict[int, dict[str, Tensor]] = {}
    for i, expert in enumerate(stored):
        out[expert] = {
            name: t[i].detach().contiguous()
            for name, t in zip(EXPERT_NAMES, whole, strict=True)
            if t is not None
        }
    return out


def _local_from_whole(layer: MoELayer, name: str, get: Callable[[int], Tensor]) -> Tensor | None:
    """The rank's stored tensor ``name``, built from whole experts ``get(e)``."""
    ep = layer._ep
    if ep is None:
        return torch.stack([get(e) for e in range(layer.config.num_experts)])
    pl = ep.placement
    if not pl.sharded:
        return torch.stack([get(e) for e in layer.stored_experts])
    gated = layer.config.experts.activation in GATED_ACTIVATIONS
    return pl.shard_of(name, get(pl.first_expert).unsqueeze(0), gated)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _optimizer_state(
    optimizer: torch.optim.Optimizer | None, model: nn.Module
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``{parameter name: {state key: value}}`` and the param groups (with names, not ids)."""
    if optimizer is None:
        return {}, []
    names = {id(p): n for n, p in model.named_parameters()}
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        params = group["params"]
        missing = [p for p in params if id(p) not in names]
        if missing:
            raise CheckpointError("the optimizer holds parameters that are not the model's")
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in params]}
        )
        for p in params:
            if p in optimizer.state:
                state[names[id(p)]] = dict(optimizer.state[p])
    return state, groups


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

    ``extra`` (JSON-serialisable) is stored in the manifest, e.g. the model config and
    the training arguments. The newest ``keep`` complete checkpoints are kept.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    st = _safetensors()
    rank, world = rank_and_world()
    root = Path(directory)
    name = f"step-{step:06d}"
    final, partial = root / name, root / f"{name}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # a save of this step that was interrupted earlier
        partial.mkdir()
    barrier()

    layers = _moe_layers(model)
    expert_keys = {_expert_prefix(n) + e for n in layers for e in EXPERT_NAMES}
    opt_state, opt_groups = _optimizer_state(optimizer, model)
    # Whole experts this rank writes: parameters, then each optimizer state tensor shaped like them.
    expert_tensors: dict[str, Tensor] = {}
    for lname, layer in layers.items():
        experts = layer.experts
        assert isinstance(experts, GroupedExperts)
        prefix = _expert_prefix(lname)
        params = tuple(getattr(experts, e) for e in EXPERT_NAMES)
        for e, parts in _whole_experts(layer, params).items():
            for pname, t in parts.items():
                expert_tensors[f"{prefix}{pname}.e{e}"] = t
        state_keys = sorted(
            {
                k
                for pname in EXPERT_NAMES
                for k, v in opt_state.get(prefix + pname, {}).items()
                if isinstance(v, Tensor) and v.dim() > 0
            }
        )
        for key in state_keys:
            like = tuple(
                None if p is None else opt_state.get(prefix + pname, {}).get(key, torch.zeros_like(p))
                for pname, p in zip(EXPERT_NAMES, params, strict=True)
            )
            for e, parts in _whole_experts(layer, like).items():
                for pname, t in parts.items():
                    expert_tensors[f"optim/{prefix}{pname}/{key}.e{e}"] = t

    ok = True
    error: Exception | None = None
    try:
        files: dict[str, list[str]] = {}
        expert_file = f"experts-rank{rank}.safetensors"
        st.save_file(expert_tensors, str(partial / expert_file))
        _fsync_file(partial / expert_file)
        if rank == 0:
            dense: dict[str, Tensor] = {}
            for key, value in model.state_dict().items():
                if key not in expert_keys:
                    dense[key] = value.detach().contiguous()
            opt_scalars: dict[str, Any] = {}
            for pname, entries in opt_state.items():
                for key, value in entries.items():
                    if isinstance(value, Tensor) and (value.dim() == 0 or pname not in expert_keys):
                        dense[f"optim/{pname}/{key}"] = value.detach().contiguous()
                    elif not isinstance(value, Tensor):
                        opt_scalars[f"{pname}/{key}"] = value
            st.save_file(dense, str(partial / "model.safetensors"))
            _fsync_file(partial / "model.safetensors")
            files["model.safetensors"] = sorted(dense)
    except Exception as caught:  # report, then let every rank raise together
        ok, error = False, caught
    if not all_ranks_ok(ok):
        if error is not None:
            raise error
        raise RuntimeError(f"saving checkpoint {final}: another rank failed to write its files")
    barrier()
    if rank == 0:
        st_files = sorted(p.name for p in partial.glob("experts-rank*.safetensors"))
        for fname in st_files:
            with st.safe_open(str(partial / fname), framework="pt") as f:  # index which file holds what
                files[fname] = sorted(f.keys())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": world,
            "layers": {n: _layer_config(layer) for n, layer in layers.items()},
            "optimizer": {"param_groups": opt_groups, "scalars": opt_scalars}
            if optimizer is not None
            else None,
            "files": files,
            "extra": extra or {},
        }
        _write_atomic_text(partial / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        _write_atomic_text(root / "LATEST", name + "\n")
        previous = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in previous[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path:
    """The newest complete checkpoint in ``directory`` (or ``directory`` itself if it is one)."""
    root = Path(directory)
    if (root / "manifest.json").is_file():
        return root
    pointer = root / "LATEST"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {root}: neither manifest.json nor LATEST is there")
    path = root / pointer.read_text(encoding="utf-8").strip()
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no manifest.json")
    return path


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load the newest checkpoint in ``directory`` into ``model`` (and ``optimizer``); returns its manifest.

    Refuses (``CheckpointError``) a checkpoint whose MoE layers or tensor shapes do not
    match the model. Works for any world size, whatever the world size that saved it.
    """
    st = _safetensors()
    path = latest_checkpoint(directory)
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} v{VERSION} checkpoint")
    layers = _moe_layers(model)
    saved_layers: dict[str, Any] = manifest["layers"]
    if sorted(saved_layers) != sorted(layers):
        raise CheckpointError(
            f"MoE layers differ: checkpoint has {sorted(saved_layers)}, model has {sorted(layers)}"
        )
    for lname, layer in layers.items():
        mine = _layer_config(layer)
        for key, value in saved_layers[lname].items():
            if mine.get(key) != value:
                raise CheckpointError(
                    f"MoE layer {lname!r}: {key} is {value} in the checkpoint "
                    f"but {mine.get(key)} in the model"
                )
    where = {key: fname for fname, keys in manifest["files"].items() for key in keys}
    handles: dict[str, Any] = {}

    def read(key: str) -> Tensor:
        if key not in where:
            raise CheckpointError(f"{path} has no tensor {key!r}")
        fname = where[key]
        if fname not in handles:
            handles[fname] = st.safe_open(str(path / fname), framework="pt")
        return handles[fname].get_tensor(key)  # type: ignore[no-any-return]

    state: dict[str, Tensor] = {}
    expert_keys = set()
    for lname, layer in layers.items():
        prefix = _expert_prefix(lname)
        experts = layer.experts
        assert isinstance(experts, GroupedExperts)
        for pname in EXPERT_NAMES:
            expert_keys.add(prefix + pname)
            if getattr(experts, pname) is None:
                continue
            local = _local_from_whole(layer, pname, _reader(read, f"{prefix}{pname}"))
            if local is not None:
                state[prefix + pname] = local
    for key in model.state_dict():
        if key not in expert_keys:
            state[key] = read(key)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this model: {error}") from error
    if optimizer is not None:
        _load_optimizer(manifest, path, model, optimizer, layers, read)
    return dict(manifest)


def _reader(read: Callable[[str], Tensor], stem: str) -> Callable[[int], Tensor]:
    """``e -> read(f"{stem}.e{e}")``: one whole expert's tensor."""

    def get(e: int) -> Tensor:
        return read(f"{stem}.e{e}")

    return get


def _load_optimizer(
    manifest: dict[str, Any],
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layers: dict[str, MoELayer],
    read: Callable[[str], Tensor],
) -> None:
    saved = manifest.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state")
    params = dict(model.named_parameters())
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"optimizer has {len(optimizer.param_groups)} param groups, the checkpoint {len(groups)}"
        )
    scalars = saved["scalars"]
    keys_in_files = {k for keys in manifest["files"].values() for k in keys}
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        for k, v in saved_group.items():
            if k != "params":
                group[k] = v
        for name in saved_group["params"]:
            if name not in params:
                if any(name == _expert_prefix(ln) + "b_out" for ln in layers):
                    continue  # a sharded expert's output bias lives on another rank
                raise CheckpointError(
                    f"the checkpoint's optimizer state names {name!r}, which the model lacks"
                )
            param = params[name]
            entry: dict[str, Any] = {}
            prefix = f"optim/{name}/"
            for k in keys_in_files:
                if k.startswith(prefix) and ".e" not in k[len(prefix) :]:
                    entry[k[len(prefix) :]] = read(k)
            for k, v in scalars.items():
                if k.startswith(name + "/"):
                    entry[k[len(name) + 1 :]] = v
            # Expert state: whole experts -> this rank's slice, like the parameters.
            layer_name = next((ln for ln in layers if name.startswith(_expert_prefix(ln))), None)
            if layer_name is not None and name[len(_expert_prefix(layer_name)) :] in EXPERT_NAMES:
                pname = name[len(_expert_prefix(layer_name)) :]
                state_keys = {
                    k[len(prefix) :].rsplit(".e", 1)[0]
                    for k in keys_in_files
                    if k.startswith(prefix) and ".e" in k[len(prefix) :]
                }
                for key in state_keys:
                    local = _local_from_whole(layers[layer_name], pname, _reader(read, f"{prefix}{key}"))
                    if local is not None:
                        entry[key] = local
            if entry:
                optimizer.state[param] = {
                    k: v.to(param.device) if isinstance(v, Tensor) and v.dim() > 0 else v
                    for k, v in entry.items()
                }
