"""Expert-specialized fine-tuning (ESFT): choosing a task's experts, and adapters made of just those.

Legend: T tokens, K top-k, E experts, D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), k chosen experts of a layer.

ESFT (Wang et al., 2024) scores each expert of each layer by its share of the task's
routing mass and fine-tunes, per layer, the fewest experts whose shares add up to a
threshold ``p``; everything else stays frozen, the router included. Two scores:

- ``"gate"`` (ESFT-Gate): the expert's share of the routing weights the tokens gave
  their chosen experts (the weights that scale the experts' outputs);
- ``"token"`` (ESFT-Token): the expert's share of the routed (token, choice) pairs.

An ESFT adapter is just the chosen experts' weights: per layer (by the path of its
``GroupedExperts``, as ``add_lora`` names them), the expert ids and their ``w_in``,
``w_out`` (and biases). ``save_esft_adapter`` writes them as ``esft_adapter.safetensors``
plus ``esft_config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flexmoe.experts import GroupedExperts
from flexmoe.layer import MoELayer
from flexmoe.routing import RouterOutput

__all__ = [
    "ESFTAdapter",
    "ESFTExperts",
    "esft_scores",
    "esft_select",
    "experts_of_layers",
    "load_esft_adapter",
    "merge_esft_adapter",
    "save_esft_adapter",
    "select_by_share",
]

CONFIG_NAME = "esft_config.json"
WEIGHTS_NAME = "esft_adapter.safetensors"
FORMAT = "flexmoe-esft"
WEIGHT_NAMES = ("w_in", "w_out", "b_in", "b_out")


@dataclass
class ESFTExperts:
    """One layer's replaced experts: ``expert_ids`` (increasing) and their weights.

    ``w_in [k, H, D]``, ``w_out [k, D, F]``, ``b_in [k, H]`` / ``b_out [k, D]`` (or
    ``None``), in the layout of ``GroupedExperts``.
    """

    expert_ids: tuple[int, ...]
    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None = None
    b_out: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The weights by name (biases only where present)."""
        named = {"w_in": self.w_in, "w_out": self.w_out, "b_in": self.b_in, "b_out": self.b_out}
        return {name: t for name, t in named.items() if t is not None}


@dataclass
class ESFTAdapter:
    """An ESFT adapter: per experts path, the replaced experts (``ESFTExperts``).

    ``score`` and ``threshold`` record how the experts were chosen (informational).
    """

    layers: dict[str, ESFTExperts]
    score: str | None = None
    threshold: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> list[Tensor]:
        """Every weight tensor of the adapter (what to hand an optimizer after ``esft_prepare``)."""
        return [t for layer in self.layers.values() for t in layer.tensors().values()]

    def num_bytes(self) -> int:
        """Bytes of the adapter's weights."""
        return sum(t.numel() * t.element_size() for t in self.parameters())


def experts_of_layers(model: nn.Module) -> dict[str, tuple[MoELayer, GroupedExperts]]:
    """Every ``MoELayer`` of ``model`` with grouped experts, by the path of its ``GroupedExperts``."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, MoELayer) and isinstance(module.experts, GroupedExperts):
            found[f"{path}.experts" if path else "experts"] = (module, module.experts)
    return found


# ---------------------------------------------------------------- selection
def select_by_share(scores_E: Tensor, threshold: float) -> tuple[int, ...]:
    """The fewest experts, best first, whose shares of ``scores_E`` add up to ``threshold``.

    Shares are ``scores_E / scores_E.sum()`` (fp64); ties go to the lower expert id. A
    layer that saw no routing mass gets no experts.
    """
    scores = scores_E.detach().to(torch.float64).cpu()
    total = float(scores.sum())
    if total <= 0.0:
        return ()
    shares = scores / total
    # Stable sort by decreasing share: equal shares keep increasing expert ids.
    order = torch.sort(-shares, stable=True).indices
    reached = torch.cumsum(shares[order], 0) >= threshold
    hits = torch.nonzero(reached)
    count = int(hits[0]) + 1 if len(hits) else len(order)
    return tuple(sorted(int(e) for e in order[:count]))


def _validate_score(score: str) -> None:
    if score not in ("gate", "token"):
        raise ValueError(f"score must be 'gate' or 'token', got {score!r}")


def esft_scores(
    model: nn.Module, batches: Iterable[Any], score: Literal["gate", "token"] = "gate"
) -> dict[str, Tensor]:
    """Each layer's routing mass per expert over ``batches`` (fp64 ``[E]``, by experts path).

    ``batches``: the model's inputs, each a tensor (``model(batch)``) or a mapping
    (``model(**batch)``). ``"gate"``: the summed routing weights of the chosen experts;
    ``"token"``: the number of (token, choice) pairs routed to each. Runs without
    gradients, in the model's current mode; unused slots (top-p) and zero-computation
    experts do not count.
    """
    _validate_score(score)
    layers = experts_of_layers(model)
    if not layers:
        raise ValueError(f"model has no MoELayer with grouped experts (a {type(model).__name__})")
    totals = {
        path: torch.zeros(layer.config.num_experts, dtype=torch.float64)
        for path, (layer, _) in layers.items()
    }

    def recorder(path: str, num_experts: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, route: RouterOutput) -> None:
            totals[path] += routing_mass(route, num_experts, score)

        return hook

    handles = [
        layer.router.register_forward_hook(recorder(path, layer.config.num_experts))
        for path, (layer, _) in layers.items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def routing_mass(route: RouterOutput, num_experts: int, score: str) -> Tensor:
    """One call's routing mass per routed expert (fp64 ``[E]``, CPU): summed weights or choices."""
    ids_TK = route.expert_ids_TK
    used_TK = ids_TK < num_experts  # zero-computation experts have ids >= E
    if route.valid_TK is not None:
        used_TK = used_TK & route.valid_TK
    mass_TK = (
        route.weights_TK.detach().to(torch.float64)
        if score == "gate"
        else torch.ones_like(ids_TK, dtype=torch.float64)
    )
    mass_TK = mass_TK * used_TK
    totals = torch.zeros(num_experts, dtype=torch.float64, device=ids_TK.device)
    totals.index_add_(0, ids_TK.clamp(max=num_experts - 1).reshape(-1), mass_TK.reshape(-1))
    return totals.cpu()


def esft_select(
    model: nn.Module,
    batches: Iterable[Any],
    threshold: float,
    score: Literal["gate", "token"] = "gate",
) -> dict[str, tuple[int, ...]]:
    """ESFT's expert choice: per layer, the fewest experts covering ``threshold`` of the task's routing mass.

    Args:
        model: a model of ``MoELayer``s (the main job's model, a converted
            ``transformers`` model).
        batches: samples of the task's data (see ``esft_scores``).
        threshold: ``p`` in ``(0, 1]``: the share of the routing mass the chosen experts cover.
        score: ``"gate"`` (ESFT-Gate, the routing weights) or ``"token"`` (ESFT-Token,
            the routed choices).

    Returns the chosen expert ids (increasing) by experts path (``add_lora``'s keys).
    """
    if not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    totals = esft_scores(model, batches, score)
    return {path: select_by_share(scores, float(threshold)) for path, scores in totals.items()}


# --------------------------------------------------------------- the files
def save_esft_adapter(adapter: ESFTAdapter, directory: str | os.PathLike[str]) -> None:
    """Write ``esft_adapter.safetensors`` (``<experts path>.<w_in|w_out|...>``) and ``esft_config.json``.

    The config lists each layer's expert ids, the score and the threshold.
    """
    os.makedirs(directory, exist_ok=True)
    tensors = {
        f"{path}.{name}": t.detach().contiguous().cpu()
        for path, layer in adapter.layers.items()
        for name, t in layer.tensors().items()
    }
    config = {
        "format": FORMAT,
        "version": 1,
        "score": adapter.score,
        "threshold": adapter.threshold,
        "experts": {path: list(layer.expert_ids) for path, layer in adapter.layers.items()},
        "metadata": adapter.metadata,
    }
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_esft_adapter(
    directory: str | os.PathLike[str], device: torch.device | str | None = None
) -> ESFTAdapter:
    """Read what ``save_esft_adapter`` wrote (``ValueError`` on another format or mismatching entries)."""
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{directory}: {CONFIG_NAME} is not a flexmoe ESFT adapter (format {config.get('format')!r})"
        )
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device or "cpu"))
    layers = {}
    for path, ids in config["experts"].items():
        named = {name: tensors.pop(f"{path}.{name}", None) for name in WEIGHT_NAMES}
        w_in, w_out = named["w_in"], named["w_out"]
        if w_in is None or w_out is None:
            raise ValueError(f"{directory}: {path} lacks w_in or w_out in {WEIGHTS_NAME}")
        if not (w_in.shape[0] == w_out.shape[0] == len(ids)):
            raise ValueError(
                f"{directory}: {path} holds {w_in.shape[0]} experts, the config lists {len(ids)}"
            )
        layers[path] = ESFTExperts(tuple(int(e) for e in ids), w_in, w_out, named["b_in"], named["b_out"])
    if tensors:
        raise ValueError(
            f"{directory}: {WEIGHTS_NAME} has entries the config does not list: {sorted(tensors)}"
        )
    return ESFTAdapter(layers, config.get("score"), config.get("threshold"), config.get("metadata", {}))


# ------------------------------------------------------------------ checks
def check_adapter_fits(adapter: ESFTAdapter, model: nn.Module) -> dict[str, GroupedExperts]:
    """The experts each layer of ``adapter`` replaces, checked against ``model`` (else ``ValueError``)."""
    layers = experts_of_layers(model)
    unknown = sorted(set(adapter.layers) - set(layers))
    if unknown:
        raise ValueError(
            f"ESFT adapter: layers {unknown} are not experts paths of the model ({sorted(layers)})"
        )
    fitted = {}
    for path, replaced in adapter.layers.items():
        experts = layers[path][1]
        ids = list(replaced.expert_ids)
        if ids != sorted(set(ids)) or (ids and (ids[0] < 0 or ids[-1] >= experts.num_experts)):
            raise ValueError(
                f"ESFT adapter: {path} expert ids must increase within [0, {experts.num_experts}), got {ids}"
            )
        k = len(ids)
        for name, t in replaced.tensors().items():
            base = getattr(experts, name)
            if base is None or tuple(t.shape) != (k, *base.shape[1:]):
                want = None if base is None else (k, *base.shape[1:])
                raise ValueError(f"ESFT adapter: {path}.{name} has shape {tuple(t.shape)}, expected {want}")
        if (replaced.b_in is None) != (experts.b_in is None) or (replaced.b_out is None) != (
            experts.b_out is None
        ):
            raise ValueError(f"ESFT adapter: {path} must have biases exactly where the model's experts do")
        fitted[path] = experts
    return fitted


@torch.no_grad()
def merge_esft_adapter(model: nn.Module, adapter: ESFTAdapter) -> None:
    """Copy the adapter's experts into the model's expert weights (in place): a plain fine-tuned model."""
    for path, experts in check_adapter_fits(adapter, model).items():
        replaced = adapter.layers[path]
        ids = torch.tensor(replaced.expert_ids, dtype=torch.int64, device=experts.w_in.device)
        for name, t in replaced.tensors().items():
            base = getattr(experts, name)
            base.index_copy_(0, ids, t.to(device=base.device, dtype=base.dtype))
