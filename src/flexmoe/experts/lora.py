"""LoRA on grouped experts: per-expert low-rank updates of ``w_in`` and ``w_out``.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), E experts, k adapted experts, r rank.

Expert ``e`` with an adapter computes with ``w_in[e] + s * B_in[k] @ A_in[k]`` and
``w_out[e] + s * B_out[k] @ A_out[k]`` (``k`` its adapter slot, ``s = alpha / r``).
Two forms of the same math: on its row segment the backends add
``s * (x_e @ A_in[k]^T) @ B_in[k]^T`` to the first projection and the same on the
(routing-weighted) activation to the second, two thin GEMMs each, next to the base
GEMMs of the same segment; or, where the experts are narrow and a call's thin GEMMs
would cost more in calls than the weights do in bytes and flops, the updated weights
are formed (``with_dense_updates``, as PEFT does) and the experts run as plain ones.
``dense_updates_pay`` chooses. Dropout applies to the LoRA input only (the base GEMM
sees the undropped rows), as in PEFT: only the per-segment terms take it.

Storage matches PEFT's per-expert factors: ``A_in [k, r, D]``, ``B_in [k, H, r]``,
``A_out [k, r, F]``, ``B_out [k, D, r]`` (``nn.Linear``'s ``[out, in]`` per expert).
Only the experts in ``experts`` have slots; the others run their base weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "DENSE_BYTES_PER_S",
    "DENSE_FLOPS_PER_S",
    "FACTOR_SHARDS",
    "SEGMENT_TERM_S",
    "TARGETS",
    "ExpertLoRA",
    "LoRATerms",
    "SegmentLoRA",
    "dense_updates_pay",
    "lora_masks",
    "with_dense_updates",
]

TARGETS = ("w_in", "w_out")

# How each factor is split where an expert's hidden units are sharded over ranks: cut
# along the hidden dim like the named expert weight (``B_in``'s rows are ``w_in``'s,
# ``A_out``'s columns are ``w_out``'s), or ``None``: whole on every shard of the expert
# (``A_in`` and ``B_out`` do not touch the hidden dim). Each shard's ``B_out A_out_s a_s``
# is then its part of the output, summed like the base's partial outputs.
FACTOR_SHARDS: dict[str, str | None] = {"A_in": None, "B_in": "w_in", "A_out": "w_out", "B_out": None}


@dataclass(frozen=True)
class LoRATerms:
    """One call's LoRA factors in the compute dtype, and what the backends need besides.

    ``A_in``/``B_in`` (``A_out``/``B_out``) are ``None`` where ``w_in`` (``w_out``) has no
    adapter. ``slot_of_expert[e]`` is expert ``e``'s adapter slot, ``-1`` for none.
    ``dropout`` is the probability in effect for this call (0 outside training).
    """

    A_in: Tensor | None
    B_in: Tensor | None
    A_out: Tensor | None
    B_out: Tensor | None
    slot_of_expert: tuple[int, ...]
    scaling: float
    dropout: float

    @property
    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(A_in, B_in, A_out, B_out)``."""
        return self.A_in, self.B_in, self.A_out, self.B_out

    def with_tensors(self, tensors: Sequence[Tensor | None]) -> LoRATerms:
        """The same terms holding other factors (cast, or the inputs an autograd Function saw)."""
        A_in, B_in, A_out, B_out = tensors
        return LoRATerms(A_in, B_in, A_out, B_out, self.slot_of_expert, self.scaling, self.dropout)

    def to(self, dtype: torch.dtype) -> LoRATerms:
        """The terms with their factors in ``dtype``."""
        return self.with_tensors([None if t is None else t.to(dtype) for t in self.tensors])

    def rank(self) -> int:
        """``r``."""
        A = self.A_in if self.A_in is not None else self.A_out
        assert A is not None
        return A.shape[1]


# Where the dense updates pay (``dense_updates_pay``), by a cost model of what each form
# adds to a call. The dense form writes the updated weights (``E (H D + D F)`` values,
# read and written: DENSE_BYTES_PER_S) and, with gradients, multiplies every row by them
# once more for the weight gradients (``2 N (H D + D F)`` flops: DENSE_FLOPS_PER_S); the
# per-segment terms cost about SEGMENT_TERM_S per thin product in calls alone, 4 per
# adapted expert forward and 12 with the backward. Measured on this 2-core CPU in fp32
# (``benchmarks/adapters.py``: Qwen3-MoE-shaped, 64 experts top-8, rank 8, batch
# 4 x 128): at dim 128 / hidden 64 a training step took 21 ms with the dense updates and
# 39 ms with the terms per segment; at dim 512 / hidden 192, 120 ms and 75 ms.
DENSE_BYTES_PER_S = 20e9
DENSE_FLOPS_PER_S = 100e9
SEGMENT_TERM_S = 10e-6


def dense_updates_pay(terms: LoRATerms, num_rows: int, w_in: Tensor, w_out: Tensor, needs_grad: bool) -> bool:
    """Whether ``with_dense_updates`` costs less here than the terms per segment (no dropout only)."""
    if terms.dropout > 0.0:
        return False
    E, H, D = w_in.shape
    F = w_out.shape[2]
    per_expert = H * D + D * F
    dense_s = 2 * E * per_expert * w_in.element_size() / DENSE_BYTES_PER_S
    if needs_grad:
        dense_s += 2 * num_rows * per_expert / DENSE_FLOPS_PER_S
    adapted = sum(1 for slot in terms.slot_of_expert if slot >= 0)
    segment_s = adapted * (12 if needs_grad else 4) * SEGMENT_TERM_S
    return dense_s < segment_s


def with_dense_updates(terms: LoRATerms, w_in: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
    """``w + s * B @ A`` for each adapted expert, as new tensors (gradients flow to the factors).

    The form PEFT trains its expert LoRA in: where the experts are narrow and their rows
    few, forming the updated weights costs less than the thin per-segment GEMMs of
    ``SegmentLoRA``; the backends then compute the experts as plain ones. Without dropout
    only (dropout applies to the LoRA input alone).
    """
    if terms.dropout > 0.0:
        raise ValueError("with_dense_updates: LoRA dropout needs the per-segment terms")
    ids = [e for e, slot in enumerate(terms.slot_of_expert) if slot >= 0]
    every = ids == list(range(w_in.shape[0]))
    index = None if every else torch.tensor(ids, dtype=torch.int64, device=w_in.device)
    updated = []
    for weight, A, B in ((w_in, terms.A_in, terms.B_in), (w_out, terms.A_out, terms.B_out)):
        if A is None or B is None:
            updated.append(weight)
        elif index is None:  # one op, whose backward is the factors' two products
            updated.append(torch.baddbmm(weight, B, A, alpha=terms.scaling))
        else:
            adapted = torch.baddbmm(weight.index_select(0, index), B, A, alpha=terms.scaling)
            updated.append(weight.index_copy(0, index, adapted))
    return updated[0], updated[1]


def lora_masks(terms: LoRATerms, N: int, D: int, F: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Inverted-dropout masks ``(mask_in [N, D], mask_out [N, F])`` for one call, ``None`` without dropout.

    Drawn in this order from the default generator by every backend, so that backends
    given the same seed drop the same entries (the reference tests rely on it).
    """
    p = terms.dropout
    if p == 0.0:
        return None, None
    masks: list[Tensor | None] = []
    for target, width in ((terms.A_in, D), (terms.A_out, F)):
        if target is None:
            masks.append(None)
            continue
        keep = torch.rand(N, width, device=like.device) >= p
        masks.append(keep.to(like.dtype) / (1.0 - p))
    return masks[0], masks[1]


class ExpertLoRA(nn.Module):
    """LoRA adapters of some experts of a ``GroupedExperts`` (attached as its ``lora`` child).

    Args:
        num_experts, dim, width, hidden_dim: the experts' ``E``, ``D``, ``H``, ``F``.
        rank: ``r``.
        alpha: the scaling numerator: updates are ``alpha / r * B @ A``
            (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the LoRA input, in training mode only.
        experts: the adapted expert ids (``None``: all), stored in increasing order.
        targets: which projections get adapters, a subset of ``("w_in", "w_out")``.

    ``A`` starts like ``nn.Linear``'s weight (Kaiming-uniform) and ``B`` at zero, so a
    new adapter leaves the outputs unchanged (PEFT's default). ``merged`` says whether the
    updates are folded into the base weights (``merge_into``); then the backends skip them.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        width: int,
        hidden_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        experts: Sequence[int] | None = None,
        targets: Sequence[str] = TARGETS,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {tuple(targets)!r}")
        ids = list(range(num_experts)) if experts is None else sorted({int(e) for e in experts})
        if not ids or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(
                f"experts must be a non-empty list of expert ids in [0, {num_experts}), got {experts!r}"
            )
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.use_rslora = use_rslora
        self.targets = tuple(t for t in TARGETS if t in targets)
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.experts = tuple(ids)
        slots = [-1] * num_experts
        for k, e in enumerate(ids):
            slots[e] = k
        self.slot_of_expert = tuple(slots)
        self.merged = False
        # On a distributed layer: the adapted logical experts, while the factors hold one
        # row per stored expert (zero rows for the others; see ``flexmoe.adapters``).
        self.adapted_experts: tuple[int, ...] | None = None
        k = len(ids)
        factory = {"device": device, "dtype": dtype}
        shapes = {
            "w_in": ((k, rank, dim), (k, width, rank)),
            "w_out": ((k, rank, hidden_dim), (k, dim, rank)),
        }
        suffix = {"w_in": "in", "w_out": "out"}
        for target in TARGETS:
            A_shape, B_shape = shapes[target]
            present = target in self.targets
            A = nn.Parameter(torch.empty(A_shape, **factory)) if present else None  # type: ignore[arg-type]
            B = nn.Parameter(torch.empty(B_shape, **factory)) if present else None  # type: ignore[arg-type]
            self.register_parameter(f"A_{suffix[target]}", A)
            self.register_parameter(f"B_{suffix[target]}", B)
        self.register_buffer("expert_ids", torch.tensor(ids, dtype=torch.int64, device=device))
        self.reset_parameters()

    A_in: nn.Parameter | None
    B_in: nn.Parameter | None
    A_out: nn.Parameter | None
    B_out: nn.Parameter | None
    expert_ids: Tensor

    def reset_parameters(self) -> None:
        """``A`` like ``nn.Linear``'s weight, per expert; ``B`` zero (the update starts at zero)."""
        for A, B in ((self.A_in, self.B_in), (self.A_out, self.B_out)):
            if A is None or B is None:
                continue
            bound = 1.0 / math.sqrt(A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) of nn.Linear
            nn.init.uniform_(A, -bound, bound)
            nn.init.zeros_(B)

    def factors(self, target: str) -> tuple[Tensor, Tensor] | None:
        """``(A, B)`` of ``target`` (``"w_in"`` or ``"w_out"``), or ``None`` without an adapter."""
        A, B = (self.A_in, self.B_in) if target == "w_in" else (self.A_out, self.B_out)
        return None if A is None or B is None else (A, B)

    def delta(self, target: str) -> Tensor | None:
        """The dense update ``s * B @ A`` of ``target`` for the adapted experts, ``[k, out, in]``."""
        pair = self.factors(target)
        if pair is None:
            return None
        A, B = pair
        return torch.bmm(B, A) * self.scaling

    def terms(self) -> LoRATerms | None:
        """The factors a forward adds now, or ``None`` where nothing is to be added (merged)."""
        if self.merged:
            return None
        dropout = self.dropout if self.training else 0.0
        return LoRATerms(
            self.A_in, self.B_in, self.A_out, self.B_out, self.slot_of_expert, self.scaling, dropout
        )

    def travelling_factors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(A_in, B_in, A_out, B_out)``, one row per expert: what moves with moved expert weights.

        Only an adapter of every expert has them (the storage of distributed layers, whose
        experts without an adapter hold zero factors).
        """
        if len(self.experts) != self.num_experts:
            raise ValueError(
                f"an adapter of some experts ({list(self.experts)}) has no factors per expert to move"
            )
        return self.A_in, self.B_in, self.A_out, self.B_out

    def unit_terms(self, factors: Sequence[Tensor | None]) -> LoRATerms | None:
        """The terms of a forward on moved experts: ``factors`` (as ``travelling_factors``), one row per unit.

        ``None`` where nothing is to be added (merged).
        """
        if self.merged:
            return None
        A_in, B_in, A_out, B_out = factors
        units = next(t for t in factors if t is not None).shape[0]
        dropout = self.dropout if self.training else 0.0
        return LoRATerms(A_in, B_in, A_out, B_out, tuple(range(units)), self.scaling, dropout)

    @torch.no_grad()
    def merge_into(self, w_in: Tensor, w_out: Tensor) -> None:
        """Add the updates to the base weights (in place) and stop adding them on the fly."""
        if self.merged:
            raise RuntimeError("the LoRA adapter is already merged; unmerge it first")
        self._add_to(w_in, w_out, 1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge_from(self, w_in: Tensor, w_out: Tensor) -> None:
        """Subtract the updates ``merge_into`` added (same up to rounding) and add them on the fly again."""
        if not self.merged:
            raise RuntimeError("the LoRA adapter is not merged")
        self._add_to(w_in, w_out, -1.0)
        self.merged = False

    def _add_to(self, w_in: Tensor, w_out: Tensor, sign: float) -> None:
        ids = self.expert_ids.to(w_in.device)
        for target, weight in (("w_in", w_in), ("w_out", w_out)):
            pair = self.factors(target)
            if pair is None:
                continue
            A, B = pair
            # The product in fp32 at least, then one rounding to the weights' dtype.
            dtype = torch.promote_types(A.dtype, torch.float32)
            delta = torch.bmm(B.to(dtype), A.to(dtype)) * (sign * self.scaling)
            weight.index_put_((ids,), weight.index_select(0, ids).to(dtype).add_(delta).to(weight.dtype))

    def extra_repr(self) -> str:  # noqa: D102
        experts = "all" if len(self.experts) == self.num_experts else list(self.experts)
        return (
            f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, targets={self.targets}, "
            f"experts={experts}, merged={self.merged}"
        )


class SegmentLoRA:
    """One call's LoRA terms on the fused backend's layouts, segment by segment, and their gradients.

    The fused backend calls ``add_in`` / ``add_out`` from its forward segment loops and
    ``backward_out`` / ``backward_out_A`` / ``backward_in`` from its backward loops; each
    writes only its segment's rows and its expert's slot, so segments stay independent.
    Kept for backward: ``u [N, r] = x A_in^T`` and ``v [N, r] = a A_out^T`` (and the
    dropout masks), ``2 r N`` values besides the masks.
    """

    def __init__(
        self, terms: LoRATerms, x_ND: Tensor, F: int, u_Nr: Tensor | None = None, v_Nr: Tensor | None = None
    ) -> None:
        self.terms = terms
        N, D = x_ND.shape
        r = terms.rank()
        self.mask_in_ND, self.mask_out_NF = lora_masks(terms, N, D, F, x_ND)
        self.x_ND = x_ND if self.mask_in_ND is None else x_ND * self.mask_in_ND
        # ``u_Nr`` / ``v_Nr``: where to keep them (the compiled operator's outputs), else new.
        if terms.A_in is None:
            u_Nr = None
        elif u_Nr is None:
            u_Nr = x_ND.new_empty(N, r)
        if terms.A_out is None:
            v_Nr = None
        elif v_Nr is None:
            v_Nr = x_ND.new_empty(N, r)
        self.u_Nr, self.v_Nr = u_Nr, v_Nr
        self.a_NF: Tensor | None = None  # the (weighted, dropped) activation, during a pass
        self.grad_v_Nr: Tensor | None = None
        self.grad_a_dropped_NF: Tensor | None = None
        self.grads: list[Tensor | None] = [None, None, None, None]

    def slot(self, e: int) -> int:
        """Expert ``e``'s adapter slot, ``-1`` for none."""
        return self.terms.slot_of_expert[e]

    # ------------------------------------------------------------------ forward
    def add_in(self, e: int, s: int, t: int, h_NH: Tensor) -> None:
        """``h[s:t] += s * (x A_in^T) B_in^T`` for expert ``e``'s rows."""
        k, A, B = self.slot(e), self.terms.A_in, self.terms.B_in
        if k < 0 or A is None or B is None or self.u_Nr is None:
            return
        u = torch.mm(self.x_ND[s:t], A[k].t(), out=self.u_Nr[s:t])
        h_NH[s:t].addmm_(u, B[k].t(), alpha=self.terms.scaling)

    def set_activation(self, a_NF: Tensor) -> None:
        """The (routing-weighted) activation the second projection reads (``add_out``, ``backward_out_A``)."""
        self.a_NF = a_NF if self.mask_out_NF is None else a_NF * self.mask_out_NF

    def add_out(self, e: int, s: int, t: int, y_ND: Tensor) -> None:
        """``y[s:t] += s * (a A_out^T) B_out^T`` for expert ``e``'s rows."""
        k, A, B = self.slot(e), self.terms.A_out, self.terms.B_out
        if k < 0 or A is None or B is None or self.v_Nr is None or self.a_NF is None:
            return
        v = torch.mm(self.a_NF[s:t], A[k].t(), out=self.v_Nr[s:t])
        y_ND[s:t].addmm_(v, B[k].t(), alpha=self.terms.scaling)

    def release_activation(self) -> None:
        """Drop the reference to the activation buffer (it goes back to the pool)."""
        self.a_NF = None

    # ----------------------------------------------------------------- backward
    def start_backward(self, like: Tensor) -> None:
        """Zeroed gradients of the factors (experts without rows get zero) and the scratch."""
        self.grads = [None if t is None else torch.zeros_like(t) for t in self.terms.tensors]
        if self.v_Nr is not None:
            self.grad_v_Nr = torch.empty_like(self.v_Nr)
        self.grad_a_dropped_NF = None if self.mask_out_NF is None else like.new_zeros(self.mask_out_NF.shape)

    def backward_out(self, e: int, s: int, t: int, grad_y_ND: Tensor, grad_a_NF: Tensor) -> None:
        """``B_out``'s gradient, and the LoRA path's part of the activation's gradient, for one segment."""
        k, A, B = self.slot(e), self.terms.A_out, self.terms.B_out
        if k < 0 or A is None or B is None or self.v_Nr is None or self.grad_v_Nr is None:
            return
        scaling = self.terms.scaling
        grad_B = self.grads[3]
        assert grad_B is not None
        torch.mm(grad_y_ND[s:t].t(), self.v_Nr[s:t], out=grad_B[k]).mul_(scaling)
        grad_v = torch.mm(grad_y_ND[s:t], B[k], out=self.grad_v_Nr[s:t]).mul_(scaling)
        target = grad_a_NF if self.grad_a_dropped_NF is None else self.grad_a_dropped_NF
        target[s:t].addmm_(grad_v, A[k])

    def finish_backward_out(self, grad_a_NF: Tensor) -> None:
        """Through the output dropout: add the masked LoRA-path gradient to the activation's."""
        if self.grad_a_dropped_NF is not None and self.mask_out_NF is not None:
            grad_a_NF.addcmul_(self.grad_a_dropped_NF, self.mask_out_NF)
            self.grad_a_dropped_NF = None

    def backward_out_A(self, e: int, s: int, t: int) -> None:
        """``A_out``'s gradient for one segment (after ``set_activation`` with the weighted activation)."""
        k, grad_A = self.slot(e), self.grads[2]
        if k < 0 or grad_A is None or self.grad_v_Nr is None or self.a_NF is None:
            return
        torch.mm(self.grad_v_Nr[s:t].t(), self.a_NF[s:t], out=grad_A[k])

    def backward_in(self, e: int, s: int, t: int, grad_h_NH: Tensor, grad_x_ND: Tensor | None) -> None:
        """``A_in``'s and ``B_in``'s gradients, and the LoRA path's part of ``x``'s, for one segment."""
        k, A, B = self.slot(e), self.terms.A_in, self.terms.B_in
        grad_A, grad_B = self.grads[0], self.grads[1]
        if k < 0 or A is None or B is None or grad_A is None or grad_B is None or self.u_Nr is None:
            return
        scaling = self.terms.scaling
        torch.mm(grad_h_NH[s:t].t(), self.u_Nr[s:t], out=grad_B[k]).mul_(scaling)
        grad_u = torch.mm(grad_h_NH[s:t], B[k]).mul_(scaling)
        torch.mm(grad_u.t(), self.x_ND[s:t], out=grad_A[k])
        if grad_x_ND is None:
            return
        if self.mask_in_ND is None:
            grad_x_ND[s:t].addmm_(grad_u, A[k])
        else:
            grad_x_ND[s:t].addcmul_(grad_u @ A[k], self.mask_in_ND[s:t])
