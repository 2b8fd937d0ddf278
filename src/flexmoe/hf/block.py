"""``FlexMoEBlock``: a ``transformers`` sparse-MoE block running on a flexmoe ``MoELayer``.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k.

The block holds the *same* tensors as the block it replaces, with no copy on one
device: the ``MoELayer``'s router weight is the ``transformers`` router's weight
Parameter, its ``experts.w_in`` / ``experts.w_out`` are ``gate_up_proj [E, 2F, D]`` /
``down_proj [E, D, F]`` (flexmoe's layout: rows ``[gate; up]``), and a selection bias
(``e_score_correction_bias``) is the same storage. Shared experts, their gate and any
output norm are the ``transformers`` modules themselves, registered under their
``transformers`` names. Gradients therefore land on the original Parameters, and
putting the original block back (``restore``) needs no copy either.

Over a process group each rank keeps only the experts it owns (copies of its slices);
the original full expert tensors are released and ``restore`` gathers them back.

The block saves and loads as the block it replaced: its ``state_dict`` entries are the
original block's names, layouts and dtypes, holding the current weights (what ``restore``
would put back), and ``load_state_dict`` accepts them; see ``FlexMoEBlock``.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import Tensor, nn

from flexmoe.hf import _transformers
from flexmoe.hf.families import Family, resolve
from flexmoe.hf.plan import BlockPlan
from flexmoe.layer import MoELayer, flexmoe_state_names_requested
from flexmoe.routing import RouterOutput

__all__ = ["FlexMoEBlock"]


@functools.lru_cache(maxsize=1)
def _router_logits_collector() -> Any:
    """``transformers``' context variable of the outputs being collected, or ``None``.

    ``transformers`` records ``router_logits`` (for ``output_router_logits`` and its
    load-balancing loss) with forward hooks on its router modules, appending to the
    collector of the running forward; a converted block no longer calls its router
    module, so it appends its own logits there (``_active_collector`` is internal to
    ``transformers.utils.output_capturing``; without it, nothing is recorded).
    """
    try:
        return _transformers.load("transformers.utils.output_capturing")._active_collector
    except (ImportError, AttributeError):
        return None


_COLLECTOR: list[Any] = []  # the collector, once looked up (FlexMoEBlock.__init__ does)


def _collector() -> Any:
    # Looked up eagerly when a block is built: under torch.compile the lookup (an
    # import) would break the graph; reading it here, and its get(), do not.
    if not _COLLECTOR:
        _COLLECTOR.append(_router_logits_collector())
    return _COLLECTOR[0]


def _active_router_logits() -> list[Tensor] | None:
    """The list ``transformers`` is collecting router logits into right now, or ``None``."""
    collector = _collector()
    collected = None if collector is None else collector.get()
    if isinstance(collected, dict):
        logits = collected.get("router_logits")
        if isinstance(logits, list):
            return logits
    return None


def _record_router_logits(module: nn.Module, inputs: tuple[Any, ...], output: RouterOutput) -> None:
    logits = _active_router_logits()
    if logits is not None:
        logits.append(output.logits_TE)


class FlexMoEBlock(nn.Module):
    """A ``transformers`` sparse-MoE block computed by a flexmoe ``MoELayer`` with the same weights.

    ``forward(hidden_states [..., D]) -> [..., D]``, like the block it replaces:
    ``moe(x)`` (routed experts) ``+ shared(x)`` (times ``sigmoid(shared_gate(x))``),
    then ``post_norm``. ``moe.stats`` and ``moe.aux_loss`` report each call.

    Build it with ``FlexMoEBlock.build(plan_block(block, options), group)``;
    ``restore()`` returns the original block with the current weights.

    Its ``state_dict`` is the original block's (state-dict hooks): the ``transformers``
    names (``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj``,
    ``gate.e_score_correction_bias``, the shared experts), layouts and dtypes, holding
    the current weights, so ``save_pretrained`` of a converted model writes a checkpoint
    that plain ``transformers`` loads. ``load_state_dict`` takes those names too (and
    flexmoe's own ``moe.*`` names). With experts spread over ranks the saved experts are
    gathered from every rank: ``state_dict()`` (and ``save_pretrained``) is then a
    collective, to call on every rank.

    Attributes:
        moe: the ``MoELayer`` (routed experts and router).
        original_class: the replaced block's class name.
        family: the ``Family`` it was converted with.
    """

    moe: MoELayer

    def __init__(
        self,
        moe: MoELayer,
        original: nn.Module,
        family: Family,
        extras: dict[str, nn.Module | None],
        router_follows_model: bool = True,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.family = family
        self.original_class = type(original).__name__
        # Not a child: the original block's router and experts must not run, nor appear
        # twice in parameters(); it is kept only to be put back.
        self._original: tuple[nn.Module] = (original,)
        self._shared_name = (family.shared or "").split(".")[-1] or None
        self._shared_gate_name = (family.shared_gate or "").split(".")[-1] or None
        self._post_norm_name = (family.post_norm or "").split(".")[-1] or None
        for name, module in extras.items():
            if module is not None:
                self.add_module(name, module)
        # What restore() needs besides the original block (kept as plain data, so that
        # deepcopy and pickling of a converted model carry it along).
        self._router_follows_model = router_follows_model
        self._full_expert_shapes: tuple[torch.Size, torch.Size] | None = None
        _collector()
        moe.router.register_forward_hook(_record_router_logits)
        # Module-level functions, so that deepcopy and pickling carry the hooks along.
        self.register_state_dict_post_hook(_save_as_original)
        self.register_load_state_dict_pre_hook(_load_original)

    # ---------------------------------------------------------------- forward
    def forward(self, hidden_states: Tensor) -> Tensor:
        """The block's output for ``hidden_states [..., D]``."""
        y = self.moe(hidden_states)
        shared = self._child(self._shared_name)
        if shared is not None:
            shared_y = shared(hidden_states)
            gate = self._child(self._shared_gate_name)
            if gate is not None:
                shared_y = torch.sigmoid(gate(hidden_states)) * shared_y
            y = y + shared_y
        post_norm = self._child(self._post_norm_name)
        if post_norm is not None:
            y = post_norm(y)
        return cast(Tensor, y)

    def _child(self, name: str | None) -> nn.Module | None:
        return None if name is None else self._modules.get(name)

    @property
    def original(self) -> nn.Module:
        """The replaced ``transformers`` block (its router and experts hold the same Parameters)."""
        return self._original[0]

    def extra_repr(self) -> str:  # noqa: D102
        return f"original={self.original_class}"

    # ------------------------------------------------------------- conversion
    @classmethod
    def build(cls, plan: BlockPlan, group: object = False) -> FlexMoEBlock:
        """The flexmoe block for a checked ``plan`` (see ``plan_block``); ``group=False``: one device."""
        follows = plan.router_weight.dtype == plan.w_in.dtype
        if group is False:
            return cls(_share_single_device(plan), plan.block, plan.family, plan.extras, follows)
        moe = MoELayer.from_config(plan.config, device=plan.w_in.device, dtype=plan.w_in.dtype, group=group)
        converted = cls(moe, plan.block, plan.family, plan.extras, follows)
        converted._shard_experts(plan)
        return converted

    def _shard_experts(self, plan: BlockPlan) -> None:
        """Keep this rank's expert slices (copies), share the router, release the full tensors."""
        moe, w_in, w_out = self.moe, plan.w_in, plan.w_out
        state = {
            "router.weight": plan.router_weight.detach(),
            "experts.w_in": w_in.detach(),
            "experts.w_out": w_out.detach(),
        }
        if plan.bias is not None:
            state["router.expert_bias_E"] = plan.bias.detach().reshape(-1)
        moe.load_single_device_state_dict(state)
        moe.router.weight = plan.router_weight
        if plan.bias is not None:
            moe.router._buffers["expert_bias_E"] = _bias_view(plan.bias)
        self._full_expert_shapes = (w_in.shape, w_out.shape)
        # Only this rank's slices stay in memory; restore() gathers the rest.
        w_in.data = w_in.data.new_empty(0)
        w_out.data = w_out.data.new_empty(0)

    # ------------------------------------------------------------ restoration
    def restore(self) -> nn.Module:
        """The original block, holding the current weights (a collective when distributed).

        On one device the Parameters are the same objects, so this only undoes what a
        dtype or device conversion of the flexmoe modules changed on their own (a
        selection-bias buffer, the dtype of the router weight). Over a process group
        the full expert tensors are gathered from every rank: call it on every rank.
        """
        original = self.original
        for key, value in self._current_original_tensors().items():
            owner_path, _, name = key.rpartition(".")
            owner = original.get_submodule(owner_path) if owner_path else original
            held = getattr(owner, name)
            if value is held:
                continue
            if isinstance(held, nn.Parameter):
                held.data = value.detach()
            else:
                setattr(owner, name, value.detach())  # a buffer
        return original

    def _shared_names(self) -> dict[str, str]:
        """``original key -> MoELayer key`` for the tensors the layer computes with (relative names)."""
        family = self.family
        names = {
            family.router_weight or f"{family.router}.weight": "router.weight",
            "experts.gate_up_proj": "experts.w_in",
            "experts.down_proj": "experts.w_out",
        }
        if family.selection_bias is not None:
            names[family.selection_bias] = "router.expert_bias_E"
        return names

    def _current_original_tensors(self) -> dict[str, Tensor]:
        """The tensors ``restore`` puts in the original block, by its ``state_dict`` key.

        The held tensor itself where the original block still shares it; else the
        current value in the original's layout and dtype. Distributed: the experts are
        gathered from every rank (a collective).
        """
        moe, original = self.moe, self.original
        names = self._shared_names()
        by_layer_key: dict[str, Tensor] = moe.state_dict(keep_vars=True)  # the held tensors themselves
        if self._full_expert_shapes is not None:
            state = moe.single_device_state_dict()  # a collective: every rank gathers
            for key, shape in zip(("experts.w_in", "experts.w_out"), self._full_expert_shapes, strict=True):
                by_layer_key[key] = state[key].reshape(shape)
        # flexmoe keeps its router in fp32 through .to(dtype); the transformers router
        # computes in the model's dtype, so it gets that dtype back.
        model_dtype = by_layer_key["experts.w_in"].dtype
        router_weight = by_layer_key["router.weight"]
        if self._router_follows_model and router_weight.dtype != model_dtype:
            by_layer_key["router.weight"] = router_weight.detach().to(model_dtype)
        out = {key: by_layer_key[layer_key] for key, layer_key in names.items() if layer_key in by_layer_key}
        if self.family.selection_bias is not None:
            held = resolve(original, self.family.selection_bias)
            current = by_layer_key["router.expert_bias_E"]
            # Still the same storage, or flexmoe's copy was moved or cast on its own (.to
            # on the converted model): the original's dtype and shape, the current value.
            same = current.data_ptr() == held.data_ptr() and current.dtype == held.dtype
            out[self.family.selection_bias] = (
                held if same else current.detach().to(held.dtype).reshape(held.shape)
            )
        return out

    # ------------------------------------------------------------- state dict
    def original_state_dict(self, keep_vars: bool = False) -> dict[str, Tensor]:
        """The original block's ``state_dict`` (relative names) holding the current weights.

        What ``restore().state_dict()`` would return, without restoring; a collective when
        the experts are spread over ranks (gathered on every rank).
        """
        current = self._current_original_tensors()
        out = {}
        for key, value in self.original.state_dict(keep_vars=True).items():
            value = current.get(key, value)
            out[key] = value if keep_vars else value.detach()
        return out

    def _load_original_state(
        self, state_dict: dict[str, Any], prefix: str, missing_keys: list[str], error_msgs: list[str]
    ) -> None:
        """Load the ``state_dict`` entries with the original block's names (see ``_load_original``)."""
        names = self._shared_names()
        original_keys = list(self.original.state_dict(keep_vars=True))
        own = [key for key in original_keys if key in names or not self._is_extra(key)]
        given = {key: state_dict.pop(prefix + key) for key in own if prefix + key in state_dict}
        if not given:
            return  # flexmoe's own names (or none of this block's): the default load
        missing_keys.extend(prefix + key for key in own if key not in given)
        expected = self._original_shapes(own)
        problems = [
            f"size mismatch for {prefix}{key}: copying a param with shape {tuple(value.shape)} from "
            f"checkpoint, the shape in current model is {tuple(expected[key])}."
            for key, value in given.items()
            if tuple(value.shape) != tuple(expected[key])
        ]
        if problems:
            error_msgs.extend(problems)
        else:
            self._copy_original_values(given)
        # The layer's own entries: its current tensors, so that the default load of ``moe``
        # (which runs next) finds every key and changes nothing.
        for key, value in self.moe.state_dict().items():
            state_dict[f"{prefix}moe.{key}"] = value

    def _is_extra(self, key: str) -> bool:
        return key.split(".", 1)[0] in self._modules and key.split(".", 1)[0] != "moe"

    def _original_shapes(self, keys: list[str]) -> dict[str, torch.Size]:
        """The single-device shape of each original ``state_dict`` entry in ``keys``."""
        held = self.original.state_dict(keep_vars=True)
        shapes = {key: held[key].shape for key in keys}
        if self._full_expert_shapes is not None:  # released here: the shapes they had
            shapes["experts.gate_up_proj"], shapes["experts.down_proj"] = self._full_expert_shapes
        else:
            shapes["experts.gate_up_proj"] = self.moe.experts.w_in.shape
            shapes["experts.down_proj"] = self.moe.experts.w_out.shape
        return shapes

    @torch.no_grad()
    def _copy_original_values(self, given: dict[str, Tensor]) -> None:
        """Copy original-named values into the tensors the block computes with (checked shapes)."""
        names = self._shared_names()
        layer_state = {names[key]: value for key, value in given.items() if key in names}
        if "router.expert_bias_E" in layer_state:
            layer_state["router.expert_bias_E"] = layer_state["router.expert_bias_E"].reshape(-1)
        experts = {key for key in layer_state if key.startswith("experts.")}
        if self._full_expert_shapes is not None and experts:
            # Each rank keeps its slices of the full experts; the layer does the slicing.
            if experts != {"experts.w_in", "experts.w_out"}:
                raise RuntimeError(
                    "loading a state_dict into experts spread over ranks needs both experts.gate_up_proj "
                    "and experts.down_proj of every converted block"
                )
            self.moe.load_single_device_state_dict({**self.moe.state_dict(), **layer_state})
        else:
            current = self.moe.state_dict(keep_vars=True)
            for key, value in layer_state.items():
                current[key].copy_(value)
        held = self.original.state_dict(keep_vars=True)
        for key, value in given.items():
            if key not in names:  # held by the original block only
                held[key].copy_(value)


def _save_as_original(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook: replace a ``FlexMoEBlock``'s entries by its original block's."""
    if flexmoe_state_names_requested():  # flexmoe's checkpoints: its own names
        return
    block = cast(FlexMoEBlock, module)  # registered on FlexMoEBlock only
    keep_vars = isinstance(state_dict.get(f"{prefix}moe.router.weight"), nn.Parameter)
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]
    for key, value in block.original_state_dict(keep_vars).items():
        state_dict[prefix + key] = value


def _load_original(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook: load a ``FlexMoEBlock`` from its original block's names.

    The values are copied into the tensors the layer computes with (shared with the
    original block on one device, this rank's slices over a process group), so that
    ``revert`` still finds them; a wrong shape is reported under the original name.
    """
    if not flexmoe_state_names_requested():
        cast(FlexMoEBlock, module)._load_original_state(state_dict, prefix, missing_keys, error_msgs)


def _bias_view(bias: Tensor) -> Tensor:
    """The selection bias as an ``[E]`` tensor sharing its storage (the same object when possible)."""
    if not isinstance(bias, nn.Parameter) and bias.dim() == 1:
        return bias
    return bias.detach().view(-1)


def _share_single_device(plan: BlockPlan) -> MoELayer:
    """A ``MoELayer`` whose tensors are the plan's (built on the meta device: nothing allocated)."""
    moe = MoELayer.from_config(plan.config, device="meta", group=False)
    moe.router.weight = plan.router_weight
    moe.experts.w_in = plan.w_in
    moe.experts.w_out = plan.w_out
    if plan.bias is not None:
        moe.router._buffers["expert_bias_E"] = _bias_view(plan.bias)
    moe.register_buffer(
        "_pending_counts_E",
        torch.zeros(plan.config.num_experts, dtype=torch.int64, device=plan.w_in.device),
        persistent=False,
    )
    left = [name for name, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    if left and not plan.w_in.is_meta:
        raise AssertionError(
            f"flexmoe.hf left {left} unallocated: MoELayer has a tensor this code does not share"
        )
    return moe
