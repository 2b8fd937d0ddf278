"""Many adapters on one base model (ExpertWeave): each token's experts resolve to its adapter's versions.

Legend: T tokens, K top-k, D model dim, E base experts, V virtual experts, M virtual
experts computed with base weights (base and LoRA), S ESFT experts, N kept rows, B sequences.

``ExpertWeave(model)`` keeps, per MoE layer, every added adapter's own parameters and
nothing else: an ESFT adapter's replaced experts (stacked ``[S, H, D]`` over the
adapters), a LoRA adapter's factors (stacked per projection and rank). Each layer
numbers *virtual experts*: for every base expert ``j``, the base expert, then each LoRA
adapter's version of ``j``; then every ESFT expert. After routing (the base router for
every adapter, as ESFT and ExpertWeave keep it), ``virtual = map[adapter + 1, expert]``
rewrites each choice (ExpertWeave's batched rerouting ``TopK'(x) = Pi[A(x), TopK(x)]``),
and the dispatch sorts the rows by virtual expert. Then one grouped GEMM over the base
experts' groups runs the base and LoRA rows on the base weights as they are (the LoRA
terms on their sub-segments, ``flexmoe.adapters.woven``), and one over the ESFT stack
runs the ESFT rows; calls without autograd on the fused backend (CPU inference) run
both in one pass (``woven_inference``). Calls whose tokens all use the base (``-1``) run
the layer as before.

A layer whose experts are offloaded (``flexmoe.layer.offloaded``, ``flexmoe.hf.load_offloaded``)
has no stacked base weights: its base experts with base or LoRA rows are asked of its
``ExpertCache`` (which also prefetches the next layer's predicted experts) and each
computes its rows as it arrives (``flexmoe.adapters.woven_offloaded``); the adapters'
own tensors stay in the weave, outside the cache's budget.

The per-sequence adapter ids reach every layer through ``use(model, adapter_ids)``; each
layer expands them to its tokens (``T / B`` consecutive tokens per sequence, the
``[B, S, D]`` row-major order of a batch), so prompt and decode steps of ``generate``
work alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from flexmoe.adapters.esft import ESFTAdapter, ESFTExperts, check_adapter_fits, experts_of_layers
from flexmoe.adapters.woven import Groups, LoRAPart, bag_layout, woven_ffn, woven_inference
from flexmoe.adapters.woven_offloaded import served_woven_ffn
from flexmoe.compiling import eager_only
from flexmoe.config import Plan
from flexmoe.dispatch import make_layout, permute, release_rows
from flexmoe.experts import GroupedExperts
from flexmoe.experts.backends import grouped_ffn
from flexmoe.experts.cache import ExpertWeights
from flexmoe.experts.ffn import resolve_backend
from flexmoe.experts.lora import ExpertLoRA
from flexmoe.experts.stacks import ExpertTensors, StackProducts
from flexmoe.layer import MoELayer
from flexmoe.layer.local import Call, ExpertsOutput, LocalExperts
from flexmoe.layer.offloaded import OffloadedExperts, compute_dtype
from flexmoe.layer.stats import ExpertStep
from flexmoe.routing import RouterOutput

__all__ = ["ExpertWeave", "LayerWeave", "remove_weave", "use", "weave_of"]

ESFT_NAMES = ("w_in", "w_out", "b_in", "b_out")
Served = Iterable[tuple[int, ExpertWeights]]  # (base expert, its weights) as an ExpertCache serves them


@dataclass
class LoRAStack:
    """One projection's LoRA factors at one rank, over every (expert, adapter) slot that has them.

    ``slots`` are ``(expert, adapter)`` pairs in increasing order (so in virtual-expert
    order); ``A [L, r, I]``, ``B [L, O, r]`` (``B`` scaled by the adapter's ``alpha / r``),
    stored in ``bag_layout`` (each slot's transposed factors contiguous).
    """

    target: str
    A: Tensor
    B: Tensor
    slots: list[tuple[int, int]]
    virtual_ids: np.ndarray  # set by LayerWeave.rebuild
    virtual_ids_device: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    rows_key: int = 0  # stacks with the same slots (w_in's and w_out's, usually) share their rows


class LayerWeave:
    """The adapters of one ``MoELayer``: its expert resolver (see the module docstring)."""

    def __init__(self, layer: MoELayer, experts: GroupedExperts, path: str) -> None:
        self.layer = layer
        self.experts = experts
        self.path = path
        self.num_experts = experts.num_experts
        self.num_adapters = 0
        # an offloaded layer: its base experts are read through its cache (fetch), never stacked
        strategy = layer.strategy
        self.offloaded = strategy if isinstance(strategy, OffloadedExperts) else None
        self.esft: dict[str, Tensor] = {}
        self.esft_slots: list[tuple[int, int]] = []  # (adapter, expert), in stack order
        self.lora: dict[tuple[str, int], LoRAStack] = {}
        self.lora_slots: set[tuple[int, int]] = set()  # (expert, adapter)
        self.adapter_ids_B: Tensor | None = None  # per sequence, CPU int64
        self.set_adapter_ids(None)
        self.owner: ExpertWeave | None = None
        self.rebuild(0)

    # ------------------------------------------------------------- adding
    def add_lora(self, adapter_id: int, lora: ExpertLoRA) -> None:
        """Stack ``lora``'s factors (scaled) as adapter ``adapter_id``'s versions of its experts."""
        E, experts = self.num_experts, self.experts
        if lora.num_experts != E:
            raise ValueError(f"{self.path}: the LoRA adapter has {lora.num_experts} experts, the layer {E}")
        new_slots = [(e, adapter_id) for e in lora.experts]
        for target in lora.targets:
            pair = lora.factors(target)
            assert pair is not None
            A, B = (t.detach().to(device=experts.w_in.device, dtype=experts.w_in.dtype) for t in pair)
            weight = experts.w_in if target == "w_in" else experts.w_out
            if A.shape[2] != weight.shape[2] or B.shape[1] != weight.shape[1]:
                raise ValueError(
                    f"{self.path}: LoRA factors of {target} have shapes {tuple(A.shape)}, {tuple(B.shape)}, "
                    f"which do not fit the experts' {tuple(weight.shape)}"
                )
            B = B * lora.scaling
            key = (target, lora.rank)
            old = self.lora.get(key)
            if old is None:
                # bag_layout copies (A may still be the caller's tensor: later changes do not leak in)
                self.lora[key] = LoRAStack(target, *bag_layout(A, B), new_slots, np.zeros(0))
                continue
            slots = old.slots + new_slots
            order = sorted(range(len(slots)), key=slots.__getitem__)
            index = torch.tensor(order, device=A.device)
            A, B = (torch.cat([o, t]).index_select(0, index) for o, t in ((old.A, A), (old.B, B)))
            self.lora[key] = LoRAStack(target, *bag_layout(A, B), [slots[i] for i in order], np.zeros(0))
        self.lora_slots.update(new_slots)

    def add_esft(self, adapter_id: int, replaced: ESFTExperts, share: bool) -> None:
        """Stack ``replaced``'s experts as adapter ``adapter_id``'s (``share``: keep its tensors if first)."""
        experts = self.experts
        for name in ESFT_NAMES:
            t = getattr(replaced, name)
            if t is None:
                continue
            if share and not self.esft_slots:
                self.esft[name] = t
                continue
            t = t.detach().to(device=experts.w_in.device, dtype=experts.w_in.dtype)
            self.esft[name] = torch.cat([self.esft[name], t]) if name in self.esft else t.clone()
        self.esft_slots += [(adapter_id, e) for e in replaced.expert_ids]

    def rebuild(self, num_adapters: int) -> None:
        """Number the virtual experts and build the expert map for ``num_adapters`` adapters."""
        E = self.num_experts
        self.num_adapters = num_adapters
        # 1. base expert j, then each LoRA adapter's version of j (adapter order)
        main = [(j, -1) for j in range(E)] + sorted(self.lora_slots)
        main.sort()
        position = {slot: v for v, slot in enumerate(main)}
        self.num_main = len(main)
        self.num_virtual = len(main) + len(self.esft_slots)
        # 2. the map Pi[adapter + 1, expert] -> virtual expert (the base where not adapted)
        expert_map = np.tile(
            np.array([position[(j, -1)] for j in range(E)], dtype=np.int64), num_adapters + 1
        )
        for j, a in self.lora_slots:
            expert_map[(a + 1) * E + j] = position[(j, a)]
        for i, (a, j) in enumerate(self.esft_slots):
            expert_map[(a + 1) * E + j] = self.num_main + i
        device = self.experts.w_in.device
        self.expert_map = torch.from_numpy(expert_map).to(device)
        base = [j for j, _ in main] + [j for _, j in self.esft_slots]
        self.base_of_virtual = np.array(base, dtype=np.int64)
        self.base_of_virtual_V = torch.from_numpy(self.base_of_virtual).to(device)
        self.base_of_main = self.base_of_virtual[: self.num_main]
        keys: dict[tuple[tuple[int, int], ...], int] = {}
        for stack in self.lora.values():
            stack.virtual_ids = np.array([position[slot] for slot in stack.slots], dtype=np.int64)
            stack.virtual_ids_device = torch.from_numpy(stack.virtual_ids).to(device)
            stack.rows_key = keys.setdefault(tuple(stack.slots), len(keys))

    # ------------------------------------------------------------ calling
    def set_adapter_ids(self, adapter_ids_B: Tensor | None) -> None:
        """The per-sequence adapter ids of the following calls (``None``: the base for all)."""
        self.adapter_ids_B = adapter_ids_B
        self.uses_adapters = adapter_ids_B is not None and bool((adapter_ids_B >= 0).any())
        self.ids_on_device: dict[torch.device, Tensor] = {}  # one copy per device, not one per call

    def run(self, x_TD: Tensor, route: RouterOutput, call: Call) -> ExpertsOutput | None:
        """Run a multi-adapter call (``None`` where every token uses the base)."""
        if not self.uses_adapters:
            return None
        out: ExpertsOutput = self.run_adapters(x_TD, route, call)
        return out

    # Eager even inside a compiled model: the per-call host work (the counts, the
    # adapters' row lists) is data-dependent; the rest of the model stays compiled.
    @eager_only
    def run_adapters(self, x_TD: Tensor, route: RouterOutput, call: Call) -> ExpertsOutput:
        """``run`` for a call where some sequences use adapters."""
        ids_B = self.adapter_ids_B
        assert ids_B is not None
        if call.capacity_factor != 0:
            raise ValueError(
                f"capacity_factor: multi-adapter batches run dropless (0), got {call.capacity_factor}"
            )
        T, B = x_TD.shape[0], ids_B.shape[0]
        if T % B:
            raise ValueError(
                f"adapter_ids: {B} sequences do not divide the {T} tokens of this call ({self.path})"
            )
        E = self.num_experts
        ids_on_device = self.ids_on_device.get(x_TD.device)
        if ids_on_device is None:
            ids_on_device = self.ids_on_device[x_TD.device] = ids_B.to(x_TD.device)
        ids_T = ids_on_device.repeat_interleave(T // B)
        virtual_TK = self.expert_map[(ids_T + 1)[:, None] * E + route.expert_ids_TK]
        layout = make_layout(virtual_TK, route.weights_TK, self.num_virtual, 0.0, False, route.valid_TK)
        row_weights_N = route.weights_TK.reshape(-1).index_select(0, layout.slot_ids_N)
        counts = Groups(np.asarray(layout.counts, dtype=np.int64), layout.tokens_per_expert_E)
        x_ND = permute(x_TD, layout)
        if self.offloaded is None:
            y_ND = self.compute(x_ND, counts, row_weights_N)
        else:
            # the base experts with base or LoRA rows come from the cache (an ESFT-replaced one is not read)
            self.offloaded.check_budget(call.top_k)
            active = np.unique(self.base_of_main[counts.counts_G[: self.num_main] > 0]).tolist()
            with closing(self.offloaded.fetch(active)) as served:
                y_ND = self.compute(x_ND, counts, row_weights_N, served)
        release_rows(x_ND)
        step = ExpertStep(
            num_tokens=T,
            capacity=None,
            routed_per_expert_E=self.fold(layout.routed_per_expert_E),
            tokens_per_expert_E=self.fold(layout.tokens_per_expert_E),
            dropped=0,
            plan=Plan() if call.plan == "auto" else call.plan,
            world_size=1,
        )
        return ExpertsOutput(y_ND, layout, step)

    def fold(self, counts_V: Tensor) -> Tensor:
        """Per-virtual-expert counts summed per base expert ``[E]`` (what the stats and losses see)."""
        totals = torch.zeros(self.num_experts, dtype=counts_V.dtype, device=counts_V.device)
        return totals.index_add_(0, self.base_of_virtual_V.to(counts_V.device), counts_V)

    def compute(
        self, x_ND: Tensor, counts: Groups, row_weights_N: Tensor, served: Served | None = None
    ) -> Tensor:
        """The weighted expert rows (``counts``: rows per virtual expert): the base-weight part, then ESFT.

        ``served``: the base experts' weights as an offloaded layer's cache serves them
        (``None``: the layer's own stacked weights).
        """
        if served is None and self.runs_inference(x_ND, row_weights_N):
            return self.compute_inference(x_ND, counts, row_weights_N)
        M = self.num_main
        n_main = int(counts.counts_G[:M].sum())
        outputs = []
        if n_main:
            main = Groups(counts.counts_G[:M], counts.counts_device[:M])
            outputs.append(self.compute_main(x_ND[:n_main], main, row_weights_N[:n_main], served))
        if n_main < x_ND.shape[0]:
            esft = Groups(counts.counts_G[M:], counts.counts_device[M:])
            outputs.append(self.compute_esft(x_ND[n_main:], esft, row_weights_N[n_main:]))
        if not outputs:
            return x_ND.new_zeros(x_ND.shape)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def runs_inference(self, x_ND: Tensor, row_weights_N: Tensor) -> bool:
        """Whether this call runs ``woven_inference``: no gradient needed, the experts' backend ``fused``.

        (The CPU default; ``loop`` stays the plain reference, ``grouped_mm`` runs the
        autograd path's few large GEMMs.)
        """
        experts = self.experts
        if experts.resolved_backend(x_ND.device, experts.compute_dtype(x_ND)) != "fused":
            return False
        if not torch.is_grad_enabled():
            return True
        tensors = (x_ND, row_weights_N, experts.w_in, experts.w_out, experts.b_in, experts.b_out)
        return not any(t is not None and t.requires_grad for t in (*tensors, *self.esft.values()))

    def compute_inference(self, x_ND: Tensor, counts: Groups, row_weights_N: Tensor) -> Tensor:
        """``compute`` without autograd: base, LoRA and ESFT rows in one ``woven_inference`` pass."""
        M, E = self.num_main, self.num_experts
        counts_M = counts.counts_G[:M]
        # the base and LoRA rows of base expert j form group j; then one group per ESFT expert
        group_counts = np.bincount(self.base_of_main, weights=counts_M, minlength=E).astype(np.int64)
        n_main = int(group_counts.sum())
        parts = self.lora_parts(x_ND, counts_M, counts.counts_device[:M]) if n_main else []
        # the base experts with LoRA rows in this call: only they need their projections apart
        lora_groups = {
            int(j)
            for stack in self.lora.values()
            for j in self.base_of_main[stack.virtual_ids[counts_M[stack.virtual_ids] > 0]]
        }
        experts = self.experts
        # the base experts' packed copies where the layer was prepared (prepare_for_inference)
        products = experts.inference_products(x_ND)
        stacks = [expert_tensors(x_ND, experts.w_in, experts.w_out, experts.b_in, experts.b_out, products)]
        if self.esft:
            esft = self.esft
            stacks.append(
                expert_tensors(x_ND, esft["w_in"], esft["w_out"], esft.get("b_in"), esft.get("b_out"))
            )
        dtype = stacks[0].w_in.dtype
        with torch.autocast(x_ND.device.type, enabled=False):
            return woven_inference(
                x_ND.to(dtype),
                [*group_counts.tolist(), *counts.counts_G[M:].tolist()],
                stacks,
                experts.activation,
                row_weights_N.to(dtype),
                parts,
                lora_groups,
            )

    def lora_parts(self, x_ND: Tensor, counts_M: np.ndarray, counts_M_dev: Tensor) -> list[LoRAPart]:
        """The LoRA stacks' shares of a call (rows per virtual expert of the main part: ``counts_M``)."""
        parts = []
        rows_of: dict[int, tuple[Tensor, Groups]] = {}
        for stack in self.lora.values():
            if stack.rows_key not in rows_of:
                counts_L = counts_M[stack.virtual_ids]
                rows_of[stack.rows_key] = self.slot_rows(stack.virtual_ids_device, counts_L, counts_M_dev)
            rows_n, slots = rows_of[stack.rows_key]
            if rows_n.numel():
                A, B = in_dtype(x_ND, stack.A), in_dtype(x_ND, stack.B)
                parts.append(LoRAPart(stack.target, rows_n, slots, A, B))
        return parts

    def compute_main(
        self, x_ND: Tensor, counts: Groups, row_weights_N: Tensor, served: Served | None = None
    ) -> Tensor:
        """Base and LoRA rows on the base weights, grouped by base expert (``served``: see ``compute``)."""
        experts = self.experts
        counts_M, counts_M_dev = counts.counts_G, counts.counts_device
        group_counts_E = np.bincount(self.base_of_main, weights=counts_M, minlength=self.num_experts)
        group_counts_dev = counts_M_dev.new_zeros(self.num_experts).index_add_(
            0, self.base_of_virtual_V[: self.num_main], counts_M_dev
        )
        groups = Groups(group_counts_E.astype(np.int64), group_counts_dev)
        parts = self.lora_parts(x_ND, counts_M, counts_M_dev)
        if served is not None:  # offloaded: each expert as the cache serves it
            dtype = compute_dtype(x_ND)
            return served_woven_ffn(
                x_ND.to(dtype),
                groups,
                served,
                experts.activation,
                row_weights_N.to(dtype),
                parts,
                experts.backend,
            )
        if not parts:  # no LoRA rows in this call: the experts' own forward (every backend)
            y: Tensor = experts(x_ND, group_counts_E.astype(np.int64).tolist(), row_weights_N)
            return y
        weights = [in_dtype(x_ND, t) for t in (experts.w_in, experts.w_out)]
        b_in, b_out = (None if b is None else in_dtype(x_ND, b) for b in (experts.b_in, experts.b_out))
        return woven_ffn(
            x_ND.to(weights[0].dtype),
            groups,
            weights[0],
            weights[1],
            b_in,
            b_out,
            experts.activation,
            row_weights_N.to(weights[0].dtype),
            parts,
            experts.backend,
        )

    @staticmethod
    def slot_rows(virtual_ids_L: Tensor, counts_L: np.ndarray, counts_M: Tensor) -> tuple[Tensor, Groups]:
        """The rows of the slots ``virtual_ids_L``, slot by slot, and their groups.

        Row ``r`` of slot ``l`` sits at ``start[l] + r``; built on the device, sized from
        the host counts, so without a synchronisation.
        """
        n = int(counts_L.sum())
        counts_L_dev = counts_M.index_select(0, virtual_ids_L)
        starts_L = (counts_M.cumsum(0) - counts_M).index_select(0, virtual_ids_L)
        first_L = counts_L_dev.cumsum(0) - counts_L_dev  # each slot's first row among the gathered
        shift_n = torch.repeat_interleave(starts_L - first_L, counts_L_dev, output_size=n)
        return shift_n + torch.arange(n, device=counts_M.device), Groups(counts_L, counts_L_dev)

    def compute_esft(self, x_ND: Tensor, counts: Groups, row_weights_N: Tensor) -> Tensor:
        """ESFT rows on the ESFT stack, with the experts' backend (``grouped_mm``: device offsets)."""
        experts = self.experts
        w_in, w_out = in_dtype(x_ND, self.esft["w_in"]), in_dtype(x_ND, self.esft["w_out"])
        b_in, b_out = (in_dtype(x_ND, self.esft[n]) if n in self.esft else None for n in ("b_in", "b_out"))
        x_ND, row_weights_N = x_ND.to(w_in.dtype), row_weights_N.to(w_in.dtype)
        name = resolve_backend(
            experts.backend, x_ND.device, x_ND.dtype, (w_in.shape[2], w_in.shape[1], w_out.shape[2])
        )
        with torch.autocast(x_ND.device.type, enabled=False):
            if name == "grouped_mm":  # the same GEMMs as the backend's, without its host-built offsets
                return woven_ffn(
                    x_ND, counts, w_in, w_out, b_in, b_out, experts.activation, row_weights_N, [], name
                )
            return grouped_ffn(
                name,
                x_ND,
                counts.counts_G.tolist(),
                w_in,
                w_out,
                b_in,
                b_out,
                experts.activation,
                row_weights_N,
            )

    def tensors(self) -> list[Tensor]:
        """Every tensor of the adapters held here (the stacks)."""
        lora = [t for stack in self.lora.values() for t in (stack.A, stack.B)]
        return list(self.esft.values()) + lora


def expert_tensors(
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    products: StackProducts | None = None,
) -> ExpertTensors:
    """A stack of experts' tensors in the dtype the GEMMs of input ``x`` run in (``in_dtype``)."""
    b_in, b_out = (None if b is None else in_dtype(x, b) for b in (b_in, b_out))
    return ExpertTensors(in_dtype(x, w_in), in_dtype(x, w_out), b_in, b_out, products)


def in_dtype(x: Tensor, t: Tensor) -> Tensor:
    """``t`` in the dtype the expert GEMMs of input ``x`` run in (autocast's, else ``x``'s: must match)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return t.to(torch.get_autocast_dtype(device_type))
    if x.dtype != t.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the adapters' weights are {t.dtype}; "
            "convert the model with .to(dtype) before adding adapters, or run under torch.autocast"
        )
    return t


class ExpertWeave:
    """Any number of LoRA and ESFT adapters served on one base model, mixed within a batch.

    ``ExpertWeave(model)`` installs itself on every ``MoELayer`` of ``model`` (its grouped
    experts must all be in this process, in memory or offloaded to an expert cache: not
    spread over ranks, no unmerged LoRA adapter attached). ``add_lora`` / ``add_esft``
    return the new adapter's id (``0, 1, ...``); ``use(adapter_ids)`` (or
    ``flexmoe.adapters.use(model, ...)``) sets one id per sequence for the calls inside it
    (``-1`` or ``None``: the base model).

    Memory: the base is never copied; the weave holds each adapter's own parameters
    (stacked per layer) plus a small index map (``adapter_bytes``, ``index_bytes``), in
    memory even where the base experts are offloaded (outside the cache's budget). Add
    adapters after moving the model to its device and dtype: they are stored like the
    experts' weights at the time they are added.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = experts_of_layers(model)
        if not layers:
            raise ValueError(f"model has no MoELayer with grouped experts (a {type(model).__name__})")
        for path, (layer, experts) in layers.items():
            refuse_layer(path, layer, experts)
        self.model = model
        self.layers = {path: LayerWeave(layer, experts, path) for path, (layer, experts) in layers.items()}
        self.names: list[str] = []
        for weave in self.layers.values():
            weave.layer.expert_resolver = weave
            weave.owner = self

    @property
    def num_adapters(self) -> int:
        """Adapters added so far."""
        return len(self.names)

    def add_lora(self, adapters: Mapping[str, ExpertLoRA], name: str | None = None) -> int:
        """Add a LoRA adapter, ``{experts path: ExpertLoRA}`` (``lora_adapters`` of a trained model).

        The factors are copied (``B`` pre-scaled); the ``ExpertLoRA`` modules are not
        kept. Dropout does not apply (serving). Returns the adapter's id.
        """
        unknown = sorted(set(adapters) - set(self.layers))
        if unknown:
            raise ValueError(
                f"adapters: {unknown} are not experts paths of the model ({sorted(self.layers)})"
            )
        adapter_id = self.num_adapters
        for path, lora in adapters.items():
            if lora.merged:
                raise ValueError(
                    f"adapters: the LoRA adapter of {path} is merged into its weights; unmerge it first"
                )
            self.layers[path].add_lora(adapter_id, lora)
        return self._added(name or f"lora{adapter_id}")

    def add_esft(self, adapter: ESFTAdapter, name: str | None = None, share: bool = False) -> int:
        """Add an ESFT adapter (``load_esft_adapter``); returns its id.

        Its experts are copied into the layers' ESFT stacks; ``share=True`` keeps the
        adapter's own tensors instead where a layer has no ESFT experts yet (so that
        training them trains the adapter: ``esft_prepare`` does this).
        """
        check_adapter_fits(adapter, self.model)
        adapter_id = self.num_adapters
        for path, replaced in adapter.layers.items():
            if replaced.expert_ids:
                self.layers[path].add_esft(adapter_id, replaced, share)
        return self._added(name or f"esft{adapter_id}")

    def _added(self, name: str) -> int:
        self.names.append(name)
        for weave in self.layers.values():
            weave.rebuild(self.num_adapters)
        return self.num_adapters - 1

    def adapter_ids(self, adapter_ids: Sequence[int | None] | Tensor | None) -> Tensor | None:
        """The per-sequence ids as a CPU int64 tensor (``None`` entries as ``-1``), checked."""
        if adapter_ids is None:
            return None
        if isinstance(adapter_ids, Tensor):
            ids = adapter_ids.detach().to("cpu", torch.int64).reshape(-1)
        else:
            ids = torch.tensor([-1 if a is None else int(a) for a in adapter_ids], dtype=torch.int64)
        if ids.numel() == 0:
            raise ValueError("adapter_ids must name one adapter per sequence, got none")
        bad = ids[(ids < -1) | (ids >= self.num_adapters)]
        if bad.numel():
            raise ValueError(
                f"adapter_ids must be -1 (the base) or ids in [0, {self.num_adapters}), got {bad.tolist()}"
            )
        return ids

    def set_adapter_ids(self, adapter_ids: Sequence[int | None] | Tensor | None) -> None:
        """Set the per-sequence adapter ids of every later call (``None``: the base model)."""
        ids = self.adapter_ids(adapter_ids)
        for weave in self.layers.values():
            weave.set_adapter_ids(ids)

    @contextmanager
    def use(self, adapter_ids: Sequence[int | None] | Tensor | None) -> Iterator[None]:
        """Run the calls inside with one adapter id per sequence (restores the previous ids after)."""
        ids = self.adapter_ids(adapter_ids)
        previous = {path: weave.adapter_ids_B for path, weave in self.layers.items()}
        for weave in self.layers.values():
            weave.set_adapter_ids(ids)
        try:
            yield
        finally:
            for path, weave in self.layers.items():
                weave.set_adapter_ids(previous[path])

    def adapter_bytes(self) -> int:
        """Bytes of the adapters' parameters the weave holds (every layer's stacks)."""
        return sum(t.numel() * t.element_size() for w in self.layers.values() for t in w.tensors())

    def index_bytes(self) -> int:
        """Bytes of the expert maps (``(adapters + 1) * E`` int64 per layer)."""
        return sum(w.expert_map.numel() * w.expert_map.element_size() for w in self.layers.values())

    def remove(self) -> None:
        """Uninstall: the layers run as before, and the adapters' tensors are released."""
        for weave in self.layers.values():
            if weave.layer.expert_resolver is weave:
                weave.layer.expert_resolver = None
        self.layers = {}


def refuse_layer(path: str, layer: MoELayer, experts: GroupedExperts) -> None:
    """Raise where a layer cannot serve several adapters (naming the layer and why)."""
    if layer.world_size > 1:
        raise NotImplementedError(
            f"{path}: multi-adapter serving of experts spread over ranks is not supported yet"
        )
    if type(layer.strategy) not in (LocalExperts, OffloadedExperts):
        raise NotImplementedError(
            f"{path}: multi-adapter serving needs every expert in this process or in its expert cache; "
            f"this layer runs {type(layer.strategy).__name__}"
        )
    if experts.lora is not None and not experts.lora.merged:
        raise ValueError(
            f"{path}: has an unmerged LoRA adapter attached; merge_lora() or remove_lora() it first"
        )
    if layer.expert_resolver is not None:
        raise ValueError(f"{path}: already has an expert resolver (an ExpertWeave); remove it first")


def weave_of(model: nn.Module) -> ExpertWeave | None:
    """The ``ExpertWeave`` installed on ``model`` (``None`` if none)."""
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.expert_resolver, LayerWeave):
            return module.expert_resolver.owner
    return None


@contextmanager
def use(model: nn.Module, adapter_ids: Sequence[int | None] | Tensor | None) -> Iterator[None]:
    """Give each sequence of the calls inside the ``with`` block its adapter (one id per sequence).

    ``adapter_ids``: one id per sequence of the batch (``-1`` or ``None``: the base); each
    MoE layer gives sequence ``b`` the tokens ``b * T/B ... (b+1) * T/B - 1`` of its call
    (the row-major order of ``[B, S, D]`` inputs), so ``model.generate`` works with one id
    per batch row. A model without an ``ExpertWeave`` accepts only base ids.
    """
    weave = weave_of(model)
    if weave is None:
        ids = [] if adapter_ids is None else [-1 if a is None else int(a) for a in adapter_ids]
        if any(a != -1 for a in ids):
            raise ValueError(
                "adapter_ids name adapters but the model has no ExpertWeave; create one and add them"
            )
        yield
        return
    with weave.use(adapter_ids):
        yield


def remove_weave(model: nn.Module) -> None:
    """Uninstall the ``ExpertWeave`` of ``model`` (if any)."""
    weave = weave_of(model)
    if weave is not None:
        weave.remove()
