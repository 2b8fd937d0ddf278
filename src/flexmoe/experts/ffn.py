"""Expert modules: the grouped routed experts, a custom-expert adapter, the shared FFN.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E experts.

Plugging in your own experts: pass any ``nn.Module`` with integer attributes
``num_experts`` and ``dim`` whose ``forward(x_ND, counts)`` maps the expert-major rows
(``counts[e]`` consecutive rows for expert ``e``) to outputs of the same shape; the
layer multiplies the outputs by the routing weights. (A module that sets
``accepts_row_weights = True`` is called as ``forward(x_ND, counts, row_weights_N)``
and must apply them itself.) Or pass an ``nn.ModuleList`` of ``E`` modules that each
map ``[n, D] -> [n, D]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.config import GATED_ACTIVATIONS
from flexmoe.experts.activations import activate
from flexmoe.experts.backends import grouped_ffn, grouped_ffn_grouped_mm_rows, grouped_mm_available
from flexmoe.experts.cast_cache import CastCache
from flexmoe.experts.lora import ExpertLoRA, LoRATerms, dense_updates_pay, with_dense_updates
from flexmoe.experts.ops import routed_experts
from flexmoe.experts.packed import PackedExpertWeights, packed_ffn_inference, packed_inference_supported

__all__ = ["DenseFFN", "GroupedExperts", "ModuleListExperts", "resolve_backend"]


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = ()
) -> str:
    """The concrete backend that runs: ``auto`` resolved, ``grouped_mm`` only where it can.

    Measured (benchmarks/layer.py): on CPU the fused loop beats ``torch._grouped_mm``
    (which loops over experts internally, with autograd temporaries) forward and
    backward; on CUDA ``torch._grouped_mm`` is one kernel launch for all experts.
    ``torch._grouped_mm`` needs every matrix width (``widths``: D, H, F) to be a
    multiple of 16 bytes; where it is not, or the device lacks the kernel, the fused
    loop runs instead (same results), and ``MoEStats.backend`` says so.
    """
    usable = grouped_mm_available(device, dtype) and all(w * dtype.itemsize % 16 == 0 for w in widths)
    if backend == "grouped_mm":
        return "grouped_mm" if usable else "fused"
    if backend != "auto":
        return backend
    if device.type == "cuda" and usable:
        return "grouped_mm"
    return "fused"


class GroupedExperts(nn.Module):
    """``E`` FFN experts stored as stacked weights and run as grouped GEMMs.

    ``w_in`` is ``[E, H, D]`` and ``w_out`` is ``[E, D, F]`` (``nn.Linear``'s
    ``[out, in]`` convention, the ``transformers`` layout); for gated activations the
    rows of ``w_in`` are ``[gate; up]``.

    ``prepare_for_inference()`` opts in to a faster CPU forward without autograd on a
    second, pre-packed copy of the weights (see ``flexmoe.experts.packed``).

    ``lora`` holds LoRA adapters of some experts (an ``ExpertLoRA``, attached by
    ``flexmoe.adapters.add_lora``); unless merged, every backend adds their terms on the
    same segments (see ``flexmoe.experts.lora``).
    """

    _packed: PackedExpertWeights | None = None  # built by prepare_for_inference()

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str = "swiglu",
        bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.backend = backend
        width = 2 * hidden_dim if activation in GATED_ACTIVATIONS else hidden_dim
        factory = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.empty(num_experts, width, dim, **factory))  # type: ignore[arg-type]
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))  # type: ignore[arg-type]
        self.b_in = nn.Parameter(torch.empty(num_experts, width, **factory)) if bias else None  # type: ignore[arg-type]
        self.b_out = nn.Parameter(torch.empty(num_experts, dim, **factory)) if bias else None  # type: ignore[arg-type]
        self.lora: ExpertLoRA | None = None
        self.casts = CastCache()  # autocast's copies of the weights, kept for calls without grad
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation, per expert."""
        for weight, bias in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    accepts_row_weights = True

    def forward(
        self, x_ND: Tensor, counts: list[int], row_weights_N: Tensor | None = None, backend: str | None = None
    ) -> Tensor:
        """Apply expert ``e`` to its ``counts[e]`` consecutive rows, scaled by ``row_weights_N``."""
        lora = self.active_lora()
        if lora is None:
            y_ND = self._forward_packed(x_ND, counts, row_weights_N, backend)
            if y_ND is not None:
                return y_ND
        weights = (self.w_in, self.w_out, self.b_in, self.b_out)
        return self._run(x_ND, counts, weights, row_weights_N, backend, lora, self.casts)

    def active_lora(self) -> LoRATerms | None:
        """The LoRA terms a forward adds now: ``None`` without an adapter or with a merged one."""
        return None if self.lora is None else self.lora.terms()

    def apply_weights(
        self,
        x_ND: Tensor,
        counts: list[int],
        weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
        row_weights_N: Tensor | None = None,
        backend: str | None = None,
        lora_factors: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """``forward`` with other weights ``(w_in, w_out, b_in, b_out)`` in this module's layout.

        Expert parallelism runs gathered or sliced weights through here. With an unmerged
        LoRA adapter, ``lora_factors`` are its factors moved the same way
        (``ExpertLoRA.travelling_factors``: one row per expert of ``weights``).
        """
        lora = None
        if self.active_lora() is not None:
            assert self.lora is not None
            if lora_factors is None:
                raise ValueError(
                    "apply_weights: the experts have a LoRA adapter; pass its moved lora_factors"
                )
            lora = self.lora.unit_terms(lora_factors)
        return self._run(x_ND, counts, weights, row_weights_N, backend, lora)

    def travelling_lora(self) -> tuple[Tensor | None, ...]:
        """The LoRA factors that move with moved expert weights: none without an unmerged adapter."""
        if self.active_lora() is None:
            return ()
        assert self.lora is not None
        return self.lora.travelling_factors()

    def _run(
        self,
        x_ND: Tensor,
        counts: list[int],
        weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
        row_weights_N: Tensor | None,
        backend: str | None,
        lora: LoRATerms | None,
        casts: CastCache | None = None,
    ) -> Tensor:
        x_ND, (w_in, w_out, b_in, b_out), row_weights_N = _in_compute_dtype(
            x_ND, weights, row_weights_N, casts
        )
        widths: tuple[int, ...] = (w_in.shape[2], w_in.shape[1], w_out.shape[2])
        if lora is not None:
            lora = lora.to(x_ND.dtype)
            needs_grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x_ND, w_in, w_out, *lora.tensors)
            )
            if dense_updates_pay(lora, x_ND.shape[0], w_in, w_out, needs_grad):
                w_in, w_out = with_dense_updates(lora, w_in, w_out)
                lora = None
        if lora is not None:
            widths = (*widths, lora.rank())  # torch._grouped_mm's alignment holds for r too
        name = resolve_backend(backend or self.backend, x_ND.device, x_ND.dtype, widths)
        with torch.autocast(x_ND.device.type, enabled=False):
            return grouped_ffn(
                name, x_ND, counts, w_in, w_out, b_in, b_out, self.activation, row_weights_N, lora
            )

    def forward_tokens(
        self, x_TD: Tensor, row_weights_S: Tensor, token_ids_S: Tensor, inverse_S: Tensor, counts_E: Tensor
    ) -> Tensor:
        """Each token's weighted sum of its experts' outputs, as one custom operator (``torch.compile``).

        The index tensors describe every routed slot, kept ones first (see
        ``flexmoe.experts.ops.routed_experts``); nothing here reads them on the host, so
        the compiler traces the call with static shapes. Runs the fused backend.
        """
        lora = self.active_lora()
        if lora is not None and lora.dropout > 0.0:
            raise NotImplementedError(
                "LoRA dropout under torch.compile is not supported; train with the adapter's "
                "dropout=0 there, or run eagerly"
            )
        params = (self.w_in, self.w_out, self.b_in, self.b_out)
        x_TD, weights, rw_S = _in_compute_dtype(x_TD, params, row_weights_S, self.casts)
        assert rw_S is not None
        lora = None if lora is None else lora.to(x_TD.dtype)
        return routed_experts(x_TD, rw_S, token_ids_S, inverse_S, counts_E, weights, self.activation, lora)

    def forward_rows(self, x_SD: Tensor, counts_E: Tensor, row_weights_S: Tensor) -> Tensor:
        """``forward`` on one row per routed slot with ``torch._grouped_mm``, traceable by the compiler.

        ``x_SD`` holds the ``sum(counts_E)`` kept rows first (expert-major, ``counts_E`` a
        tensor), then rows whose output is zero (the dropped slots).
        """
        if self.active_lora() is not None:
            raise NotImplementedError(
                "forward_rows runs no LoRA adapter (the compiled layer runs forward_tokens then)"
            )
        weights = (self.w_in, self.w_out, self.b_in, self.b_out)
        x_SD, (w_in, w_out, b_in, b_out), rw_S = _in_compute_dtype(x_SD, weights, row_weights_S, self.casts)
        with torch.autocast(x_SD.device.type, enabled=False):
            return grouped_ffn_grouped_mm_rows(
                x_SD, counts_E, w_in, w_out, b_in, b_out, self.activation, rw_S
            )

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the expert GEMMs run in for input ``x`` (autocast's where it is on)."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def compiled_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend under ``torch.compile``: ``grouped_mm`` or ``fused``.

        ``grouped_mm`` (``forward_rows``) where it resolves so in bf16 and no unmerged
        LoRA adapter is attached, else ``fused`` (``forward_tokens``).

        The compiler's shape function for ``torch._grouped_mm`` accepts bf16 only (the
        eager CPU kernel also runs fp32).
        """
        usable = dtype == torch.bfloat16 and self.resolved_backend(device, dtype) == "grouped_mm"
        # An unmerged LoRA adapter runs in the fused operator, which computes its terms.
        return "grouped_mm" if usable and self.active_lora() is None else "fused"

    def resolved_backend(self, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
        """The backend a forward on this device and dtype runs (see ``resolve_backend``)."""
        widths = (self.dim, self.w_in.shape[1], self.hidden_dim)
        return resolve_backend(backend or self.backend, device, dtype, widths)

    def prepare_for_inference(self) -> bool:
        """Build pre-packed copies of the expert weights for fast CPU forwards without autograd.

        Opt-in because the copies take as much memory again as ``w_in`` and ``w_out``.
        Once prepared, a forward with gradients disabled (``torch.no_grad``,
        ``torch.inference_mode``), on CPU, outside autocast, in the weights' dtype, whose
        backend resolves to ``fused`` (the CPU default) runs on the packed copies: same
        results up to floating-point rounding, about 1.25x faster for decode-sized
        batches on our CPU (see ``flexmoe.experts.packed``). Every other forward runs
        as before.

        The copies are dropped, never used stale, once the weights change: any in-place
        write that bumps their version counter (``copy_``, ``load_state_dict``, optimizer
        steps), a ``torch.optim`` optimizer step over them (``fused=True`` included),
        replaced tensors (``.data =``, ``.to()``), and ``train()``. Writes through
        ``.data`` are not detected: call this again after them. Call it again to re-pack
        after any change; ``release_inference_weights()`` frees the copies.

        Returns whether the copies were built: ``False`` (and nothing kept) where the
        device or dtype has no packed path (not CPU, PyTorch without oneDNN, dtypes
        other than fp32, or bf16 without native CPU support).
        """
        self.release_inference_weights()
        if not packed_inference_supported(self.w_in.device, self.w_in.dtype):
            return False
        self._packed = PackedExpertWeights(self.w_in, self.w_out)
        return True

    def release_inference_weights(self) -> None:
        """Free the packed copies built by ``prepare_for_inference`` (if any)."""
        if self._packed is not None:
            self._packed.invalidate()
        self._packed = None

    @property
    def inference_prepared(self) -> bool:
        """Whether packed copies exist and still match the current weights."""
        return self._packed is not None and self._packed.matches(self.w_in, self.w_out)

    def train(self, mode: bool = True) -> Self:
        """``nn.Module.train``; switching to training mode releases the packed inference weights."""
        if mode:
            self.release_inference_weights()
        return super().train(mode)

    def inference_products(self, x_ND: Tensor, backend: str | None = None) -> PackedExpertWeights | None:
        """The packed copies a forward of ``x_ND`` runs on now, or ``None``.

        They exist (``prepare_for_inference``) and match the current weights, and the call
        is one they serve: gradients disabled, on CPU, outside autocast, in the weights'
        dtype, on the ``fused`` backend. Copies whose weights changed are released.
        """
        packed = self._packed
        if packed is None:
            return None
        if not packed.matches(self.w_in, self.w_out):
            self.release_inference_weights()  # the weights changed: never use the copies again
            return None
        if (
            torch.is_grad_enabled()
            or x_ND.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
            or x_ND.dtype != self.w_in.dtype
            or self.resolved_backend(x_ND.device, x_ND.dtype, backend) != "fused"
        ):
            return None
        return packed

    def _forward_packed(
        self, x_ND: Tensor, counts: list[int], row_weights_N: Tensor | None, backend: str | None
    ) -> Tensor | None:
        """The forward on the packed weights, or ``None`` where it does not apply."""
        packed = self.inference_products(x_ND, backend)
        if packed is None:
            return None
        if row_weights_N is not None:
            row_weights_N = row_weights_N.to(x_ND.dtype)
        return packed_ffn_inference(
            x_ND, counts, packed, self.w_in, self.w_out, self.b_in, self.b_out, self.activation, row_weights_N
        )

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation!r}, bias={self.b_in is not None}, backend={self.backend!r}"
        )


def _in_compute_dtype(
    x_ND: Tensor,
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    row_weights_N: Tensor | None,
    casts: CastCache | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None, Tensor | None], Tensor | None]:
    """Input, weights and row weights in the dtype the GEMMs run in (autocast's, else the input's).

    ``casts``: where the module keeps autocast's copies of its own weights between calls
    without grad (``None`` for weights it does not own, e.g. gathered from other ranks).
    """
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        # The GEMMs run outside autocast's op dispatch, so cast explicitly.
        dtype = torch.get_autocast_dtype(device_type)
        x_ND = x_ND.to(dtype)
        names = ("w_in", "w_out", "b_in", "b_out")
        w_in, w_out, b_in, b_out = (
            None if w is None else w.to(dtype) if casts is None else casts.cast(name, w, dtype)
            for name, w in zip(names, weights, strict=True)
        )
        assert w_in is not None and w_out is not None
    else:
        w_in, w_out, b_in, b_out = weights
        if x_ND.dtype != w_in.dtype:
            raise TypeError(
                f"x has dtype {x_ND.dtype} but the experts' weights are {w_in.dtype}; "
                "convert the layer with .to(dtype) or run under torch.autocast"
            )
    if row_weights_N is not None:
        row_weights_N = row_weights_N.to(x_ND.dtype)
    return x_ND, (w_in, w_out, b_in, b_out), row_weights_N


class ModuleListExperts(nn.Module):
    """Adapter: ``E`` arbitrary modules, each applied to its own expert's rows."""

    def __init__(self, experts: nn.ModuleList, dim: int) -> None:
        super().__init__()
        self.experts = experts
        self.num_experts = len(experts)
        self.dim = dim

    def forward(self, x_ND: Tensor, counts: list[int]) -> Tensor:  # noqa: D102
        outputs = []
        for e, x_e in enumerate(x_ND.split(counts)):
            if x_e.shape[0] == 0:
                continue
            y_e = self.experts[e](x_e)
            if not isinstance(y_e, Tensor) or y_e.shape != x_e.shape:
                shape = tuple(y_e.shape) if isinstance(y_e, Tensor) else type(y_e).__name__
                raise ValueError(f"experts[{e}] must map [n, {self.dim}] to [n, {self.dim}], got {shape}")
            outputs.append(y_e)
        if not outputs:
            return x_ND.new_zeros(0, self.dim)
        return torch.cat(outputs)


class DenseFFN(nn.Module):
    """A dense FFN (the shared, always-on experts), optionally scaled by a sigmoid gate."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str,
        bias: bool = False,
        gate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        width = 2 * hidden_dim if activation in GATED_ACTIVATIONS else hidden_dim
        self.activation = activation
        self.w_in = nn.Linear(dim, width, bias=bias, device=device, dtype=dtype)
        self.w_out = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)
        self.gate = nn.Linear(dim, 1, bias=False, device=device, dtype=dtype) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:  # noqa: D102
        y_TD: Tensor = self.w_out(activate(self.w_in(x_TD), self.activation))
        if self.gate is not None:
            y_TD = y_TD * F.sigmoid(self.gate(x_TD))
        return y_TD
