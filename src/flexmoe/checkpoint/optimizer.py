"""Optimizer state in a checkpoint: collected by parameter name, checked against the model, restored.

What a checkpoint can hold for each parameter: tensors that are scalars (e.g. Adam's
``step``) or shaped and typed like the parameter (moments, momentum buffers), and plain
JSON values (e.g. an int step count). Anything else is refused when saving, so that every
state tensor can be checked against its parameter when loading. Parameters are named by
their module path (``0.weight``), so the state follows the parameter to any world size.
Loading goes through ``optimizer.load_state_dict`` (the optimizer's own rules for devices
and the ``step`` tensor), after every check has passed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.checkpoint.files import TensorInfo
from flexmoe.checkpoint.layout import ExpertParam, expert_key, optim_key
from flexmoe.checkpoint.manifest import JSON_VALUE, OptimizerRecord

__all__ = [
    "CollectedOptimizer",
    "Expect",
    "check_param_groups",
    "collect_optimizer",
    "declared_state",
    "expected_optimizer_tensors",
    "optimizer_state_dict",
]

EXPERT_SUFFIX = re.compile(r"(.+)\.e(\d+)")
NOT_SAVED = ("params", "param_names")  # group entries that are not hyper-parameters


@dataclass(frozen=True)
class CollectedOptimizer:
    """An optimizer's state by parameter name, checked, ready to write."""

    record: OptimizerRecord
    tensors: dict[str, dict[str, Tensor]]  # parameter name -> state key -> tensor


@dataclass(frozen=True)
class Expect:
    """What a stored tensor must be: ``info``'s dtype and shape, or (``scalar_ok``) a 0-dim number.

    A 0-dim state tensor (e.g. Adam's ``step``) has no parameter to match; it must be a
    float or an int64, which refuses the same-size reinterpretations (a float32 header
    relabelled int32) that would load garbage.
    """

    info: TensorInfo
    scalar_ok: bool = False

    def accepts(self, got: TensorInfo) -> bool:
        """Whether a stored tensor described by ``got`` fits."""
        if got == self.info:
            return True
        return (
            self.scalar_ok and got.shape == () and (got.dtype.is_floating_point or got.dtype == torch.int64)
        )

    def describe(self) -> str:
        """What is expected, for error messages."""
        return self.info.describe() + (" or a 0-dim float or int64" if self.scalar_ok else "")


# ------------------------------------------------------------------ saving


def collect_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> CollectedOptimizer:
    """The optimizer's groups and state, keyed by the model's parameter names; checked for saving."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    scalars: dict[str, Any] = {}
    tensors: dict[str, dict[str, Tensor]] = {}
    for i, group in enumerate(optimizer.param_groups):
        if any(id(p) not in names for p in group["params"]):
            raise CheckpointError("the optimizer holds parameters that are not the model's")
        groups.append({**_hyper_parameters(group, i), "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            name = names[id(p)]
            for key, value in optimizer.state.get(p, {}).items():
                _check_state_key(name, key)
                if isinstance(value, Tensor):
                    _check_state_tensor(name, key, value, p)
                    tensors.setdefault(name, {})[key] = value.detach()
                elif isinstance(value, JSON_VALUE):
                    scalars[f"{name}/{key}"] = value
                else:
                    raise CheckpointError(
                        f"optimizer state {key!r} of {name!r} is a {type(value).__name__}; checkpoints "
                        f"hold tensors and plain JSON values (None, bool, int, float, str)"
                    )
    declared = {name: sorted(state) for name, state in tensors.items()}
    return CollectedOptimizer(OptimizerRecord(groups, scalars, declared), tensors)


def _hyper_parameters(group: dict[str, Any], index: int) -> dict[str, Any]:
    """A group's settings (all but its parameters), which must fit in JSON."""
    out = {k: v for k, v in group.items() if k not in NOT_SAVED}
    for key, value in out.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"optimizer param_groups[{index}][{key!r}] is a {type(value).__name__}, which a "
                f"checkpoint's JSON manifest cannot hold"
            ) from None
    return out


def _check_state_key(name: str, key: object) -> None:
    """A state key must make an unambiguous stored name (``optim/<param>/<key>[.e<expert>]``)."""
    if not isinstance(key, str) or "/" in key or EXPERT_SUFFIX.fullmatch(key):
        raise CheckpointError(
            f"optimizer state key {key!r} of {name!r}: checkpoints need str keys without '/' "
            f"that do not end in '.e<digits>'"
        )


def _check_state_tensor(name: str, key: str, value: Tensor, param: Tensor) -> None:
    """State must be a scalar or shaped and typed like its parameter: else a load could not check it."""
    if value.dim() == 0 or (value.shape == param.shape and value.dtype == param.dtype):
        return
    raise CheckpointError(
        f"optimizer state {key!r} of {name!r} is {TensorInfo(value.dtype, tuple(value.shape)).describe()}; "
        f"checkpoints hold state that is a scalar or has its parameter's dtype and shape "
        f"({TensorInfo(param.dtype, tuple(param.shape)).describe()})"
    )


# ------------------------------------------------------------------ loading: checks


def check_param_groups(
    record: OptimizerRecord,
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    lacking: set[str],
) -> None:
    """The saved groups must be the optimizer's: same count, parameters, hyper-parameter names and kinds.

    ``names``: parameter id -> model name. ``lacking``: saved names this rank may lack
    (a sharded expert's ``b_out`` off shard 0).
    """
    if len(record.param_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the optimizer has {len(optimizer.param_groups)} param groups, the checkpoint "
            f"{len(record.param_groups)}"
        )
    for i, (group, saved) in enumerate(zip(optimizer.param_groups, record.param_groups, strict=True)):
        mine = [names.get(id(p)) for p in group["params"]]
        if None in mine:
            raise CheckpointError("the optimizer holds parameters that are not the model's")
        theirs = [n for n in saved["params"] if n in mine or n not in lacking]
        if sorted(theirs) != sorted(n for n in mine if n is not None):
            raise CheckpointError(
                f"param group {i} holds parameters {theirs} in the checkpoint but {mine} in the optimizer"
            )
        _check_hyper_parameters(i, group, saved)


def _kind(value: object) -> str:
    """A setting's JSON kind: a bool, a number (int or float), a sequence, or its type's name."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list | tuple):
        return "sequence"
    return type(value).__name__


def _check_hyper_parameters(index: int, group: dict[str, Any], saved: dict[str, Any]) -> None:
    """Check a saved group's settings against the optimizer's group ``index``.

    Saved settings the optimizer does not know mean another kind of optimizer (SGD's
    ``momentum`` in Adam). Settings the checkpoint lacks (added by a newer torch) keep
    the optimizer's values.
    """
    unknown = sorted(k for k in saved if k not in NOT_SAVED and k not in group)
    if unknown:
        raise CheckpointError(
            f"param group {index} of the checkpoint has settings {unknown} that this optimizer "
            f"({sorted(k for k in group if k not in NOT_SAVED)}) lacks: another kind of optimizer"
        )
    for key in sorted(k for k in saved if k not in NOT_SAVED):
        a, b = group[key], saved[key]
        if a is not None and b is not None and _kind(a) != _kind(b):
            raise CheckpointError(
                f"param group {index}: {key!r} is {b!r} in the checkpoint, but a {_kind(a)} in the optimizer"
            )


def declared_state(
    record: OptimizerRecord, experts: dict[str, ExpertParam], keys: set[str]
) -> dict[str, list[str]]:
    """The tensor state keys of each parameter.

    As the manifest declares them, or (older manifests) as the stored ``optim/`` names
    show them.
    """
    if record.tensors is not None:
        return record.tensors
    declared: dict[str, set[str]] = {}
    for key in keys:
        if not key.startswith("optim/"):
            continue
        parts = key.split("/")
        if len(parts) != 3:
            raise CheckpointError(f"stored optimizer tensor {key!r} is not named optim/<parameter>/<key>")
        _, name, rest = parts
        match = EXPERT_SUFFIX.fullmatch(rest) if name in experts else None
        declared.setdefault(name, set()).add(match.group(1) if match else rest)
    return {name: sorted(state) for name, state in declared.items()}


def expected_optimizer_tensors(
    record: OptimizerRecord,
    declared: dict[str, list[str]],
    params: dict[str, TensorInfo],
    experts: dict[str, tuple[ExpertParam, TensorInfo, int]],
    stored: set[str],
) -> dict[str, Expect]:
    """Every ``optim/`` tensor the checkpoint must hold, with what it must be.

    ``params``: each dense parameter's info. ``experts``: each expert parameter with its
    whole-expert info and expert count. ``stored``: the names in the checkpoint (an expert
    parameter's scalar state is stored whole, its other state per expert).
    """
    in_groups = {n for group in record.param_groups for n in group["params"]}
    for key in record.scalars:
        name, _, state_key = key.rpartition("/")
        if name not in in_groups:
            raise CheckpointError(
                f"the checkpoint's optimizer state names {name!r}, which no param group holds"
            )
        if state_key in declared.get(name, ()):
            raise CheckpointError(f"optimizer state {state_key!r} of {name!r} is stored twice")
    expect: dict[str, Expect] = {}
    for name, state_keys in declared.items():
        if name not in in_groups:
            raise CheckpointError(
                f"the checkpoint's optimizer state names {name!r}, which no param group holds"
            )
        for state_key in state_keys:
            key = optim_key(name, state_key)
            if name in experts:
                _, info, count = experts[name]
                if key in stored:
                    expect[key] = Expect(TensorInfo(info.dtype, ()), scalar_ok=True)
                else:
                    expect.update({expert_key(key, e): Expect(info) for e in range(count)})
            elif name in params:
                expect[key] = Expect(params[name], scalar_ok=True)
            else:
                raise CheckpointError(
                    f"the checkpoint's optimizer state names {name!r}, which the model lacks"
                )
    return expect


# ------------------------------------------------------------------ loading: the state dict


def optimizer_state_dict(
    record: OptimizerRecord,
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    state: dict[str, dict[str, Tensor]],
) -> dict[str, Any]:
    """``optimizer.load_state_dict``'s argument: ``state`` (tensors by name) plus the saved plain values.

    Hyper-parameters come from the checkpoint (those it lacks from the optimizer); a list
    stored for a tuple (JSON has no tuples, e.g. Adam's ``betas``) becomes a tuple again.
    """
    values: dict[str, dict[str, Any]] = {}
    for key, value in record.scalars.items():
        name, _, state_key = key.rpartition("/")
        values.setdefault(name, {})[state_key] = value
    packed: dict[int, dict[str, Any]] = {}
    groups = []
    for group, saved in zip(optimizer.param_groups, record.param_groups, strict=True):
        ids = []
        for p in group["params"]:
            ids.append(len(packed))
            packed[len(packed)] = {**state.get(names[id(p)], {}), **values.get(names[id(p)], {})}
        hyper = {k: v for k, v in group.items() if k not in NOT_SAVED}
        for k, v in saved.items():
            if k not in NOT_SAVED:
                hyper[k] = tuple(v) if isinstance(hyper[k], tuple) and isinstance(v, list) else v
        groups.append({**hyper, "params": ids})
    return {"state": {i: s for i, s in packed.items() if s}, "param_groups": groups}
