"""``RoutingRecorder``: record the routing of a model's MoE layers to a trace file while it trains.

The file format is ``flexmoe.planner.trace`` (JSON lines; ``read_routing_trace`` reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexmoe.layer import MoELayer
from flexmoe.parallel import rank_and_world
from flexmoe.planner.trace import RoutingTraceWriter

__all__ = ["RoutingRecorder"]


class RoutingRecorder:
    """Records the routing of every ``MoELayer`` in ``model`` to a trace file.

    One record per layer per **step**. A step ends at each ``step()`` call, or, with
    ``optimizer=``, after each ``optimizer.step()`` (a post hook). The forward calls
    between two steps are summed, so gradient accumulation gives one record per layer
    and optimizer step. Only forwards in training mode count (``model.eval()``
    forwards, such as evaluations, are not recorded); a layer that ran no training
    forward in a step writes no record for it. Counts of forwards after the last step
    are dropped by ``close()``.

    Steps are numbered from ``start_step`` (``step(n)`` numbers one explicitly). An
    existing trace at ``path`` (same experts and top-k) is continued: its records
    before ``start_step`` stay and those from ``start_step`` on are replaced (a run
    resumed from a checkpoint redoes them; with the default 0, the file starts over). Layers
    are named by their module path in ``model``. Every layer must have the same
    ``num_experts`` and ``top_k`` (one header per file; record a sub-module otherwise),
    and no forward may override ``top_k``. With top-p routing or zero-computation experts
    each record also holds the step's histogram of routed experts per token
    (``experts_per_token``), so that its counts replay exactly (``routing_from_counts``).

    Distributed: ``layer.stats`` already holds the counts over all ranks, so every
    rank must build the recorder (the hooks are local) but only ``rank`` 0 opens and
    writes the file (default ``rank``/``world_size``: the default process group's).
    Per-rank counts (``counts_per_rank``) are not recorded.

    Cost: one host copy of ``E`` counts per layer per forward (the layer's stats are
    already on the host on one device), one line per layer and a flush per step.

    Example::

        with RoutingRecorder(model, "trace.jsonl.gz", optimizer=optimizer):
            for x, y in batches:
                loss_fn(model(x), y).backward()
                optimizer.step()  # writes one record per MoE layer
                optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        start_step: int = 0,
        meta: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        layers = [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        if not layers:
            raise ValueError("model has no flexmoe.MoELayer to record")
        shapes = {name: (m.config.num_experts, m.config.top_k) for name, m in layers}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                "model: every recorded MoELayer must have the same (num_experts, top_k), got "
                + ", ".join(f"{name} {shape}" for name, shape in shapes.items())
                + "; record one sub-module at a time"
            )
        self.num_experts, self.top_k = next(iter(shapes.values()))
        if rank is None or world_size is None:
            default_rank, default_world = rank_and_world()
            rank = default_rank if rank is None else rank
            world_size = default_world if world_size is None else world_size
        self.path = Path(path)
        self.rank = rank
        self.next_step = start_step
        self.layer_names = [name for name, _ in layers]
        self._counts = {name: torch.zeros(self.num_experts, dtype=torch.int64) for name in self.layer_names}
        self._tokens = dict.fromkeys(self.layer_names, 0)
        # Tokens by routed experts used (a per-token number of experts: top-p, zero experts).
        self._per_token = {name: torch.zeros(self.top_k + 1, dtype=torch.int64) for name in self.layer_names}
        self._writer: RoutingTraceWriter | None = None
        if rank == 0:
            self._writer = RoutingTraceWriter(
                self.path, self.num_experts, self.top_k, world_size, meta, keep_before_step=start_step
            )
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in layers]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.step()))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            assert isinstance(module, MoELayer)
            stats = module.stats
            if not module.training or stats is None:
                return
            if stats.top_k != self.top_k:
                raise ValueError(
                    f"RoutingRecorder: layer {name!r} ran with top_k={stats.top_k}, the trace is "
                    f"top-{self.top_k}; a trace cannot hold per-call top_k overrides"
                )
            self._counts[name] += stats.routed_per_expert.to("cpu", torch.int64)
            self._tokens[name] += stats.num_tokens
            if stats.experts_per_token is not None:
                self._per_token[name] += stats.experts_per_token.to("cpu", torch.int64)
            else:
                self._per_token[name][self.top_k] += stats.num_tokens

        return record

    def step(self, step: int | None = None) -> None:
        """End a step: write one record per layer that ran, numbered ``step`` (default: the next)."""
        number = self.next_step if step is None else step
        if self._writer is not None:
            for name in self.layer_names:
                if self._tokens[name]:
                    counts = self._counts[name].tolist()
                    hist = self._per_token[name].tolist()
                    variable = hist[self.top_k] != self._tokens[name]  # else every token used top_k
                    self._writer.write(
                        number,
                        name,
                        counts,
                        self._tokens[name],
                        experts_per_token=hist if variable else None,
                        flush=False,
                    )
            self._writer.flush()
        for name in self.layer_names:
            self._counts[name].zero_()
            self._per_token[name].zero_()
            self._tokens[name] = 0
        self.next_step = number + 1

    def close(self) -> None:
        """Remove the hooks and close the file (forwards since the last ``step()`` are not written)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
