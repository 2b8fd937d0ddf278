"""Expert strategy: expert weights in storage, read into a budgeted cache when needed (ExpertFlow).

Legend: T tokens, D model dim, H first-projection width, F expert hidden dim, E experts,
K top-k, N kept routed slots.

``OffloadedExperts`` runs a layer whose experts live in an ``ExpertCache`` (see
``flexmoe.experts.cache``) instead of its own Parameters: it dispatches like
``LocalExperts``, asks the cache for the active experts, and computes each expert's
rows as soon as that expert is in memory (resident experts first, while the I/O
thread reads the others). Before computing, it applies the *next* layer's router to
this layer's input and tells the cache: the next layer's likely experts are read while
this one computes. Inference only: the cached weights take no gradient. Experts the
cache holds as int8 (``Int8Weight``) or packed (``PackedWeight``) are computed from
those directly.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing

import torch
from torch import Tensor, nn

from flexmoe.experts import GroupedExperts
from flexmoe.experts.cache import ExpertCache, ExpertWeights
from flexmoe.experts.served import served_expert_ffn
from flexmoe.experts.store import Int8MemoryStore
from flexmoe.layer.local import Call, ExpertsOutput, LocalExperts, local_step
from flexmoe.layer.moe_layer import MoELayer
from flexmoe.routing import Router, RouterOutput

__all__ = [
    "OffloadedExperts",
    "compute_dtype",
    "int8_experts_in_memory",
    "offload_experts",
    "offloaded_cache",
]


class OffloadedExperts(LocalExperts):
    """Every expert on this device, but held in an ``ExpertCache`` and read from storage on demand.

    Args:
        experts: the layer's ``GroupedExperts`` (its activation and backend; its weights
            are empty placeholders).
        num_experts: ``E``.
        batch_prioritized: drop the lowest-scored assignments first under a capacity.
        cache: the model's expert cache (shared by its layers).
        layer_index: this layer's id in the cache (the order layers run in).
        expert_bytes: bytes of one expert's weights (a call of top-k needs ``k`` of them
            at once: checked against the budget per call, as ``top_k`` can be overridden).
    """

    def __init__(
        self,
        experts: GroupedExperts,
        num_experts: int,
        batch_prioritized: bool,
        cache: ExpertCache,
        layer_index: int,
        expert_bytes: int,
    ) -> None:
        super().__init__(experts, num_experts, batch_prioritized)
        self.grouped = experts
        self.cache = cache
        self.layer_index = layer_index
        self.expert_bytes = expert_bytes
        self.next_layer: MoELayer | None = None  # its router predicts its experts
        self.name = f"layer {layer_index}"

    def predict_next(self, layer: MoELayer) -> None:
        """Predict ``layer``'s experts (the next layer) with its router, and prefetch them.

        The prediction uses that layer's routing as it is at each call (its ``top_k``
        and ``top_p``, whatever ``set_routing`` made of them).
        """
        self.next_layer = layer

    @property
    def next_router(self) -> Router | None:
        """The router that predicts the next layer's experts (``None``: no prediction)."""
        return None if self.next_layer is None else self.next_layer.router

    @property
    def next_top_k(self) -> int:
        """How many experts per token the prediction reads (0: no prediction)."""
        return 0 if self.next_layer is None else self.next_layer.config.top_k

    def run(self, x_TD: Tensor, route: RouterOutput, call: Call, header: object) -> ExpertsOutput:
        """Dispatch, fetch the active experts through the cache, compute each one's rows."""
        self.check_budget(call.top_k)
        layout, x_ND, row_weights_N = self.dispatch(x_TD, route, call)
        counts = layout.counts
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        active = [e for e, count in enumerate(counts) if count > 0]
        # 1. this layer's experts (their misses start reading now), the next layer's predicted
        served = self.fetch(x_TD, active)
        # 2. each expert's rows as soon as its weights are here
        outputs: dict[int, Tensor] = {}
        experts = self.grouped
        with closing(served):
            for e, (w_in, w_out) in served:
                rows = slice(starts[e], starts[e + 1])
                if not (isinstance(w_in, Tensor) and isinstance(w_out, Tensor)):  # int8 or packed
                    x_rows = x_ND[rows].to(compute_dtype(x_ND))
                    rw = row_weights_N[rows]
                    outputs[e] = served_expert_ffn(x_rows, w_in, w_out, experts.activation, rw)
                    continue
                weights = (w_in.unsqueeze(0), w_out.unsqueeze(0), None, None)
                outputs[e] = experts.apply_weights(x_ND[rows], [counts[e]], weights, row_weights_N[rows])
        y_ND = torch.cat([outputs[e] for e in active]) if outputs else x_ND.new_zeros(0, x_ND.shape[1])
        return ExpertsOutput(y_ND, layout, local_step(x_TD.shape[0], layout, call))

    def fetch(self, x_TD: Tensor, active: list[int]) -> Generator[tuple[int, ExpertWeights], None, None]:
        """Ask the cache for this layer's ``active`` experts: ``(expert, weights)`` once each, resident first.

        The misses start reading at once; then (ExpertFlow) the next layer's router on
        this layer's input ``x_TD`` predicts that layer's experts, which are read in the
        background. Each expert stays pinned until the next is asked for: close the
        generator when done (``contextlib.closing``). Used by ``run`` and by expert
        resolvers that compute this layer's experts themselves (``flexmoe.adapters``).
        """
        served = self.cache.use(self.layer_index, active)
        if self.next_layer is not None:
            self.cache.prefetch(self.layer_index + 1, self._predicted(x_TD, self.next_layer))
        return served

    @staticmethod
    def _predicted(x_TD: Tensor, layer: MoELayer) -> list[int]:
        """The routed experts ``layer``'s router picks for ``x_TD`` (unused top-p slots left out)."""
        config = layer.config
        with torch.no_grad():
            route = layer.router(x_TD, config.top_k, config.router.top_p)
        ids = route.expert_ids_TK if route.valid_TK is None else route.expert_ids_TK[route.valid_TK]
        ids = ids[ids < config.num_experts]  # zero-computation experts have nothing to read
        predicted: list[int] = torch.unique(ids).tolist()  # NOTE: host sync (the expert ids to read)
        return predicted

    def check_budget(self, top_k: int) -> None:
        """Raise ``ValueError`` if the cache's budget cannot hold the ``top_k`` experts one token needs."""
        budget = self.cache.budget_bytes
        need = top_k * self.expert_bytes
        if budget is not None and need > budget:
            raise ValueError(
                f"expert_budget of {budget} bytes is too small: one step of {self.name} needs its "
                f"top-{top_k} experts in memory at once, {top_k} x {self.expert_bytes} = {need} bytes"
            )


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def offload_experts(
    layer: MoELayer, cache: ExpertCache, layer_index: int, expert_bytes: int | None = None
) -> OffloadedExperts:
    """Run ``layer``'s experts from ``cache`` (key ``(layer_index, expert)``); their Parameters become empty.

    ``expert_bytes``: what one expert takes in the cache (default: its weights in the
    layer's dtype; less for int8 experts).

    The layer must be a single-device layer with the built-in ``GroupedExperts`` without
    biases. Its ``experts.w_in`` / ``experts.w_out`` are replaced by ``[0, H, D]`` /
    ``[0, D, F]`` placeholders on the same device and dtype (a meta-device layer stays
    on the meta device: nothing is allocated). Returns the new strategy.
    """
    experts = layer.experts
    if type(layer.strategy) is not LocalExperts or not isinstance(experts, GroupedExperts):
        raise ValueError("offload_experts needs a single-device MoELayer with the built-in GroupedExperts")
    if experts.b_in is not None or experts.b_out is not None:
        raise ValueError("offload_experts does not support expert biases")
    w_in, w_out = experts.w_in, experts.w_out
    H, D, F = w_in.shape[1], w_in.shape[2], w_out.shape[2]
    if expert_bytes is None:
        expert_bytes = (H * D + D * F) * w_in.dtype.itemsize
    experts.w_in = nn.Parameter(w_in.new_empty(0, H, D), requires_grad=False)
    experts.w_out = nn.Parameter(w_out.new_empty(0, D, F), requires_grad=False)
    strategy = OffloadedExperts(
        experts,
        layer.config.num_experts,
        layer.config.capacity.batch_prioritized,
        cache,
        layer_index,
        expert_bytes,
    )
    layer.strategy = strategy
    return strategy


def offloaded_cache(model: nn.Module) -> ExpertCache | None:
    """The ``ExpertCache`` the offloaded layers of ``model`` read from (``None``: no offloaded layer)."""
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.strategy, OffloadedExperts):
            return module.strategy.cache
    return None


def int8_experts_in_memory(model: nn.Module) -> Int8MemoryStore:
    """Quantize the experts of every ``MoELayer`` of ``model`` to int8 in place, for inference.

    Each layer's expert weights are quantized per output channel (``flexmoe.experts.int8``)
    and its experts then run from those through an unlimited ``ExpertCache`` (as
    ``offload_experts`` does, without disk): the float expert Parameters are emptied, so
    the experts take half the memory of bf16 (a quarter of fp32) and are computed from
    the int8 values. The layers must be single-device ``MoELayer`` s with the built-in
    ``GroupedExperts`` and no expert biases (a model after ``flexmoe.hf.convert``, or
    ``TinyMoELM``). The model is for inference from then on: the experts take no
    gradient, and their Parameters can no longer be saved. Returns the store (its
    ``total_bytes``: what the int8 experts hold).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer to quantize")
    weights = []
    for layer in layers:
        experts = layer.experts
        if type(layer.strategy) is not LocalExperts or not isinstance(experts, GroupedExperts):
            raise ValueError(
                "int8_experts_in_memory needs single-device MoELayers with the built-in GroupedExperts"
            )
        if experts.b_in is not None or experts.b_out is not None:
            raise ValueError("int8_experts_in_memory does not support expert biases")
        weights.append((experts.w_in.detach(), experts.w_out.detach()))
    with torch.no_grad():
        store = Int8MemoryStore(weights)
    cache = ExpertCache(store, len(layers), budget_bytes=None, prefetch=False)
    for index, layer in enumerate(layers):
        offload_experts(layer, cache, index, store.nbytes((index, 0)))
    return store
