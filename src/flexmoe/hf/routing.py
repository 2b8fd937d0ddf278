"""Run-time routing options of a converted model: fewer (or more) experts per token at inference.

    import flexmoe.hf

    flexmoe.hf.set_routing(model, top_k=1)                # every MoE layer, until changed again
    with flexmoe.hf.set_routing(model, top_p=0.7):        # top-p routing inside the block only
        model.generate(...)
    flexmoe.hf.set_routing(model, top_k=2, layers=[0, 1])  # the first two MoE layers
    flexmoe.hf.routing_settings(model)                    # each layer's top_k, top_p, min_k

``set_routing`` applies ``MoELayer.set_routing`` to every MoE layer of a model (the
converted blocks of a ``transformers`` model, a ``load_offloaded`` one, or any module
holding ``MoELayer`` s), or to the listed ones, all or nothing: every layer is checked
before the call returns, and a refusal leaves the model as it was. On a model from
``load_offloaded`` the next layer's prediction follows its new ``top_k``, and a ``top_k``
whose experts do not fit the cache's budget is refused at once, not at the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from torch import nn

from flexmoe.config import validate_top_p
from flexmoe.layer import MoELayer
from flexmoe.layer.moe_layer import KEEP, Keep
from flexmoe.layer.offloaded import OffloadedExperts

__all__ = ["LayerRouting", "RoutingOverride", "moe_layers", "routing_settings", "set_routing"]

_Change = tuple[str, MoELayer, int, float | None, int]  # (path, layer, top_k, top_p, min_k)


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing settings.

    Attributes:
        index: the layer's position among the model's MoE layers (depth order, from 0).
        path: its module path (``model.layers.3.mlp.moe``).
        top_k: experts per token (the most, under top-p routing).
        top_p: top-p routing's probability threshold, or ``None`` (always ``top_k``).
        min_k: the fewest experts a token takes under top-p routing.
        num_choices: what the router chooses among (the most ``top_k`` can be).
    """

    index: int
    path: str
    top_k: int
    top_p: float | None
    min_k: int
    num_choices: int


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """``(path, layer)`` of every ``MoELayer`` in ``model``, in depth (module) order.

    Raises ``ValueError`` when there is none (an unconverted ``transformers`` model).
    """
    found = [(path, module) for path, module in model.named_modules() if isinstance(module, MoELayer)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no flexmoe MoE layer: convert it with flexmoe.hf.convert "
            "or load it with flexmoe.hf.load_offloaded"
        )
    return found


def routing_settings(model: nn.Module) -> list[LayerRouting]:
    """The routing settings of every MoE layer of ``model``, in depth order."""
    return [_settings(index, path, layer) for index, (path, layer) in enumerate(moe_layers(model))]


class RoutingOverride:
    """What ``set_routing`` changed; ``restore()`` (or leaving a ``with`` block) puts it back.

    Attributes:
        model: the model changed.
        previous: the changed layers' settings before the change.
        current: their settings after it.
    """

    def __init__(self, model: nn.Module, previous: list[LayerRouting], current: list[LayerRouting]) -> None:
        self.model = model
        self.previous = previous
        self.current = current
        self.restored = False

    def restore(self) -> None:
        """Give the changed layers their previous settings (once; later calls do nothing)."""
        if self.restored:
            return
        layers = dict(moe_layers(self.model))
        _apply(self.model, [(s.path, layers[s.path], s.top_k, s.top_p, s.min_k) for s in self.previous])
        self.restored = True

    def __enter__(self) -> RoutingOverride:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()


def set_routing(
    model: nn.Module,
    *,
    top_k: int | None = None,
    top_p: float | Keep | None = KEEP,
    min_k: int | None = None,
    layers: Sequence[int] | None = None,
) -> RoutingOverride:
    """Change the routing of ``model``'s MoE layers for every later call (inference options).

    A lower ``top_k`` computes fewer experts per token (faster, and on a model from
    ``load_offloaded`` fewer experts read); ``top_p`` lets each token keep only the
    fewest of its ``top_k`` best experts whose probabilities reach ``top_p`` (at least
    ``min_k``). Either changes the model's outputs: measure the cost on real text.

    Args:
        model: a converted ``transformers`` model (``flexmoe.hf.convert``), one from
            ``flexmoe.hf.load_offloaded``, or any module holding ``MoELayer`` s.
        top_k: experts per token, an int in ``[1, the layer's number of choices]`` (and
            what group-limited routing can reach); ``None`` keeps each layer's.
        top_p: a float in ``(0, 1]`` sets top-p routing, ``None`` turns it off; not
            given (``KEEP``), each layer keeps its rule.
        min_k: the fewest experts per token under top-p routing (``<= top_k``); ``None``
            keeps each layer's, lowered to ``top_k`` where it would exceed it.
        layers: positions among the model's MoE layers (depth order, from 0); ``None``:
            every MoE layer.

    Returns:
        A ``RoutingOverride``: ``restore()`` puts the previous settings back, and so does
        leaving a ``with set_routing(...):`` block.

    Raises:
        ValueError: a bad value (naming the argument, and the layer where it is the
            layer that refuses it); the model is then left unchanged.
    """
    _check_arguments(top_k, top_p, min_k)
    every = moe_layers(model)
    chosen = _chosen_layers(every, layers)
    previous = [_settings(index, *every[index]) for index in chosen]
    changes = [
        (
            *every[index],
            setting.top_k if top_k is None else top_k,
            setting.top_p if isinstance(top_p, Keep) else top_p,
            min(setting.min_k, top_k or setting.top_k) if min_k is None else min_k,
        )
        for index, setting in zip(chosen, previous, strict=True)
    ]
    try:
        _apply(model, changes)
    except ValueError:
        _apply(model, [(*every[s.index], s.top_k, s.top_p, s.min_k) for s in previous])
        raise
    current = [_settings(index, *every[index]) for index in chosen]
    return RoutingOverride(model, previous, current)


def _check_arguments(top_k: object, top_p: object, min_k: object) -> None:
    """Refuse values of the wrong kind before any layer changes (a layer checks its own ranges)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if min_k is not None and (isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 1):
        raise ValueError(f"min_k must be an int >= 1 or None, got {min_k!r}")
    if top_p is not None and not isinstance(top_p, Keep):
        validate_top_p(top_p)


def _chosen_layers(every: list[tuple[str, MoELayer]], layers: Sequence[int] | None) -> list[int]:
    """The positions ``layers`` names (all when ``None``), checked, in the order given, without repeats."""
    if layers is None:
        return list(range(len(every)))
    count = len(every)
    wanted = f"indices of the model's {count} MoE layers (0 to {count - 1})"
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a sequence of {wanted} or None, got {layers!r}")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad or not layers:
        raise ValueError(f"layers must be {wanted}, got {list(layers)!r}")
    return list(dict.fromkeys(layers))


def _settings(index: int, path: str, layer: MoELayer) -> LayerRouting:
    config = layer.config
    return LayerRouting(
        index=index,
        path=path,
        top_k=config.top_k,
        top_p=config.router.top_p,
        min_k=config.router.min_k,
        num_choices=config.num_choices,
    )


def _apply(model: nn.Module, changes: list[_Change]) -> None:
    """Set every layer's routing (a refusal names the layer); offloaded predictions read it per call."""
    for path, layer, top_k, top_p, min_k in changes:
        strategy = layer.strategy
        try:
            if isinstance(strategy, OffloadedExperts):  # the budget must hold one token's experts
                strategy.check_budget(top_k)
            layer.set_routing(top_k=top_k, top_p=top_p, min_k=min_k)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
