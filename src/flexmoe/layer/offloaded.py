"""Expert strategy: expert weights in storage, read into a budgeted cache when needed (ExpertFlow).

Legend: T tokens, D model dim, H first-projection width, F expert hidden dim, E experts,
K top-k, N kept routed slots.

``OffloadedExperts`` runs a layer whose experts live in an ``ExpertCache`` (see
``flexmoe.experts.cache``) instead of its own Parameters: it dispatches like
``LocalExperts``, asks the cache for the active experts, and computes each expert's
rows as soon as that expert is in memory (resident experts first, while the I/O
thread reads the others). Inference only: the cached weights take no gradient. Experts
the cache holds as int8 (``Int8Weight``) or packed (``PackedWeight``) are computed from
those directly. A call of one token (a decode step of one sequence) builds no dispatch:
each expert runs on the token's row and the outputs are summed as the combine would.

Prediction (ExpertFlow, as Mixtral-offloading does it): ``prefetch_experts(layer, h)``
applies ``layer``'s router to hidden states ``h`` that come before it, the residual
stream as the previous layer left it, normalised as ``layer``'s input will be
(``flexmoe.hf.load_offloaded`` does this at the start of each decoder layer, so the
reads overlap its attention). The residual stream changes little from one layer to
the next, so the router usually picks the experts it will pick on the real input.
Only the experts it gives at least ``confidence / E`` probability are read: a guess the
router is unsure of costs a read and the room of an expert that may be needed. Each
layer also keeps the track record of its candidates (ExpertFlow's correction of
mispredictions): an expert whose past predictions the layer used less than
``min_precision`` of the time (counted with one right and one wrong guess to start) is
left out, since a router applied to the residual stream can be biased towards an expert
the real input never picks, which would then be read for nothing at every token. The
candidates left out are still scored, so an expert comes back when it is picked again.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing

import numpy as np
import torch
from torch import Tensor, nn

from flexmoe.config import Plan
from flexmoe.dispatch import compute_capacity, sum_slots
from flexmoe.experts import GroupedExperts
from flexmoe.experts.cache import ExpertCache, ExpertWeights
from flexmoe.experts.int8 import Int8Weight
from flexmoe.experts.rows import experts_bf16_at, experts_int8_at
from flexmoe.experts.served import served_expert_ffn
from flexmoe.experts.store import Int8MemoryStore
from flexmoe.layer.local import Call, ExpertsOutput, LocalExperts, local_step
from flexmoe.layer.moe_layer import MoELayer
from flexmoe.layer.stats import ExpertStep
from flexmoe.routing import RouterOutput

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_MIN_PRECISION",
    "OffloadedExperts",
    "compute_dtype",
    "int8_experts_in_memory",
    "offload_experts",
    "offloaded_cache",
    "predicted_experts",
    "prefetch_experts",
]

# A predicted expert is read ahead when the router gives it at least the uniform
# probability 1/E (this many times it: an expert it favours over an even spread), and
# when at least this fraction of its past predictions were used (both measured on
# `flexmoe train`'s models: see docs/offload.md).
DEFAULT_CONFIDENCE = 1.0
DEFAULT_MIN_PRECISION = 0.5


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
        self.name = f"layer {layer_index}"
        self.confidence = DEFAULT_CONFIDENCE  # of prefetch_experts' predictions
        self.min_precision = DEFAULT_MIN_PRECISION
        self._candidates: list[int] | None = None  # of the coming call, scored when it runs
        self._candidate_counts = [0] * num_experts  # times each expert was a candidate
        self._candidate_used = [0] * num_experts  # ... and the layer then used it
        self._slot_orders: dict[int, Tensor] = {}  # _slot_order's, per top-k

    def trusted(self, candidates: list[int]) -> list[int]:
        """The ``candidates`` for the coming call whose past predictions were right often enough.

        Remembers ``candidates`` (replacing earlier ones) to score them when the layer runs.
        """
        self._candidates = candidates
        return [e for e in candidates if self.prediction_precision(e) >= self.min_precision]

    def prediction_precision(self, expert: int) -> float:
        """How often ``expert`` was used when it was a candidate: ``(used + 1) / (candidate + 2)``."""
        return (self._candidate_used[expert] + 1) / (self._candidate_counts[expert] + 2)

    def _score_candidates(self, active: list[int]) -> None:
        if self._candidates is None:
            return
        used = set(active)
        for e in self._candidates:
            self._candidate_counts[e] += 1
            self._candidate_used[e] += e in used
        self._candidates = None

    def run(self, x_TD: Tensor, route: RouterOutput, call: Call, header: object) -> ExpertsOutput:
        """Dispatch, fetch the active experts through the cache, compute each one's rows."""
        self.check_budget(call.top_k)
        if self._takes_token(x_TD, route):
            return self._run_token(x_TD, route, call)
        layout, x_ND, row_weights_N = self.dispatch(x_TD, route, call)
        counts = layout.counts
        starts = np.cumsum([0, *counts])
        active = [e for e, count in enumerate(counts) if count > 0]
        # 1. this layer's experts: the misses start reading now, the resident ones come first
        groups = self.fetch_groups(active)
        # 2. each expert's rows as soon as its weights are here: decoding rows into y_c
        #    in place, by the row kernels; other rows one expert at a time
        dtype = compute_dtype(x_ND)
        # once, not per expert: the row weights rounded as the in-memory experts round them, in fp32
        x_c, rw_c = x_ND.to(dtype), row_weights_N.to(dtype).float()
        y_c = torch.empty_like(x_c)
        outputs: dict[int, Tensor] = {}  # the experts not computed into y_c
        with closing(groups):
            for group in groups:
                first = starts[[e for e, _ in group]]
                counts_g = starts[[e + 1 for e, _ in group]] - first
                if self._run_together(x_c, rw_c, first, counts_g, group, y_c):
                    continue
                for e, weights in group:
                    rows = slice(int(starts[e]), int(starts[e + 1]))
                    outputs[e] = self._run_one(
                        x_ND[rows], x_c[rows], rw_c[rows], weights, row_weights_N[rows]
                    )
        if not active:
            y_ND = x_ND.new_zeros(0, x_ND.shape[1])
        elif not outputs:
            y_ND = y_c
        else:
            rows_of = {e: y_c[int(starts[e]) : int(starts[e + 1])] for e in active if e not in outputs}
            y_ND = torch.cat([outputs[e] if e in outputs else rows_of[e] for e in active])
        return ExpertsOutput(y_ND, layout, local_step(x_TD.shape[0], layout, call))

    def _takes_token(self, x_TD: Tensor, route: RouterOutput) -> bool:
        """Whether ``_run_token`` runs this call: one CPU token, every slot used, no autograd or autocast."""
        device = x_TD.device.type
        return (
            x_TD.shape[0] == 1
            and device == "cpu"
            and route.valid_TK is None
            and not torch.is_autocast_enabled(device)
            and not (torch.is_grad_enabled() and x_TD.requires_grad)
            and not torch.compiler.is_compiling()
        )

    def _run_token(self, x_TD: Tensor, route: RouterOutput, call: Call) -> ExpertsOutput:
        """A call of one token (a decode step of one sequence), its experts' outputs summed here.

        The token's ``K`` distinct experts each take the token's row, no capacity can drop
        one, and their weighted outputs land in slot order, so they are summed as
        ``combine`` sums a token's rows (``sum_slots``): the same bits as ``run``'s
        dispatch, expert-major rows and combine, without building them.
        """
        ids: list[int] = route.expert_ids_TK[0].tolist()  # NOTE: host sync (the experts to fetch)
        K, E = len(ids), self.num_experts
        slot_of = {e: k for k, e in enumerate(ids)}
        x_KD = x_TD.expand(K, -1).contiguous()  # the token's row once per slot
        rw_K = route.weights_TK[0]
        rw_c = rw_K.to(x_TD.dtype).float()  # rounded as the in-memory experts round them, in fp32
        y_KD = torch.empty_like(x_KD)
        with closing(self.fetch_groups(sorted(ids))) as groups:
            for group in groups:
                slots = np.array([slot_of[e] for e, _ in group], dtype=np.int64)
                if self._run_together(x_KD, rw_c, slots, np.ones_like(slots), group, y_KD):
                    continue
                for (_, weights), k in zip(group, slots.tolist(), strict=True):
                    one = slice(k, k + 1)
                    y_KD[one] = self._run_one(x_TD, x_KD[one], rw_c[one], weights, rw_K[one])
        routed_E = np.bincount(ids, minlength=E)
        step = ExpertStep(
            num_tokens=1,
            capacity=compute_capacity(call.capacity_factor, 1, K, E, 1),
            routed_per_expert_E=torch.from_numpy(routed_E),
            tokens_per_expert_E=torch.from_numpy(routed_E.copy()),
            dropped=0,
            plan=Plan() if call.plan == "auto" else call.plan,
            world_size=1,
        )
        return ExpertsOutput(sum_slots(y_KD, self._slot_order(K)), None, step, combined=True)

    def _slot_order(self, K: int) -> Tensor:
        """``[[0, ..., K-1]]``: one token's rows, in slot order (kept per ``K``)."""
        order = self._slot_orders.get(K)
        if order is None:
            order = self._slot_orders[K] = torch.arange(K).view(1, K)
        return order

    def _run_together(
        self,
        x_c: Tensor,
        rw_c: Tensor,
        first: np.ndarray,
        counts: np.ndarray,
        group: list[tuple[int, ExpertWeights]],
        y_c: Tensor,
    ) -> bool:
        """Plain bf16 or int8 experts on decoding rows: all of ``group`` in one call of the row kernels.

        Expert ``i`` of ``group`` runs on the ``counts[i]`` rows from ``first[i]`` of
        ``x_c`` into the same rows of ``y_c``; False (nothing computed) where the kernels
        do not take them all.
        """
        activation = self.grouped.activation
        plain = [(a, b) for a, b in (w for _, w in group) if isinstance(a, Tensor) and isinstance(b, Tensor)]
        int8 = [
            (a.q, a.scale, b.q, b.scale)
            for a, b in (w for _, w in group)
            if isinstance(a, Int8Weight) and isinstance(b, Int8Weight)
        ]
        if len(plain) == len(group):
            return experts_bf16_at(x_c, first, counts, plain, activation, rw_c, y_c)
        return len(int8) == len(group) and experts_int8_at(x_c, first, counts, int8, activation, rw_c, y_c)

    def _run_one(
        self, x_ND: Tensor, x_c: Tensor, rw_c: Tensor, weights: ExpertWeights, row_weights_N: Tensor
    ) -> Tensor:
        """One expert on rows the row kernels did not take (``x_c``, ``rw_c``: in the compute dtype)."""
        experts = self.grouped
        w_in, w_out = weights
        # plain weights on the experts' backend (the same products and roundings as the
        # in-memory experts); int8 or packed weights: one expert's FFN on them directly
        if isinstance(w_in, Tensor) and isinstance(w_out, Tensor):
            stacked = (w_in.unsqueeze(0), w_out.unsqueeze(0), None, None)
            return experts.apply_weights(x_ND, [x_ND.shape[0]], stacked, row_weights_N)
        return served_expert_ffn(x_c, w_in, w_out, experts.activation, rw_c)

    def fetch(self, active: list[int]) -> Generator[tuple[int, ExpertWeights], None, None]:
        """Ask the cache for this layer's ``active`` experts: ``(expert, weights)`` once each, resident first.

        The misses start reading at once, and the layer's predictions are scored against
        ``active``. Each expert stays pinned until the next is asked for: close the
        generator when done (``contextlib.closing``). Used by expert resolvers that
        compute this layer's experts themselves (``flexmoe.adapters``).
        """
        self._score_candidates(active)
        return self.cache.use(self.layer_index, active)

    def fetch_groups(self, active: list[int]) -> Generator[list[tuple[int, ExpertWeights]], None, None]:
        """``fetch``, with the experts resident now handed over together (``ExpertCache.use_groups``)."""
        self._score_candidates(active)
        return self.cache.use_groups(self.layer_index, active)

    def check_budget(self, top_k: int) -> None:
        """Raise ``ValueError`` if the cache's budget cannot hold the ``top_k`` experts one token needs."""
        budget = self.cache.budget_bytes
        need = top_k * self.expert_bytes
        if budget is not None and need > budget:
            raise ValueError(
                f"expert_budget of {budget} bytes is too small: one step of {self.name} needs its "
                f"top-{top_k} experts in memory at once, {top_k} x {self.expert_bytes} = {need} bytes"
            )


def predicted_experts(layer: MoELayer, h_TD: Tensor, confidence: float = DEFAULT_CONFIDENCE) -> list[int]:
    """The experts ``layer``'s router picks for ``h_TD [..., D]`` with probability >= ``confidence / E``.

    The router runs with ``layer``'s routing as it is now (its ``top_k`` and ``top_p``,
    whatever ``set_routing`` made of them); of each token's chosen experts, those the
    router gives less than ``confidence`` times the uniform probability are left out
    (``confidence=0``: all of them), and so are unused top-p slots and zero-computation
    experts (nothing to read). Sorted, each expert once.
    """
    if not confidence >= 0.0:
        raise ValueError(f"confidence must be a number >= 0, got {confidence!r}")
    config = layer.config
    with torch.no_grad():
        choice = layer.router.choose(h_TD.reshape(-1, h_TD.shape[-1]), config.top_k, config.router.top_p)
        # the rest on the host, where the expert ids are going anyway: for the few tokens
        # of a decode step numpy's calls cost less than the tensor ops' dispatch
        ids_TK = choice.expert_ids_TK.cpu().numpy()  # NOTE: host sync (the expert ids to read)
        probs_TE = choice.probs_TE.cpu().numpy()
        keep_TK = np.take_along_axis(probs_TE, ids_TK, axis=1) >= confidence / probs_TE.shape[1]
        if choice.valid_TK is not None:
            keep_TK &= choice.valid_TK.cpu().numpy()
        keep_TK &= ids_TK < config.num_experts
    predicted: list[int] = np.unique(ids_TK[keep_TK]).tolist()
    return predicted


def prefetch_experts(layer: MoELayer, h_TD: Tensor) -> list[int]:
    """Predict the experts of offloaded ``layer`` from hidden states ``h_TD`` and read them ahead.

    ``h_TD`` should be close to what ``layer`` will be given (the residual stream before
    it, normalised as its input is). The prediction (``predicted_experts`` with the
    strategy's ``confidence``) replaces any earlier one for this layer; the cache scores
    it when the layer runs. Of the experts the router picks, those whose past
    predictions this layer used less than ``strategy.min_precision`` of the time are
    left out (``OffloadedExperts.trusted``). Returns the predicted experts.
    """
    strategy = layer.strategy
    if not isinstance(strategy, OffloadedExperts):
        raise ValueError(f"prefetch_experts needs an offloaded layer, got a {type(strategy).__name__}")
    predicted = strategy.trusted(predicted_experts(layer, h_TD, strategy.confidence))
    strategy.cache.prefetch(strategy.layer_index, predicted)
    return predicted


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
