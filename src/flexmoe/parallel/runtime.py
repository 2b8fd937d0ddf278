"""Process groups, launching, and the data-parallel recipe for expert parameters.

Expert parameters of a distributed ``MoELayer`` are tagged (``is_expert_parameter``):
each rank holds different experts (or shards), so data-parallel gradient averaging
must skip them — their gradients already sum the contributions of every rank's
tokens through the all-to-all. The recipe with DDP::

    flexmoe.parallel.ddp_ignore_expert_parameters(model)   # before wrapping
    ddp = DistributedDataParallel(model)
    loss = ddp(x).mean()               # a per-rank mean, as usual with DDP
    loss.backward()
    flexmoe.parallel.scale_expert_gradients(model)   # /W: the mean over ranks, like DDP's
    optimizer.step()

DDP averages the other gradients over ranks; ``scale_expert_gradients`` divides the
expert gradients by the same ``W`` so that every gradient is that of the mean of the
per-rank losses. With FSDP, pass ``ignored_params=list(expert_parameters(model))``.
"""

from __future__ import annotations

import gc
import os
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistributedContext",
    "all_ranks_ok",
    "all_reduce_mean",
    "barrier",
    "clip_grad_norm_",
    "ddp_ignore_expert_parameters",
    "expert_copies",
    "expert_parameters",
    "init_distributed",
    "is_distributed",
    "is_expert_parameter",
    "on_every_rank",
    "rank_and_world",
    "resolve_group",
    "scale_expert_gradients",
    "shutdown",
    "stable_hash",
    "tag_expert_parameters",
    "wrap_data_parallel",
]

T = TypeVar("T")

_EXPERT_TAG = "_flexmoe_expert"


class DistributedContext:
    """The group a layer runs on: the user's group, and a private twin for the layer's collectives.

    The twin has the same ranks, so the layer's collectives (issued from its
    communicator thread) never interleave with other collectives on the user's group,
    such as DDP's gradient all-reduces. With a ``timeout``, the twin's collectives
    themselves give up after it, so no rank is left blocked on a peer that went away.
    """

    def __init__(self, group: Any, timeout: float | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # Keyed by the default group too: a re-initialised torch.distributed needs new twins.
        key = (id(dist.group.WORLD), tuple(dist.get_process_group_ranks(group)), timeout)
        if key not in _PRIVATE_GROUPS:
            kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
            _PRIVATE_GROUPS[key] = dist.new_group(list(key[1]), use_local_synchronization=True, **kwargs)
        self.private_group = _PRIVATE_GROUPS[key]


_PRIVATE_GROUPS: dict[tuple[int, tuple[int, ...], float | None], Any] = {}


def resolve_group(group: Any, timeout: float | None = None) -> DistributedContext | None:
    """``None`` for single-device; else the context of ``group`` ("world": the default group).

    ``group=None`` means the default group when ``torch.distributed`` is initialised with
    more than one rank, and single-device otherwise. ``group=False`` forces single-device.
    """
    if group is False:
        return None
    if group is None or group == "world":
        if not (dist.is_available() and dist.is_initialized()):
            if group == "world":
                raise ValueError("group='world' needs torch.distributed to be initialised")
            return None
        group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialised")
    if dist.get_world_size(group) == 1:
        return None
    return DistributedContext(group, timeout)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment; returns ``(rank, world)``.

    The backend follows the device: NCCL when CUDA is available (and the rank's GPU is
    ``LOCAL_RANK``), gloo otherwise. A no-op returning ``(0, 1)`` outside ``torchrun``.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, **kwargs)
    return dist.get_rank(), dist.get_world_size()


def local_world_size(default: int) -> int:
    """Ranks per node from ``LOCAL_WORLD_SIZE`` (set by ``torchrun``), else ``default``."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else default


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32(text.encode())


def tag_expert_parameters(module: nn.Module | nn.Parameter, copies: int = 1) -> None:
    """Mark every parameter of ``module`` (or ``module`` itself) as an expert parameter.

    ``copies``: how many ranks hold the same tensor with the same gradient (a LoRA
    factor every shard of a sharded expert holds whole), so that ``clip_grad_norm_``
    counts it once.
    """
    params = [module] if isinstance(module, nn.Parameter) else list(module.parameters())
    for param in params:
        setattr(param, _EXPERT_TAG, copies)


def is_expert_parameter(param: nn.Parameter) -> bool:
    """Whether ``param`` belongs to a distributed layer's experts (not data-parallel)."""
    return bool(getattr(param, _EXPERT_TAG, False))


def expert_copies(param: nn.Parameter) -> int:
    """How many ranks hold this expert parameter (see ``tag_expert_parameters``); 1 for others."""
    return int(getattr(param, _EXPERT_TAG, 1))


def expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The expert parameters of every distributed ``MoELayer`` in ``model``."""
    for param in model.parameters():
        if is_expert_parameter(param):
            yield param


def ddp_ignore_expert_parameters(model: nn.Module) -> list[str]:
    """Tell ``DistributedDataParallel`` (before wrapping ``model``) to skip expert parameters.

    Returns the ignored names.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, param in model.named_parameters() if is_expert_parameter(param)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def scale_expert_gradients(model: nn.Module, factor: float | None = None) -> None:
    """Multiply expert gradients by ``factor`` (default ``1 / world size``: DDP's mean)."""
    if factor is None:
        factor = 1.0 / dist.get_world_size() if dist.is_initialized() else 1.0
    for param in expert_parameters(model):
        if param.grad is not None:
            param.grad.mul_(factor)


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default group; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(value: float) -> float:
    """The mean of a number over the ranks (the number itself when not distributed)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def all_reduce_sum_(tensors: list[Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks of ``group`` in place (nothing when not distributed)."""
    if not is_distributed():
        return
    for tensor in tensors:
        dist.all_reduce(tensor, group=group)


def wrap_data_parallel(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` that skips expert parameters (``model`` if not distributed)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ddp_ignore_expert_parameters(model)
    return DistributedDataParallel(model)


def shutdown() -> None:
    """Tear down every process group (the default one and the layers' private twins).

    Release data-parallel wrappers (``del ddp_model``) first: a gloo group still held by
    a live ``DistributedDataParallel`` can abort the process at exit.
    """
    gc.collect()  # wrappers only held in reference cycles go now, not during interpreter exit
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # Drop the twins here, not at interpreter exit: a gloo group finalised during exit can
    # abort the process ("terminate called without an active exception").
    _PRIVATE_GROUPS.clear()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for a model with expert-parallel layers.

    The norm is that of the whole model's gradient: the data-parallel gradients (equal
    on every rank after DDP) count once, every rank's expert gradients are added up
    over the ranks. Every rank gets the same norm and clipping factor, so replicas stay
    identical. Returns the total norm.
    """
    dense = [p.grad for p in model.parameters() if p.grad is not None and not is_expert_parameter(p)]
    expert_params = [p for p in model.parameters() if p.grad is not None and is_expert_parameter(p)]
    experts = [p.grad for p in expert_params if p.grad is not None]
    squares = torch.zeros(2, dtype=torch.float64)
    for grad in dense:
        squares[0] += grad.detach().double().square().sum().cpu()
    for param, grad in zip(expert_params, experts, strict=True):  # a tensor held by n ranks counts once
        squares[1] += grad.detach().double().square().sum().cpu() / expert_copies(param)
    if experts and is_distributed():
        expert_sq = squares[1:].clone()
        dist.all_reduce(expert_sq)
        squares[1] = expert_sq[0]
    total = float(squares.sum().sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for grad in (*dense, *experts):
            grad.mul_(scale)
    return total


def barrier() -> None:
    """Wait for every rank of the default group (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def on_every_rank(
    action: Callable[[], T], failed: Callable[[], Exception], *, rank0_only: bool = False
) -> T | None:
    """``action()`` on every rank (or on rank 0 only); if it raised on any rank, every rank raises.

    A collective. A rank whose own ``action`` raised re-raises that error once every rank
    has heard of it; the others raise ``failed()``. Returns ``action``'s result (``None``
    on the ranks that did not run it).
    """
    result: T | None = None
    error: Exception | None = None
    if not rank0_only or rank_and_world()[0] == 0:
        try:
            result = action()
        except Exception as caught:  # reported to the other ranks first, then raised
            error = caught
    if not all_ranks_ok(error is None):
        if error is not None:
            raise error
        raise failed()
    return result


def all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a collective; ``ok`` itself when not distributed)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
